"""Property-testing kit for qkv policies: hypothesis strategies and an assertion helper.

    from hypothesis import given, strategies as st
    from qkv.testing import assert_within_bound, kv_pairs, policies

    @given(data=st.data())
    def test_my_policy(data):
        k, v = data.draw(kv_pairs(max_tokens=256))
        policy = data.draw(policies(shape=tuple(k.shape)))       # or qkv.build_policy("my,spec")
        assert_within_bound(policy, k, v)

- :func:`kv_tensors` / :func:`kv_pairs` / :func:`kv_shapes`: K/V tensors [B, H, S, D] that look like
  real caches (channel outliers, clustered or smooth tokens, all-zero blocks, magnitudes from the
  dtype's subnormals to its largest values, fp32/fp16/bf16).
- :func:`clustered_tokens`: fixed, seeded clustered tokens, for comparisons averaged over inputs.
- :func:`components`, :func:`tensor_policies`, :func:`policies`: components and policies drawn from
  the registries at draw time, so a newly registered component is covered without a new test.
  Parameters come from :func:`register_params` or, by default, from the factory's signature.
- :func:`assert_within_bound`: compress, decompress, check against the reported bound, and on
  failure shrink the input and print a minimal reproducer.

Only this package imports hypothesis; ``import qkv`` does not.
"""

try:
    import hypothesis  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("qkv.testing needs hypothesis: pip install hypothesis") from exc

from qkv.testing.assertions import assert_within_bound
from qkv.testing.params import available, param_strategy, register_params
from qkv.testing.policies import components, policies, tensor_policies
from qkv.testing.tensors import DTYPES, HEAD_DIMS, clustered_tokens, kv_pairs, kv_shapes, kv_tensors

__all__ = [
    "DTYPES",
    "HEAD_DIMS",
    "assert_within_bound",
    "available",
    "clustered_tokens",
    "components",
    "kv_pairs",
    "kv_shapes",
    "kv_tensors",
    "param_strategy",
    "policies",
    "register_params",
    "tensor_policies",
]
