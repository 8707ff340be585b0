"""qkv.kernels.triton.launch: a kernel launched again goes to its compiled kernel directly, under a
key that tells apart at least what Triton's own specialization does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from triton.runtime.errors import OutOfResources

from qkv.kernels.triton import decode_kernel as kernels
from qkv.kernels.triton.decompress import decompress_kernel
from qkv.kernels.triton.hadamard import _hadamard_kernel
from qkv.kernels.triton.launch import Launcher
from qkv.kernels.triton.merge import _merge_kernel as staged_merge_kernel


def jit_of(fn):
    """The Triton JIT function of ``fn`` (the tests may run interpreted: then rebuilt as the JIT
    would build it, for its parameters and binder)."""
    from triton.runtime.jit import JITFunction

    return fn if hasattr(fn, "params") else JITFunction(fn.fn, **fn.kwargs)


def triton_key(jit, args: tuple, kwargs: dict) -> str:
    """Triton's own cache key of a launch (its binder and key function for the CUDA backend)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    binder = create_function_from_signature(jit.signature, jit.params, CUDABackend)
    _, specialization, options = binder(*args, **kwargs, debug=False, instrumentation_mode="")
    return compute_cache_key({}, specialization, options)


BASES = {dtype: torch.zeros(4096, dtype=dtype) for dtype in (torch.bfloat16, torch.float32)}
INTS = st.sampled_from([0, 1, 2, 15, 16, 17, 32, 4096, 4097, 2**31 - 16, 2**31, 2**31 + 1, 2**40, -16, -17])


def value(draw, p):
    """A runtime argument for parameter ``p``: a tensor at a varied address and dtype, a float, or
    an integer of any class Triton tells apart."""
    if p.name.endswith("_ptr") or p.name in ("dk0", "dv0", "dk1", "dv1"):
        dtype = draw(st.sampled_from(list(BASES)))
        return BASES[dtype][draw(st.sampled_from([0, 1, 2, 4, 8, 16])):]  # aligned to 16 bytes or not
    if p.name == "qk_scale":
        return draw(st.sampled_from([0.5, 1.0]))
    return draw(INTS)


@st.composite
def two_launches(draw, jit):
    """Runtime arguments for every parameter of ``jit``, and the same with a few of them redrawn."""
    params = [p for p in jit.params if not p.is_constexpr]
    a = [value(draw, p) for p in params]
    b = list(a)
    for i in draw(st.lists(st.integers(0, len(params) - 1), max_size=3)):
        b[i] = value(draw, params[i])
    return tuple(a), tuple(b)


def constexprs(jit) -> dict:
    return {p.name: 16 for p in jit.params if p.is_constexpr} | {"num_warps": 4}


@pytest.mark.parametrize("fn", [kernels.decode_kernel, kernels.merge_kernel, decompress_kernel, staged_merge_kernel,
                                _hadamard_kernel], ids=["decode", "merge", "decompress", "staged merge", "hadamard"])
@given(data=st.data())
def test_one_key_of_the_launcher_is_one_key_of_triton(fn, data):
    """Two launches that the launcher would give one compiled kernel are one to Triton too: its
    key is at least as fine as Triton's specialization, on the parameters of every kernel it
    launches (the decode path's two, the staged path's span decompression and merge; which
    integers they leave unspecialized included). The second launch is the first with a few
    arguments redrawn, so that both outcomes come up."""
    jit = jit_of(fn)
    kwargs = constexprs(jit)
    a, b = data.draw(two_launches(jit))
    launcher = Launcher(jit)
    launcher._pick(a)
    if tuple(map(type, a)) == tuple(map(type, b)) and launcher.key(a, kwargs) == launcher.key(b, kwargs):
        assert triton_key(jit, a, kwargs) == triton_key(jit, b, kwargs)


class Param:
    def __init__(self, name: str, constexpr: bool = False, unspecialized: bool = False) -> None:
        self.name, self.is_constexpr, self.do_not_specialize = name, constexpr, unspecialized


class FakeJIT:
    """A JIT function with the parameters (x_ptr, n, count: unspecialized, scale, BLOCK: constexpr)
    whose launches are recorded; it returns a compiled kernel whose launches are recorded too."""

    params = [Param("x_ptr"), Param("n"), Param("count", unspecialized=True), Param("scale"),
              Param("BLOCK", constexpr=True)]

    def __init__(self) -> None:
        self.jit_launches, self.direct_launches, self.too_large = [], [], False

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.too_large:
                raise OutOfResources(1 << 20, 1 << 17, "shared memory")
            self.jit_launches.append((grid, args, kwargs))
            return Compiled(self)

        return launch


class Compiled:
    def __init__(self, jit: FakeJIT) -> None:
        self.jit = jit

    def __getitem__(self, grid):
        return lambda *args: self.jit.direct_launches.append((grid, args))


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return FakeJIT()


def test_a_launch_seen_before_goes_to_the_compiled_kernel(fake):
    """The first launch of a key goes through the JIT; the same key again launches the compiled
    kernel with every parameter in order (the constexprs from the keywords); a new class of a
    specialized integer or a tensor's alignment is a new key, a new value of an unspecialized
    integer is not (its class is its range alone), one beyond 32 bits is never kept."""
    launcher = Launcher(fake)
    x = torch.zeros(64)
    launcher[(2,)](x, 16, 5, 0.5, BLOCK=32, num_warps=4)
    launcher[(3,)](x, 16, 6, 0.25, BLOCK=32, num_warps=4)
    assert len(fake.jit_launches) == 1
    # a compiled kernel's launch reads all three grid sizes
    assert fake.direct_launches == [((3, 1, 1), (x, 16, 6, 0.25, 32))]
    launcher[(3,)](x[1:], 16, 6, 0.25, BLOCK=32, num_warps=4)  # misaligned
    launcher[(3,)](x, 17, 6, 0.25, BLOCK=32, num_warps=4)  # another value of a specialized integer
    launcher[(3,)](x, 16, 6, 0.25, BLOCK=64, num_warps=4)  # another constexpr
    launcher[(3,)](x, 16, 6, 0.25, BLOCK=32, num_warps=8)  # another launch option
    launcher[(3,)](x.double(), 16, 6, 0.25, BLOCK=32, num_warps=4)  # another dtype
    assert len(fake.jit_launches) == 6 and len(fake.direct_launches) == 1
    for _ in range(2):
        launcher[(3,)](x, 16, 2**33, 0.25, BLOCK=32, num_warps=4)  # 64-bit: through the JIT every time
    assert len(fake.jit_launches) == 8
    launcher[(3,)](x, 16, 7, 1, BLOCK=32, num_warps=4)  # an int where a float was: not kept
    launcher[(3,)](x, 16, 7, 1, BLOCK=32, num_warps=4)
    launcher[(3,)](5, 16, 7, 0.25, BLOCK=32, num_warps=4)  # an int where a tensor was: through the JIT
    launcher[(3,)](x, 16, 7, 0.25, BLOCK=[32], num_warps=4)  # an unhashable keyword: through the JIT
    assert len(fake.jit_launches) == 12 and len(fake.direct_launches) == 1


def test_a_kernel_with_a_constexpr_among_its_runtime_arguments_is_refused():
    """Positional arguments are the runtime ones and constexprs come by keyword, so a kernel whose
    constexprs are not its last parameters would be launched with its arguments shifted."""
    jit = FakeJIT()
    jit.params = [Param("x_ptr"), Param("BLOCK", constexpr=True), Param("n")]
    with pytest.raises(TypeError, match="constexpr before a runtime argument"):
        Launcher(jit)


def test_a_kernel_too_large_for_the_device_raises_again_without_the_jit(fake):
    """OutOfResources (raised before anything ran) is kept for its key: the next launch of that
    key raises it at once, so a caller that falls back to a smaller pipeline does not compile
    and check the large one again at every call."""
    launcher = Launcher(fake)
    fake.too_large = True
    x = torch.zeros(64)
    for _ in range(2):
        with pytest.raises(OutOfResources):
            launcher[(1,)](x, 16, 5, 0.5, BLOCK=32, num_warps=4, num_stages=3)
    assert fake.jit_launches == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
def test_the_decode_path_launches_compiled_kernels_with_the_jit_result(monkeypatch):
    """On a GPU: a decoding loop launches the decode and merge kernels through the JIT once each
    and directly after that, with results equal to launches through the JIT every time."""
    import qkv
    from qkv.kernels.triton import decode as host

    gen = torch.Generator(device="cuda").manual_seed(3)
    layer = qkv.KVCache("kivi", num_layers=1).layer(0)
    layer.append(*(torch.randn(1, 2, 256, 64, device="cuda", generator=gen).bfloat16() for _ in range(2)))
    q = torch.randn(1, 4, 1, 64, device="cuda", generator=gen).bfloat16()
    jit_calls = []
    for name in ("decode_kernel", "merge_kernel"):
        launcher = Launcher(getattr(kernels, name))
        real = launcher.jit

        class Counted:
            params = real.params

            def __getitem__(self, grid, real=real, name=name):
                jit_calls.append(name)
                return real[grid]

        launcher.jit = Counted()
        monkeypatch.setattr(host, name, launcher)
    for _ in range(40):
        token = torch.randn(1, 2, 1, 64, device="cuda", generator=gen).bfloat16()
        layer.append(token, token)
        direct = host.decode_triton(q, layer.attention_segments())
        with monkeypatch.context() as m:
            m.setattr(host, "decode_kernel", kernels.decode_kernel)
            m.setattr(host, "merge_kernel", kernels.merge_kernel)
            through_jit = host.decode_triton(q, layer.attention_segments())
        assert torch.equal(direct, through_jit)
    assert sorted(set(jit_calls)) == ["decode_kernel", "merge_kernel"] and len(jit_calls) <= 4
