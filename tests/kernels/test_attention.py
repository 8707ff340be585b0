"""Attention over compressed spans: the Triton kernel against decompress-then-SDPA.

Tolerance (as flash-attention's tests): against an fp32 attention over the keys and values the
compressed data encodes, decompressed in fp32, the kernel's error must be at most twice that of the
plain-torch path (decompress to the cache dtype, then ``scaled_dot_product_attention`` in that
dtype), in max and in mean. Without a GPU the kernel runs in Triton's interpreter (small shapes);
on a GPU the same tests run compiled, plus one at full Wan-1.3B head shapes.
"""

import dataclasses
import importlib


import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import qkv  # noqa: E402
from qkv import kernels  # noqa: E402
from qkv.errors import BackendError, DTypeError, ShapeError  # noqa: E402
from qkv.kernels import CompressedSpan, DenseKV, SpanPlan  # noqa: E402
from qkv.kernels.attention import (  # noqa: E402
    _LSE_OPS,
    KEY_SPLIT,
    attention_torch,
    lse_op,
    partial_attention,
    sdpa_split,
    sdpa_with_lse,
)
from qkv.kernels.segments import span_groups  # noqa: E402
from qkv.kernels.triton.bits import LAUNCH_STAGES  # noqa: E402
attention_module = importlib.import_module("qkv.kernels.attention")  # the package's attention() shadows it
from qkv.kernels.triton.attention import span_support  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESETS = ["qvg", "qvg-pro", "qvg-int4", "qvg-ref", "rtn", "kivi", "quarot", "bf16"]


def gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(seed, *shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed), device=DEVICE) * scale).to(dtype)


def policy(name, d):
    if name.startswith("qvg"):
        return qkv.build_policy(name, clusters=8, block=min(d, 64) if name != "qvg-pro" else 16)
    return qkv.build_policy(name)


def materialized(segments, fp32=False):
    """The history decompressed (plain-torch kernels) to the cache dtype, or with fp32=True to fp32
    (no rounding of the decoded values: what the compressed data encodes)."""
    parts = []
    for seg in segments:
        if fp32 and isinstance(seg, CompressedSpan):
            ckv = seg.ckv
            wide = dataclasses.replace(ckv, k=dataclasses.replace(ckv.k, dtype=torch.float32),
                                       v=dataclasses.replace(ckv.v, dtype=torch.float32))
            seg = CompressedSpan(wide, seg.skip)
        parts.append([t.float() if fp32 else t for t in seg.materialize(backend="torch")])
    k, v = zip(*parts)
    return torch.cat(k, 2), torch.cat(v, 2)


def assert_within_twice_the_torch_error(out, q, segments, rounded_partials=False):
    """out vs an fp32 attention over the history decompressed in fp32: at most 2x the error of
    decompress + scaled_dot_product_attention in q's dtype. ``rounded_partials``: ``out`` merges
    partial attentions each rounded to q's dtype (a convex combination of values, so each is at most
    max |v|): the max error may exceed that by one such rounding, unit roundoff x max |v|, and the
    mean error by unit roundoff x mean |out| (a partial rotated back after its rounding is rounded
    again when the result is cast)."""
    k, v = materialized(segments)
    gqa = q.shape[1] != k.shape[1]
    plain = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa).float()
    ref = F.scaled_dot_product_attention(q.float(), *materialized(segments, fp32=True), enable_gqa=gqa)
    err, base = (out.float() - ref).abs(), (plain - ref).abs()
    assert out.shape == q.shape and out.dtype == q.dtype
    unit = torch.finfo(q.dtype).eps / 2 if rounded_partials else 0.0
    slack, mean_slack = unit * v.float().abs().max(), unit * ref.abs().mean()
    assert err.max() <= 2 * base.max() + slack, (err.max().item(), base.max().item(), float(slack))
    assert err.mean() <= 2 * base.mean() + mean_slack, (err.mean().item(), base.mean().item(), float(mean_slack))


def history(name, *, seed=0, b=1, h=2, d=64, span=250, skip=7, dtype=torch.bfloat16):
    """A sink chunk, one compressed span (its first ``skip`` tokens evicted) and a tail chunk."""
    pol = policy(name, d)
    k, v = randn(seed, b, h, span, d, dtype=dtype, scale=2.0), randn(seed + 1, b, h, span, d, dtype=dtype)
    ckv = pol.compress(k, v)
    sink = DenseKV(randn(seed + 2, b, h, 24, d, dtype=dtype), randn(seed + 3, b, h, 24, d, dtype=dtype))
    tail = DenseKV(randn(seed + 4, b, h, 40, d, dtype=dtype), randn(seed + 5, b, h, 40, d, dtype=dtype))
    return [sink, CompressedSpan(ckv, skip), tail]


@pytest.mark.parametrize("name", PRESETS)
def test_kernel_matches_decompress_then_sdpa(name):
    segments = history(name, seed=PRESETS.index(name))
    assert span_support(segments[1], segments[0].k) is None  # read directly, no fallback
    q = randn(99, 1, 2, 48, 64)
    out = kernels.attention(q, segments, backend="triton", method="fused")
    assert_within_twice_the_torch_error(out, q, segments)


@pytest.mark.parametrize("spec, fast", [
    ("int4(block=16,axis=channel)", True),  # bytes, first code in the high bits, no zero point
    ("int2(block=8,axis=channel,mode=asym)", True),  # two scale blocks per key tile
    ("int2(block=48,axis=channel,mode=asym),i32lsb", False),  # a scale block that straddles tiles
    ("int1(block=32,axis=channel),i32lsb", False),  # 32 codes per word: more than a 16-key tile
])
def test_per_channel_layouts(spec, fast):
    """Keys and values in per-channel blocks along the tokens (KIVI's key layout), with the
    remainder in full precision: read a word per channel row at a time when a key tile holds whole
    words and a block is a power of two of whole words (a tile then holds whole blocks or part of
    one), element by element otherwise."""
    from qkv.kernels.triton.records import tensor_record

    pol = qkv.build_policy(spec)
    k, v = randn(60, 1, 2, 150, 64, scale=2.0), randn(61, 1, 2, 150, 64)
    segments = [CompressedSpan(pol.compress(k, v), 9), DenseKV(randn(62, 1, 2, 20, 64), randn(63, 1, 2, 20, 64))]
    assert tensor_record(segments[0].ckv.k)[1].FAST is fast
    assert segments[0].ckv.k.quantized_tokens < 150  # a full-precision remainder
    q = randn(64, 1, 2, 40, 64)
    assert_within_twice_the_torch_error(kernels.attention(q, segments, backend="triton", method="fused"), q, segments)


def test_gqa_head_dim_128_and_a_query_view():
    segments = history("qvg", h=2, d=128, span=200, skip=0)
    q = randn(5, 1, 30, 4, 128).transpose(1, 2)  # [B, H, Sq, D] view of [B, Sq, H, D], 4 heads on 2
    out = kernels.attention(q, segments, backend="triton", method="fused")
    assert_within_twice_the_torch_error(out, q, segments)


def test_fp16_cache_and_queries():
    segments = history("rtn", dtype=torch.float16, span=100)
    q = randn(6, 1, 2, 20, 64, dtype=torch.float16)
    assert_within_twice_the_torch_error(kernels.attention(q, segments, backend="triton", method="fused"), q, segments)


def test_layouts_in_one_call_and_an_unsupported_span_fall_back():
    """Spans of two layouts (two launches) and one the kernel cannot read (5 smoothing stages:
    decompressed on its own, attended to as full-precision keys), merged by log-sum-exp."""
    segments = history("qvg", seed=1, span=120)
    deep = qkv.build_policy("kmeans(clusters=4,iters=2),centroid,progressive(stages=5),int2(block=16)")
    k, v = randn(11, 1, 2, 64, 64), randn(12, 1, 2, 64, 64)
    segments += [CompressedSpan(policy("rtn", 64).compress(k, v), 3),
                 CompressedSpan(deep.compress(k, v))]
    q = randn(13, 1, 2, 33, 64)
    assert "5 smoothing stages" in span_support(segments[-1], q)
    assert_within_twice_the_torch_error(kernels.attention(q, segments, backend="triton", method="fused"), q, segments)


def test_the_torch_twin_is_the_fp32_attention():
    segments = history("qvg-pro", seed=3, span=90)
    q = randn(14, 1, 2, 17, 64)
    out = attention_torch(q, segments, scale=0.05)
    k, v = materialized(segments)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.05)
    assert torch.equal(out, ref.to(q.dtype)) or (out.float() - ref).abs().max() <= 2**-8 * ref.abs().max()
    assert torch.equal(kernels.attention(q, segments, scale=0.05, backend="torch"), out)


@pytest.mark.parametrize("tokens, skip", [(150, 140), (150, 147), (12, 3)])
def test_evictions_reaching_the_full_precision_remainder(tokens, skip):
    """The span's last tiles, which may hold full-precision tokens, run in a loop of their own: an
    eviction ending inside the last quantized tile, inside the remainder, or a span too short for
    one quantized block."""
    pol = qkv.build_policy("int4(block=16,axis=channel)")
    k, v = randn(70, 1, 2, tokens, 64, scale=2.0), randn(71, 1, 2, tokens, 64)
    segments = [CompressedSpan(pol.compress(k, v), skip), DenseKV(randn(72, 1, 2, 20, 64), randn(73, 1, 2, 20, 64))]
    assert segments[0].ckv.k.quantized_tokens == tokens // 16 * 16
    q = randn(74, 1, 2, 40, 64)
    assert_within_twice_the_torch_error(kernels.attention(q, segments, backend="triton", method="fused"), q, segments)


@pytest.mark.parametrize("name", ["qvg", "kivi", "quarot"])
def test_staged_matches_decompress_then_sdpa(name):
    segments = history(name, seed=30 + PRESETS.index(name))
    q = randn(31, 1, 2, 48, 64)
    assert_within_twice_the_torch_error(kernels.attention_staged(q, segments), q, segments, True)


def test_staged_gqa_fp16_and_a_span_of_another_policy():
    segments = history("rtn", h=2, dtype=torch.float16, span=100)
    pol = policy("qvg", 64)
    k, v = randn(32, 1, 2, 70, 64, dtype=torch.float16), randn(33, 1, 2, 70, 64, dtype=torch.float16)
    segments.insert(1, CompressedSpan(pol.compress(k, v), 5))
    q = randn(34, 1, 20, 4, 64, dtype=torch.float16).transpose(1, 2)  # 4 heads on 2, a view
    assert_within_twice_the_torch_error(kernels.attention_staged(q, segments, backend="torch"), q, segments, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sdpa_with_lse_is_the_fp32_partial_attention(dtype):
    """Out and log-sum-exp of torch's fused kernels (each one this device has) vs the fp32 einsum."""
    q, k, v = randn(40, 1, 4, 37, 64, dtype=dtype), randn(41, 1, 2, 50, 64, dtype=dtype), randn(42, 1, 2, 50, 64, dtype=dtype)
    ref_out, ref_lse = partial_attention(q, k, v, 0.2)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    results = [sdpa_with_lse(q, k, v, 0.2)]
    if DEVICE == "cuda" and dtype != torch.float32:  # every listed op that takes them, not only the first
        kk, vv = (t.repeat_interleave(2, 1) for t in (k, v))
        for name in _LSE_OPS:
            try:
                results.append(lse_op(name, q, kk, vv, 0.2))
            except RuntimeError:
                continue
    for out, lse in results:
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        assert (lse - ref_lse).abs().max() <= tol * ref_lse.abs().max()
        assert (out.float() - ref_out).abs().max() <= tol * ref_out.abs().max()
    mixed = sdpa_with_lse(q.float(), k, v, 0.2)  # queries in another dtype: the fp32 einsum
    assert torch.allclose(mixed[1], partial_attention(q.float(), k, v, 0.2)[1])


def test_sdpa_with_lse_reads_keys_whose_d_is_not_contiguous():
    """Per-channel keys decompress as a transposed view (D strided): the fused kernel gets rows of
    contiguous D (torch's CPU kernel misreads the view), same heads for q and k (no GQA copy)."""
    q = randn(43, 1, 2, 12, 64, dtype=torch.bfloat16)
    k = randn(44, 1, 2, 64, 24, dtype=torch.bfloat16).transpose(2, 3)  # [1, 2, 24, 64], D strided
    v = randn(45, 1, 2, 24, 64, dtype=torch.bfloat16)
    assert k.stride(-1) != 1
    out, lse = sdpa_with_lse(q, k, v, 0.2)
    ref_out, ref_lse = partial_attention(q, k, v, 0.2)
    assert (lse - ref_lse).abs().max() <= 2**-7 * ref_lse.abs().max()
    assert (out.float() - ref_out).abs().max() <= 2**-7 * ref_out.abs().max()


@pytest.mark.parametrize("part_dtype", [torch.bfloat16, torch.float32])
def test_merge_kernel_is_the_torch_merge(part_dtype):
    """The Triton merge vs the torch one on fresh inputs: a part in [B, Sq, H, D] memory (as torch's
    fused kernels return it) with a strided log-sum-exp, log-sum-exps far apart and equal, D not a
    power of two; both update the state in place and agree to fp32 rounding."""
    b, h, sq, d = 2, 3, 37, 48
    out = randn(60, b, h, sq, d, dtype=torch.float32)
    lse = randn(61, b, h, sq, dtype=torch.float32, scale=20.0)
    part_out = randn(62, b, sq, h, d, dtype=part_dtype).transpose(1, 2)
    part_lse = randn(63, b, h, sq, 2, dtype=torch.float32, scale=20.0)[..., 0]
    part_lse[0, 0, :5] = lse[0, 0, :5]  # equal weights
    part_lse[1, 2, :5] = -float("inf")  # a part that adds nothing
    parts = (part_out.clone(), part_lse.clone())
    ref = kernels.merge_partials((out.clone(), lse.clone()), (part_out, part_lse), backend="torch")
    state = (out.clone(), lse.clone())
    got = kernels.merge_partials(state, (part_out, part_lse), backend="triton")
    assert got[0].data_ptr() == state[0].data_ptr() and got[1].data_ptr() == state[1].data_ptr()
    assert torch.equal(parts[0], part_out) and torch.equal(parts[1], part_lse)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0][1, 2, :5], out[1, 2, :5])


@pytest.mark.parametrize("with_state", [False, True])
def test_merging_many_parts_at_once_is_the_torch_merge(with_state):
    """Six parts at once (more than one launch folds in; the outputs in two memory layouts and
    dtypes, so the kernel folds them in runs), into a new state or a running one: the Triton and
    torch merges agree to fp32 rounding, and both equal the attention over every key."""
    q = randn(64, 1, 2, 9, 48, dtype=torch.float32)
    k, v = randn(65, 1, 2, 90, 48, dtype=torch.float32), randn(66, 1, 2, 90, 48, dtype=torch.float32)
    cuts = [0, 7, 20, 21, 44, 60, 75, 90]
    parts = [partial_attention(q, k[:, :, a:b], v[:, :, a:b], 0.3) for a, b in zip(cuts, cuts[1:])]
    parts[2] = (parts[2][0].transpose(1, 2).contiguous().transpose(1, 2), parts[2][1])  # [B, Sq, H, D] memory
    parts[4] = (parts[4][0].bfloat16().float(), parts[4][1])
    whole = partial_attention(q, k, v, 0.3)
    start = parts.pop(0) if with_state else None
    merged = {}
    for backend in ("torch", "triton"):
        state = None if start is None else (start[0].clone(), start[1].clone())
        merged[backend] = kernels.merge_partials(state, *parts, backend=backend)
        if state is not None:
            assert merged[backend][0].data_ptr() == state[0].data_ptr()
    torch.testing.assert_close(merged["triton"][0], merged["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged["triton"][1], merged["torch"][1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(merged["torch"][1], whole[1], rtol=1e-6, atol=1e-5)
    assert (merged["torch"][0] - whole[0]).abs().max() <= 2**-7 * whole[0].abs().max()  # a bf16-rounded part
    with pytest.raises(ShapeError, match="no part"):
        kernels.merge_partials(None)


def test_rows_over_no_key_merge_to_zero_and_wait_for_keys():
    """A row whose parts all have log-sum-exp -inf (no key for it yet) merges to output 0 and
    log-sum-exp -inf on both backends, into a new state or a running one, and a later part with
    keys for it takes it over exactly."""
    out = randn(67, 1, 2, 5, 32, dtype=torch.float32)
    lse = randn(68, 1, 2, 5, dtype=torch.float32)
    empty_lse = lse.clone()
    empty_lse[0, 1, 2] = -float("inf")
    for backend in ("torch", "triton"):
        state = kernels.merge_partials(None, (out, empty_lse), (out * 2, empty_lse.clone()), backend=backend)
        assert state[1][0, 1, 2] == -float("inf") and bool((state[0][0, 1, 2] == 0).all())
        assert bool(torch.isfinite(state[0]).all())
        state = kernels.merge_partials(state, (out, torch.where(torch.isinf(empty_lse), lse, -float("inf"))),
                                       backend=backend)
        torch.testing.assert_close(state[0][0, 1, 2], out[0, 1, 2])
        torch.testing.assert_close(state[1][0, 1, 2], lse[0, 1, 2])


def test_merged_partials_are_the_attention_over_all_keys():
    """Merging attention over two disjoint key sets (first state copied, never aliased) gives the
    attention over their union, on both backends."""
    q, k, v = randn(70, 1, 2, 9, 16, dtype=torch.float32), randn(71, 1, 2, 30, 16, dtype=torch.float32), randn(72, 1, 2, 30, 16, dtype=torch.float32)
    whole = partial_attention(q, k, v, 0.3)
    for backend in ("torch", "triton"):
        first = partial_attention(q, k[:, :, :11], v[:, :, :11], 0.3)
        state = kernels.merge_partials(None, first)
        assert state[0].data_ptr() != first[0].data_ptr() and state[1].data_ptr() != first[1].data_ptr()
        state = kernels.merge_partials(state, partial_attention(q, k[:, :, 11:], v[:, :, 11:], 0.3), backend=backend)
        torch.testing.assert_close(state[0], whole[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[1], whole[1], rtol=1e-6, atol=1e-5)
    with pytest.raises(BackendError, match="not fp32"):
        kernels.merge_partials((whole[0].half(), whole[1]), whole, backend="triton")


def test_partials_over_split_histories_merge_to_the_whole():
    """attention_partial over two parts of a history (as two ring ranks hold it), merged, is the
    partial over all of it, and cast, the staged attention; a history without keys is refused."""
    segments = history("qvg", seed=90, dtype=torch.float32)  # fp32 partials: the grouping only reorders fp32 sums
    q = randn(91, 1, 2, 24, 64, dtype=torch.float32)
    state = None
    for part in (segments[:1], segments[1:]):
        state = kernels.merge_partials(state, kernels.attention_partial(q, part))
    whole = kernels.attention_partial(q, segments)
    assert whole[0].dtype == whole[1].dtype == torch.float32 and whole[1].shape == q.shape[:3]
    torch.testing.assert_close(state[0], whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[1], whole[1], rtol=1e-6, atol=1e-5)
    # the staged path gathers these few keys into one buffer: one fused call, its own rounding
    torch.testing.assert_close(kernels.attention_staged(q, segments), whole[0], rtol=1e-5, atol=1e-5)
    empty = randn(92, 1, 2, 0, 64, dtype=torch.float32)
    with pytest.raises(ShapeError, match="no keys"):
        kernels.attention_partial(q, [DenseKV(empty, empty)])


@pytest.mark.parametrize("keys", [50, 51])
def test_split_keys_merge_to_the_attention_over_all_keys(keys):
    """sdpa_split's pieces (KEY_SPLIT batch entries in one call; one piece for keys that do not
    divide), merged, are the fp32 attention over every key: two batch rows, 4 query heads on 2."""
    q = randn(80, 2, 4, 33, 64)
    k, v = randn(81, 2, 2, keys, 64, dtype=q.dtype), randn(82, 2, 2, keys, 64, dtype=q.dtype)
    parts = sdpa_split(q, k, v, 0.2)
    assert len(parts) == (KEY_SPLIT if keys % KEY_SPLIT == 0 else 1)
    state = None
    for part in parts:
        assert part[0].shape == q.shape and part[1].shape == q.shape[:3]
        state = kernels.merge_partials(state, part)
    ref_out, ref_lse = partial_attention(q, k, v, 0.2)
    tol = 2**-7
    assert (state[1] - ref_lse).abs().max() <= tol * ref_lse.abs().max()
    assert (state[0] - ref_out).abs().max() <= tol * ref_out.abs().max()


def test_dispatch_and_bad_inputs():
    segments = history("rtn", span=64)
    with pytest.raises(BackendError, match="float32"):
        kernels.attention(randn(1, 1, 2, 8, 64, dtype=torch.float32), segments, backend="triton", method="fused")
    q = randn(1, 1, 2, 8, 64)
    if DEVICE == "cpu":  # auto uses the reference off the GPU
        assert torch.equal(kernels.attention(q, segments), kernels.attention(q, segments, backend="torch"))
    with pytest.raises(ShapeError, match="no keys"):
        kernels.attention(q, [])
    with pytest.raises(ShapeError, match="multiple"):
        kernels.attention(randn(1, 1, 3, 8, 64), segments)
    with pytest.raises(ShapeError, match=r"\[1, 2, 24, 64\]"):
        kernels.attention(randn(1, 1, 2, 8, 32), segments)
    with pytest.raises(DTypeError):
        kernels.attention(q.to(torch.int32), segments)


@pytest.mark.skipif(DEVICE != "cuda", reason="full shapes need a GPU")
@pytest.mark.parametrize("name", PRESETS)
def test_full_wan_shapes_on_the_gpu(name):
    """12 heads x 128, a 9,360-token span (2 chunks of 1,560 x 3), a 4,680-token query chunk."""
    pol = qkv.build_policy(name)
    k, v = randn(20, 1, 12, 9360, 128, scale=2.0), randn(21, 1, 12, 9360, 128)
    tail = DenseKV(randn(22, 1, 12, 4680, 128), randn(23, 1, 12, 4680, 128))
    segments = [CompressedSpan(pol.compress(k, v), 100), tail]
    q = randn(24, 1, 12, 4680, 128)
    assert_within_twice_the_torch_error(kernels.attention(q, segments, backend="triton", method="fused"), q, segments)
    if name == "qvg":
        assert_within_twice_the_torch_error(kernels.attention_staged(q, segments), q, segments, True)


@pytest.mark.skipif(DEVICE != "cuda", reason="shared-memory limits are a GPU's")
def test_a_layout_too_big_for_the_first_tiles_takes_the_next():
    """Tiles that need more shared memory than any GPU has are skipped for the next configuration."""
    from qkv.kernels.triton.attention import attention_triton

    segments = history("qvg-pro", seed=50, d=128)
    q = randn(51, 1, 2, 48, 128)
    out = attention_triton(q, segments, tiles=((128, 256, 8, 6, 6), (128, 64, 8, 2, 2)))
    assert_within_twice_the_torch_error(out, q, segments)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decompress_into_a_slice_of_a_longer_buffer(name, backend):
    pol = policy(name, 64)
    ckv = pol.compress(randn(40, 2, 2, 70, 64, scale=2.0), randn(41, 2, 2, 70, 64))
    buf = randn(42, 2, 2, 100, 64)
    before = buf.clone()
    got = kernels.decompress(ckv.k, out=buf[:, :, 20:90], backend=backend)
    assert got.data_ptr() == buf[:, :, 20:90].data_ptr()
    assert torch.equal(buf[:, :, 20:90], kernels.decompress(ckv.k, backend=backend))
    assert torch.equal(buf[:, :, :20], before[:, :, :20]) and torch.equal(buf[:, :, 90:], before[:, :, 90:])


def test_decompress_rejects_a_wrong_out():
    ckv = policy("qvg", 64).compress(randn(43, 1, 2, 70, 64), randn(44, 1, 2, 70, 64))
    with pytest.raises(ShapeError, match="shape"):
        kernels.decompress(ckv.k, out=torch.empty(1, 2, 69, 64, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(DTypeError, match="dtype"):
        kernels.decompress(ckv.k, out=torch.empty(1, 2, 70, 64, device=DEVICE))
    with pytest.raises(ShapeError, match="unit stride"):
        kernels.decompress(ckv.k, out=torch.empty(1, 2, 64, 70, dtype=torch.bfloat16, device=DEVICE).transpose(2, 3))


def test_span_groups_cut_consecutive_spans_at_the_limit():
    pol = policy("qvg", 64)
    spans = [CompressedSpan(pol.compress(randn(s, 1, 2, n, 64), randn(s + 1, 1, 2, n, 64)), skip)
             for s, (n, skip) in enumerate([(30, 0), (30, 5), (40, 0), (90, 0), (10, 0)])]
    groups = span_groups(spans, limit=60)
    index = {id(sp): i for i, sp in enumerate(spans)}
    assert [[index[id(sp)] for sp in g.spans] for g in groups] == [[0, 1], [2], [3], [4]]
    assert [g.tokens for g in groups] == [55, 40, 90, 10]
    k, v = groups[0].materialize()
    ref = materialized(spans[:2])
    assert torch.equal(k, ref[0]) and torch.equal(v, ref[1])


def test_a_grown_plan_reuses_the_staged_groups_it_shares():
    """A cache adds a span a chunk: the plan made then keeps the staged groups whose spans did not
    change (their tables too) and the records every group built, so only the newest group is new."""
    pol = policy("qvg", 64)
    spans = [CompressedSpan(pol.compress(randn(70 + s, 1, 2, 30, 64), randn(80 + s, 1, 2, 30, 64))) for s in range(5)]
    plan = SpanPlan(spans[:3])
    first = plan.staged(60)
    assert [len(g.spans) for g in first] == [2, 1]
    k, v = first[0].materialize()
    kernels.decompress_spans(first[0], k, v, backend="triton")  # builds records and the span table
    assert set(plan._records) == {id(sp.ckv) for sp in spans[:2]}
    grown = SpanPlan(spans[:4], previous=plan)
    assert set(grown._records) == set(plan._records)
    groups = grown.staged(60)
    assert groups[0] is first[0] and groups[1] is not first[1] and [len(g.spans) for g in groups] == [2, 2]
    assert grown.staged(60) is groups and not grown._inherited
    evicted = SpanPlan(spans[1:4], previous=grown)  # the oldest span left: nothing is kept whole
    assert all(g is not h for g in evicted.staged(60) for h in groups)
    assert set(evicted._records) == {id(spans[1].ckv)}
    ref = materialized(spans[1:4])
    out = [torch.cat(t, 2) for t in zip(*(g.materialize() for g in evicted.staged(60)))]
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def mixed_plan(dtype) -> SpanPlan:
    """One plan of spans of three layouts (two launches), per-token and per-channel codes, four
    stages, full-precision tokens (kivi's window), partly evicted spans."""
    specs = [("qvg", 100, 0), ("qvg-pro", 70, 9), ("kivi", 170, 33), ("qvg", 30, 0), ("rtn", 64, 63)]
    return SpanPlan([CompressedSpan(policy(name, 64).compress(randn(120 + i, 2, 2, n, 64, dtype=dtype, scale=3.0),
                                                              randn(130 + i, 2, 2, n, 64, dtype=dtype)), skip)
                     for i, (name, n, skip) in enumerate(specs)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decompress_spans_kernel_is_bit_exact(dtype):
    """On :func:`mixed_plan`'s spans the Triton kernel writes exactly the reference's values where
    they belong, and builds its table once (checked in bf16)."""
    plan = mixed_plan(dtype)
    ref = plan.materialize("torch")
    assert ref[0].shape == (2, 2, plan.tokens, 64)
    assert all(torch.equal(r, m) for r, m in zip(ref, materialized(plan.spans)))
    k, v = torch.full_like(ref[0], float("nan")), torch.full_like(ref[1], float("nan"))
    kernels.decompress_spans(plan, k, v, backend="triton")
    assert torch.equal(k, ref[0]) and torch.equal(v, ref[1])
    if dtype == torch.bfloat16:
        tables = dict(plan._tables)
        kernels.decompress_spans(plan, k, v, backend="triton")
        assert plan._tables == tables


def test_decompress_spans_kernel_is_bit_exact_at_other_launches():
    """Work items of 48 keys in tiles of 16 (items that start inside a tile), K and V by one
    program or by programs of their own: the same values (one dtype: where items start does not
    depend on it)."""
    from qkv.kernels.triton.decompress import decompress_spans_triton
    from qkv.kernels.triton.tiles import DecompressTile

    plan = mixed_plan(torch.bfloat16)
    ref = plan.materialize("torch")
    for split in (False, True):
        k, v = torch.full_like(ref[0], float("nan")), torch.full_like(ref[1], float("nan"))
        decompress_spans_triton(plan, k, v, tile=DecompressTile(piece=48, block_n=16, warps=2, split=split))
        assert torch.equal(k, ref[0]) and torch.equal(v, ref[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decompress_spans_kernel_rotates_back(dtype):
    """Hadamard-rotated spans (quarot) among others in one plan, one partly evicted: the kernel
    rotates each decoded tile back before its rounding. Its rotation sums in another order than
    the reference's butterfly: every value within an output rounding of the reference's, plus the
    tile product's ~2^-16 of the values' magnitude (bits.hadamard_dot)."""
    specs = [("quarot", 40, 0), ("rtn", 24, 0), ("quarot", 70, 17)]
    spans = [CompressedSpan(policy(name, 64).compress(randn(150 + i, 2, 2, n, 64, dtype=dtype, scale=3.0),
                                                      randn(160 + i, 2, 2, n, 64, dtype=dtype)), skip)
             for i, (name, n, skip) in enumerate(specs)]
    plan = SpanPlan(spans)
    ref = materialized(spans)
    k, v = torch.full_like(ref[0], float("nan")), torch.full_like(ref[1], float("nan"))
    kernels.decompress_spans(plan, k, v, backend="triton")
    eps = torch.finfo(dtype).eps
    for got, want in zip((k, v), ref):
        torch.testing.assert_close(got, want, rtol=eps, atol=2**-14 * want.abs().max().item())
    for rotated in ((True, True), (True, False)):  # left in the stored basis: bit for bit the reference's
        want = plan.materialize("torch", rotated)
        kernels.decompress_spans(plan, k, v, backend="triton", rotated=rotated)
        assert torch.equal(k, want[0]) and torch.equal(v, want[1])
        assert not torch.equal(want[0][:, :, :40], ref[0][:, :, :40])
        assert torch.equal(want[1], ref[1]) != rotated[1]


@pytest.mark.parametrize("method", ["decode", "fused", "staged"])
def test_rotated_span_with_full_precision_tokens(method):
    """A rotated span that keeps its newest tokens in full precision (quarot with a window): the
    kernels meet rotated keys with rotated queries and take those tokens, stored unrotated, into
    the stored basis in the span's last tiles; the span decompression writes them as stored. Each
    path is read by the kernels themselves (no span left to the reference) and attends as the
    reference does."""
    span = CompressedSpan(qkv.build_policy("quarot", window=24).compress(randn(170, 1, 2, 96, 64, scale=2.0),
                                                                         randn(171, 1, 2, 96, 64)))
    q = randn(172, 1, 4, 8, 64)
    assert span.ckv.k.quantized_tokens == 72 and span_support(span, q) is None
    segments = [span, DenseKV(randn(173, 1, 2, 5, 64), randn(174, 1, 2, 5, 64))]
    out = kernels.attention(q, segments, method=method, backend="triton")
    assert_within_twice_the_torch_error(out, q, segments, rounded_partials=True)


def test_decompress_spans_checks_and_falls_back():
    spans = [CompressedSpan(qkv.build_policy("quarot", window=8).compress(randn(140, 1, 2, 40, 64),
                                                                          randn(141, 1, 2, 40, 64)))]
    plan = SpanPlan(spans)
    k, v = torch.empty(1, 2, 40, 64, dtype=torch.bfloat16, device=DEVICE), torch.empty(1, 2, 40, 64, dtype=torch.bfloat16, device=DEVICE)
    ref = materialized(spans)
    kernels.decompress_spans(plan, k, v, backend="triton")  # quantized tokens rotated back, the window as stored
    for got, want in zip((k, v), ref):
        assert torch.equal(got[:, :, 32:], want[:, :, 32:])
        torch.testing.assert_close(got, want, rtol=2**-8, atol=2**-14 * want.abs().max().item())
    # left in the stored basis: the full-precision tokens, stored unrotated, rotated into it
    want = plan.materialize("torch", (True, False))
    fp = spans[0].ckv.k.fp_tokens
    assert torch.equal(want[0][:, :, 32:], kernels.hadamard(fp.float(), backend="torch").to(fp.dtype))
    assert torch.equal(want[1], ref[1])
    kernels.decompress_spans(plan, k, v, rotated=(True, False), backend="triton")
    assert torch.equal(k[:, :, :32], want[0][:, :, :32]) and torch.equal(v, want[1])
    torch.testing.assert_close(k, want[0], rtol=torch.finfo(k.dtype).eps, atol=2**-14 * want[0].abs().max().item())
    with pytest.raises(ShapeError, match="two bools"):
        kernels.decompress_spans(plan, k, v, rotated=(True,))
    deep = [CompressedSpan(qkv.build_policy("qvg-pro", stages=LAUNCH_STAGES + 1, clusters=4, iters=1).compress(
        randn(142, 1, 2, 40, 64), randn(143, 1, 2, 40, 64)))]
    with pytest.raises(BackendError, match="smoothing stages"):
        kernels.decompress_spans(SpanPlan(deep), k, v, backend="triton")
    kernels.decompress_spans(SpanPlan(deep), k, v)  # "auto" takes the reference
    assert all(torch.equal(a, b) for a, b in zip((k, v), materialized(deep)))
    with pytest.raises(ShapeError, match="shape"):
        kernels.decompress_spans(plan, k[:, :, :39], v)
    with pytest.raises(DTypeError, match="dtype"):
        kernels.decompress_spans(plan, k.half(), v)
    with pytest.raises(ShapeError, match="no span"):
        kernels.decompress_spans(SpanPlan([]), k, v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_staged_over_a_short_window_is_one_fused_call(monkeypatch, backend):
    """Keys that fit STAGE_TOKENS (a sink, spans partly evicted, a chunk) are gathered into one
    buffer, bit for bit the segments' own keys, and attended to by one fused call: no merge."""
    pol = policy("qvg", 64)
    spans = [CompressedSpan(pol.compress(randn(80 + s, 1, 2, 24, 64, scale=2.0), randn(90 + s, 1, 2, 24, 64)),
                            5 if s == 1 else 0) for s in range(3)]
    segments = [DenseKV(randn(73, 1, 2, 16, 64), randn(74, 1, 2, 16, 64)), SpanPlan(spans[:2]), spans[2],
                DenseKV(randn(75, 1, 2, 0, 64), randn(76, 1, 2, 0, 64)), DenseKV(randn(77, 1, 2, 9, 64), randn(78, 1, 2, 9, 64))]
    k, v = attention_module.gather(segments, backend)
    for got, want in zip((k, v), (torch.cat(t, 2) for t in zip(*[s.materialize("torch") for s in segments]))):
        assert torch.equal(got, want)
    calls, merges = [], []
    original = attention_module.sdpa_with_lse
    monkeypatch.setattr(attention_module, "sdpa_with_lse", lambda q, k, v, s: calls.append(k.shape[2]) or original(q, k, v, s))
    merge = kernels.merge_partials
    monkeypatch.setattr(kernels, "merge_partials", lambda *a, **kw: merges.append(1) or merge(*a, **kw))
    q = randn(79, 1, 4, 20, 64)  # two query heads a KV head
    out = kernels.attention_staged(q, segments, backend=backend)
    assert calls == [16 + 24 + 19 + 24 + 9] and not merges
    assert_within_twice_the_torch_error(out, q, segments, True)
    q32 = q.float()  # keys of another dtype than the queries: the staged groups, merged
    kernels.attention_staged(q32, segments, backend=backend)
    assert merges


@pytest.mark.parametrize("spec, window, rotated", [("quarot", 0, (True, True)), ("quarot", 8, (True, True)),
                                                   ("k:hadamard,int2(block=16);v:int2(block=16)", 0, (True, False)),
                                                   ("k:int2(block=16);v:hadamard,int2(block=16)", 0, (False, True))])
def test_staged_reads_rotated_groups_in_their_stored_basis(monkeypatch, spec, window, rotated):
    """Past STAGE_TOKENS, a group of Hadamard-rotated spans is decompressed without its rotations
    undone (``window``: each span's full-precision tokens rotated into that basis), its keys
    attended to by the rotated queries, its output rotated back; a group that also holds an
    unrotated span is decompressed whole. Within twice the error of decompress + SDPA."""
    pol = qkv.build_policy(spec, window=window)
    spans = [CompressedSpan(pol.compress(randn(80 + s, 1, 2, 48, 64, scale=2.0), randn(90 + s, 1, 2, 48, 64)),
                            5 if s == 1 else 0) for s in range(3)]
    spans.append(CompressedSpan(policy("rtn", 64).compress(randn(99, 1, 2, 32, 64), randn(98, 1, 2, 32, 64))))
    segments = [DenseKV(randn(70, 1, 2, 16, 64), randn(71, 1, 2, 16, 64)), SpanPlan(spans)]
    q = randn(72, 1, 4, 20, 64)
    bases = []
    original = kernels.decompress_spans
    monkeypatch.setattr(attention_module, "STAGE_TOKENS", 100)
    monkeypatch.setattr(kernels, "decompress_spans", lambda *a, rotated, **kw: bases.append(rotated) or original(*a, rotated=rotated, **kw))
    out = kernels.attention_staged(q, segments)
    assert bases == [rotated, (False, False)]  # groups of 48 + 43 and 48 + 32 keys
    assert_within_twice_the_torch_error(out, q, segments, True)


def test_staged_over_many_short_spans_groups_them(monkeypatch):
    pol = policy("qvg", 64)
    spans = [CompressedSpan(pol.compress(randn(50 + s, 1, 2, 24, 64, scale=2.0), randn(60 + s, 1, 2, 24, 64)),
                            3 if s == 2 else 0) for s in range(6)]
    segments = [DenseKV(randn(70, 1, 2, 16, 64), randn(71, 1, 2, 16, 64)), *spans]
    q = randn(72, 1, 2, 20, 64)
    calls, merged = [], []
    original, merge = attention_module.sdpa_split, kernels.merge_partials
    monkeypatch.setattr(attention_module, "STAGE_TOKENS", 50)
    monkeypatch.setattr(attention_module, "sdpa_split", lambda q, k, v, s: calls.append(k.shape[2]) or original(q, k, v, s))
    monkeypatch.setattr(kernels, "merge_partials", lambda state, *parts, **kw: merged.append(len(parts)) or merge(state, *parts, **kw))
    out = kernels.attention_staged(q, segments)
    assert calls == [16, 48, 45, 48]  # the dense keys, then groups of at most 50 keys
    # 7 partial results (the dense keys, 45 keys in one piece), folded in MERGE_PARTS at a time
    assert merged == [attention_module.MERGE_PARTS, 7 - attention_module.MERGE_PARTS]
    assert_within_twice_the_torch_error(out, q, segments, True)
