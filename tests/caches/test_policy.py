import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from qkv import errors
from qkv.quantizers import AffineQuantizer, CastQuantizer, I32LSBPacker


def kv(shape=(1, 2, 300, 64), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(shape[0], shape[1], 8, shape[3], generator=gen) * 4
    labels = torch.randint(0, 8, shape[:3], generator=gen)
    k = torch.gather(centres, 2, labels.unsqueeze(-1).expand(*shape)) + torch.randn(shape, generator=gen)
    return k.to(dtype), torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("name", qkv.list_policies())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_preset_roundtrips_shape_dtype(name, dtype):
    policy = qkv.build_policy(name, **({"clusters": 16, "iters": 3} if "qvg" in name else {}))
    k, v = kv(dtype=dtype)
    ckv = policy.compress(k, v)
    k_hat, v_hat = policy.decompress(ckv)
    assert k_hat.shape == k.shape and k_hat.dtype == dtype and v_hat.dtype == dtype
    assert bool(torch.isfinite(k_hat).all()) and bool(torch.isfinite(v_hat).all())
    assert ckv.nbytes == sum(ckv.component_nbytes().values())
    if name == "bf16":
        assert torch.equal(k_hat, k.bfloat16().to(dtype))


def test_compression_is_deterministic():
    k, v = kv()
    policy = qkv.build_policy("qvg-pro", clusters=16)
    a, b = policy.compress(k, v), policy.compress(k, v)
    for (name, x), y in zip(a.k.tensors().items(), b.k.tensors().values()):
        assert torch.equal(x, y), name


def test_nbytes_matches_the_paper_formula():
    """bits/element = bits + 8/B + 8T/D + 16 T C / S for QVG (fp8 scales, uint8 assignments)."""
    k, v = kv(shape=(1, 2, 4096, 128))
    for preset, t, block in (("qvg", 1, 64), ("qvg-pro", 4, 16)):
        ckv = qkv.build_policy(preset, iters=1).compress(k, v)
        bpe = 2 + 8 / block + 8 * t / 128 + 16 * t * 256 / 4096
        mult_bits = 32 / (4096 * 128)  # one fp32 power-of-two multiplier per (batch, head)
        assert ckv.k.bits_per_element == pytest.approx(bpe + mult_bits)


def test_kivi_window_and_channel_groups():
    k, v = kv(shape=(1, 2, 300, 64))
    policy = qkv.build_policy("kivi")
    ckv = policy.compress(k, v)
    assert ckv.k.quantized_tokens == 160 and ckv.k.fp_tokens.shape[2] == 140  # (300-128)//32*32
    assert ckv.v.quantized_tokens == 172
    k_hat, v_hat = policy.decompress(ckv)
    assert torch.equal(k_hat[:, :, 160:], k[:, :, 160:]) and torch.equal(v_hat[:, :, 172:], v[:, :, 172:])
    short = policy.compress(k[:, :, :100], v[:, :, :100])
    assert short.k.codes is None and torch.equal(policy.decompress(short)[0], k[:, :, :100])


def test_warm_start_uses_previous_centroids():
    k, v = kv(seed=1)
    policy = qkv.build_policy("qvg", clusters=8, iters=0)
    first = policy.compress(k, v)
    warm = policy.compress(k, v, warm_start=first)
    cold = policy.compress(k, v)
    k_first = (policy.decompress(first)[0] - k).square().sum()
    k_warm = (policy.decompress(warm)[0] - k).square().sum()
    assert torch.equal(cold.k.codes, first.k.codes)
    assert not torch.equal(warm.k.stages[0].centroids, first.k.stages[0].centroids) or k_warm <= k_first


@pytest.mark.parametrize(
    "k_v, error, match",
    [
        (lambda k, v: (k.clone().index_put_((torch.tensor([0]),) * 4, torch.tensor(float("nan"))), v), errors.NonFiniteError, "NaN"),
        (lambda k, v: (k, v.clone().fill_(float("inf"))), errors.NonFiniteError, "v holds"),
        (lambda k, v: (k[0], v[0]), errors.ShapeError, "rank 4"),
        (lambda k, v: (k, v[:, :, :10]), errors.ShapeError, "differ"),
        (lambda k, v: (k.int(), v.int()), errors.DTypeError, "int32"),
        (lambda k, v: (k.double(), v.double()), errors.DTypeError, "float64"),
        (lambda k, v: (k[:, :, :0], v[:, :, :0]), errors.ShapeError, "tokens"),
        (lambda k, v: (k, v.to("meta")), errors.DeviceError, "meta"),
        (lambda k, v: (k / k.abs().max() * 2.0**122, v), errors.ValueRangeError, "2\\*\\*120"),
        (lambda k, v: (k.numpy(), v), errors.DTypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_typed_errors(k_v, error, match):
    k, v = k_v(*kv())
    with pytest.raises(error, match=match):
        qkv.build_policy("qvg").compress(k, v)


@pytest.mark.parametrize("name", ["qvg-pro", "rtn", "quarot", "bf16"])
def test_keys_and_values_in_one_pass_equal_two_passes(name, tmp_path):
    """A policy whose keys and values share one tensor policy compresses them stacked along the
    batch; every stored tensor equals that of compressing each on its own (k-means warm-started, so
    no random init is drawn), owns its storage, and the span saves."""
    k, v = kv(shape=(2, 3, 200, 64), seed=4)
    policy = qkv.build_policy(name, **({"clusters": 8} if "qvg" in name else {}))
    assert policy.k == policy.v
    warm = policy.compress(k * 0.9, v * 0.9)
    joint = policy.compress(k, v, warm_start=warm)
    rows = k.shape[0] * k.shape[1]
    for name_, x, ct, prev in (("k", k, joint.k, warm.k), ("v", v, joint.v, warm.v)):
        alone = policy.k._compress(x, policy.k._warm(prev, rows), "auto")
        assert ct.shape == alone.shape and ct.quantized_tokens == alone.quantized_tokens
        assert ct.tensors().keys() == alone.tensors().keys()
        for field, t in ct.tensors().items():
            assert torch.equal(t, alone.tensors()[field]), (name_, field)
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (name_, field)
    joint.save(tmp_path / "span.safetensors")
    assert torch.equal(policy.decompress(qkv.caches.CompressedKV.load(tmp_path / "span.safetensors"))[1], policy.decompress(joint)[1])


@pytest.mark.parametrize("name", ["qvg", "qvg-pro", "kivi", "quarot"])
def test_many_pairs_in_one_pass_equal_each_compressed_alone(name):
    """compress_many stacks the pairs of one shape (warm-started or not) into one pass: every
    stored tensor equals compress() of its pair alone, random k-means init included, and owns its
    storage; pairs of other shapes, dtypes or warm starts go in passes of their own."""
    policy = qkv.build_policy(name, **({"clusters": 8} if "qvg" in name else {}))
    pairs = [kv(shape=(1, 3, 200, 64), seed=s) for s in range(3)] + [kv(shape=(2, 3, 120, 64), seed=7),
                                                                     kv(shape=(1, 3, 200, 64), dtype=torch.bfloat16, seed=8)]
    warm = policy.compress(*kv(shape=(1, 3, 200, 64), seed=9))
    warms = [None, warm, None, None, None] if "qvg" in name else None
    many = policy.compress_many(pairs, warm_starts=warms)
    for i, ((k, v), got) in enumerate(zip(pairs, many)):
        alone = policy.compress(k, v, warm_start=None if warms is None else warms[i])
        for ct, ref in ((got.k, alone.k), (got.v, alone.v)):
            assert ct.shape == ref.shape and ct.tensors().keys() == ref.tensors().keys()
            for field, t in ct.tensors().items():
                assert torch.equal(t, ref.tensors()[field]), (i, field)
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (i, field)
    with pytest.raises(errors.ConfigError, match="2 warm starts for 5 pairs"):
        policy.compress_many(pairs, warm_starts=[None, None])


def test_validate_false_skips_only_the_value_checks():
    """``validate=False`` (data already checked) skips the finite / range read-back, not the layout checks."""
    k, v = kv()
    policy = qkv.build_policy("rtn")
    bad = v.clone().fill_(float("inf"))
    with pytest.raises(errors.NonFiniteError, match="v holds"):
        policy.compress(k, bad)
    policy.compress(k, bad, validate=False)
    with pytest.raises(errors.ShapeError, match="differ"):
        policy.compress(k, v[:, :, :10], validate=False)


@pytest.mark.parametrize("name, backend", [("qvg", "auto"), ("qvg", "triton"), ("qvg-pro", "auto"), ("kivi", "auto"),
                                           ("kivi", "triton"), ("quarot", "auto"), ("bf16", "auto")])
@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the bad values
def test_a_value_check_read_after_the_encode_still_refuses_bad_values(name, backend, bad, monkeypatch):
    """Where a read-back waits (a GPU; forced here), ``compress`` queues the value check, then the
    encode, and reads the verdict last: the encode (torch twins or Triton kernels) runs on the bad
    values without failing, and the same typed error, with where the first bad value is, replaces
    its result."""
    monkeypatch.setattr(qkv.validation, "deferred", lambda t: True)
    events = []
    monkeypatch.setattr(qkv.validation.PendingCheck, "error",
                        lambda self, *a, _error=qkv.validation.PendingCheck.error: events.append("verdict") or _error(self, *a))
    monkeypatch.setattr(qkv.caches.policy.TensorPolicy, "_compress",
                        lambda self, *a, _run=qkv.caches.policy.TensorPolicy._compress, **kw: events.append("encode")
                        or _run(self, *a, **kw))
    # two Lloyd iterations: the step after the first (its convergence test) runs on bad values too
    policy = qkv.build_policy(name, **({"clusters": 16, "iters": 2} if "qvg" in name else {}))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter off a GPU

    def kv_on(seed=0):  # kivi quantizes the 32 tokens before its 128-token window
        return tuple(t.to(device) for t in kv(shape=(1, 2, 160, 64), seed=seed))

    k, v = kv_on()
    v = v.clone()
    v[0, 1, 7, 3] = {"nan": float("nan"), "inf": -float("inf"), "huge": 2.0**121}[bad]
    error, match = (errors.ValueRangeError, "v has magnitude") if bad == "huge" else (errors.NonFiniteError, r"v holds 1 NaN/Inf values \(first at index \(0, 1, 7, 3\)\)")
    with pytest.raises(error, match=match):
        policy.compress(k, v, backend=backend)
    assert events[0] == "encode" and "verdict" in events, events
    events.clear()
    with pytest.raises(error, match=match.replace("v ", "pairs\\[1\\]: v ", 1)):
        policy.compress_many([kv_on(seed=1), (k, v)], backend=backend)
    events.clear()
    with pytest.raises(error, match="x "):
        policy.k.compress(v, backend=backend)
    assert events[0] == "encode", events
    ckv = policy.compress(*kv_on(), backend=backend)  # good values: the verdict passes, the result is returned
    assert ckv.k.shape == (1, 2, 160, 64) and (name != "kivi" or ckv.k.quantized_tokens == 32)


class Reductions(TorchDispatchMode):
    """Counts the max-|x| reductions (``linalg_vector_norm``; quantization's block peaks aside) over
    at least ``numel`` values: over a whole input, or more."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __enter__(self):
        # torch imports dynamo on the first such reduction, and that import aborts inside a
        # dispatch mode (seen on a GPU machine): import it before counting
        importlib.import_module("torch._dynamo")
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.linalg_vector_norm:
            self.count += args[0].numel() >= self.numel
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["qvg", "qvg-pro", "kivi", "k:kmeans(clusters=8),centroid,int2;v:int2(block=16)",
                                  "kmeans(clusters=16,init=kmeans||),centroid,int2(block=64)"])
def test_a_checked_compression_reads_each_input_once_for_its_peaks(name):
    """The value check reduces each (batch, head) row of k and v to its max |x|, and the first
    k-means takes those for its row scale instead of reading the input again: one max-|x| pass per
    input tensor (and one per later stage's residual), and the same result as an unchecked
    compression, rows far outside the safe range (scaled by k-means) included."""
    policy = qkv.build_policy(name, **({"clusters": 8} if name.startswith("qvg") else {}))
    k, v = kv(shape=(2, 3, 256, 64), dtype=torch.bfloat16)
    k[1, 2] *= 2.0**60  # a row the k-means scales
    plain = policy.compress(k, v, validate=False)
    counted = Reductions(k.numel())
    with counted:
        checked = policy.compress(k, v)
    later_stages = sum(len(tp.format(64).stages) - 1 for tp in {policy.k: 0, policy.v: 0} if tp.format(64).stages)
    assert counted.count == 2 + later_stages  # a later stage reads its residual, which nothing else did
    for a, b in ((plain.k, checked.k), (plain.v, checked.v)):
        assert all(torch.equal(t, b.tensors()[f]) for f, t in a.tensors().items())


@pytest.mark.parametrize("name, reduced", [("qvg", 0), ("qvg-pro", 0),
                                           ("k:kmeans(clusters=8),centroid,int2;v:int2(block=16)", 1)])
def test_k_means_on_the_triton_kernels_measures_the_peaks_in_its_first_pass(name, reduced, monkeypatch):
    """With the Triton kernels, k-means from random tokens or a warm start takes each row's max |x|
    (for its row scale) from its first assignment pass, which reads every token anyway: an
    unchecked compression runs no max-|x| reduction over an input or a residual at all; a checked
    one where the check is read after the encode (a GPU; forced here) takes the check's peaks from
    that pass too, and reduces only the inputs no k-means reads (here an int2 V); all store the
    same, rows outside the safe range included."""
    monkeypatch.setattr(qkv.validation, "deferred", lambda t: True)
    read_backs = []  # the checks sent to the host: one for the measured peaks, one for the reduced
    init = qkv.validation.PendingCheck.__init__
    monkeypatch.setattr(qkv.validation.PendingCheck, "__init__",
                        lambda self, named, *a: read_backs.append(len(named)) or init(self, named, *a))
    # qvg-pro's progressive stages cut to two: k-means over the tokens, then over a residual
    overrides = {"clusters": 8, "stages": 2} if name == "qvg-pro" else {"clusters": 8} if name == "qvg" else {}
    policy = qkv.build_policy(name, **overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter off a GPU
    k, v = (t.to(device) for t in kv(shape=(1, 3, 64, 64), dtype=torch.bfloat16))
    k[0, 2] *= 2.0**60
    counted = {name: Reductions(k.numel()) for name in ("unchecked", "checked", "warm")}
    with counted["unchecked"]:
        plain = policy.compress(k, v, validate=False, backend="triton")
    with counted["checked"]:
        checked = policy.compress(k, v, backend="triton")
    with counted["warm"]:
        policy.compress(k, v, warm_start=plain, validate=False, backend="triton")
    assert [c.count for c in counted.values()] == [0, reduced, 0]
    assert read_backs == ([2] if not reduced else [1, 1])  # k and v in one read-back where one encode measured both
    for a, b in ((plain.k, checked.k), (plain.v, checked.v)):
        assert all(torch.equal(t, b.tensors()[f]) for f, t in a.tensors().items())


def test_work_that_fails_on_bad_values_blames_the_values(monkeypatch):
    """An encode that raises on values its deferred check refuses raises the check's error, chained
    to what the encode raised; on good values the encode's own error comes through."""
    monkeypatch.setattr(qkv.validation, "deferred", lambda t: True)

    def broken(self, *args):
        raise RuntimeError("the encode broke")

    monkeypatch.setattr(qkv.caches.policy.TensorPolicy, "_compress", broken)
    k, v = kv()
    with pytest.raises(errors.NonFiniteError, match="k holds") as info:
        qkv.build_policy("rtn").compress(k.clone().fill_(float("nan")), v)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="the encode broke"):
        qkv.build_policy("rtn").compress(k, v)


# head dims of real models the preset blocks (64, 32, 16) do not all divide: MiniLM and tiny
# Llamas 32, Phi-2 80, Phi-3 96, DeepSeek-V2's keys 192
HEAD_DIMS = (32, 48, 80, 96, 192)


@pytest.mark.parametrize("name", qkv.list_policies())
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_presets_take_any_head_dim_in_the_largest_block_that_divides_it(name, d):
    """A per-token block that does not divide D becomes D's largest divisor below it (64 -> 32 at
    D = 32, 48 at 96); blocks along tokens (KIVI's keys) stay. The rotation still needs a power of two."""
    policy = qkv.build_policy(name, **({"clusters": 4, "iters": 2} if "qvg" in name else {}))
    k, v = kv(shape=(1, 2, 64, d))
    if name == "quarot" and d & (d - 1):
        with pytest.raises(errors.ShapeError, match="power of two"):
            policy.compress(k, v)
        return
    ckv = policy.compress(k, v)
    for tp, ct in ((policy.k, ckv.k), (policy.v, ckv.v)):
        q = tp.quantizer
        if ct.format.codes is not None:
            want = q.block if q.axis == "channel" else max(b for b in range(1, q.block + 1) if d % b == 0)
            assert ct.format.codes.block == want
    k_hat, v_hat = policy.decompress(ckv)
    assert k_hat.shape == k.shape and bool(torch.isfinite(k_hat).all()) and bool(torch.isfinite(v_hat).all())
    assert ckv.nbytes == policy.k.predicted_nbytes(k.shape, k.dtype) + policy.v.predicted_nbytes(v.shape, v.dtype)


def test_a_block_that_divides_d_is_kept():
    """Where the block divides D nothing changes (tests/test_stored_bytes.py pins the bytes at D = 64)."""
    for d in (64, 128, 256):
        assert qkv.build_policy("qvg").k.format(d).codes.block == 64
        assert qkv.build_policy("rtn").k.format(d).codes.block == 16
    assert AffineQuantizer(bits=2, block=64).block_for(32) == 32
    assert AffineQuantizer(bits=2, block=64).block_for(96) == 48
    assert AffineQuantizer(bits=2, block=32, axis="channel").block_for(48) == 32


@pytest.mark.parametrize("name", qkv.list_policies())
def test_magnitudes_far_beyond_the_fp8_range_scale_exactly(name):
    """Scales live relative to a power-of-two multiplier per row, so compressing x * 2**e gives
    exactly the reconstruction of x times 2**e, even where x * 2**e is far outside E4M3's range."""
    k, v = kv(shape=(1, 2, 160, 64))
    policy = qkv.build_policy(name, **({"clusters": 8} if "qvg" in name else {}))
    base_k, base_v = policy.decompress(policy.compress(k, v))
    for e in (-100, -40, 40, 110):
        k_hat, v_hat = policy.decompress(policy.compress(k * 2.0**e, v * 2.0**e))
        assert torch.equal(k_hat, base_k * 2.0**e) and torch.equal(v_hat, base_v * 2.0**e), e


@pytest.mark.parametrize("name", qkv.list_policies())
def test_all_zero_input_is_exact(name):
    zeros = torch.zeros(1, 2, 160, 64, dtype=torch.bfloat16)
    policy = qkv.build_policy(name)
    k_hat, v_hat = policy.decompress(policy.compress(zeros, zeros))
    assert torch.equal(k_hat, zeros) and torch.equal(v_hat, zeros)


def test_fewer_tokens_than_clusters_is_exact_up_to_centroid_rounding():
    k, v = kv(shape=(1, 2, 10, 64))
    policy = qkv.build_policy("qvg")
    ckv = policy.compress(k, v)
    assert ckv.k.stages[0].centroids.shape == (1, 2, 10, 64)
    k_hat, _ = policy.decompress(ckv)
    assert (k_hat - k).abs().max() <= k.abs().max() * 2**-7


def test_decompress_rejects_data_of_another_policy():
    k, v = kv()
    ckv = qkv.build_policy("rtn").compress(k, v)
    with pytest.raises(errors.ConfigError, match="compressed by"):
        qkv.build_policy("quarot").decompress(ckv)


def unfused_compress(tp, x, backend):
    """TensorPolicy.compress before the fused path: the staging writes the final residual in fp32,
    then quantize_pack reads it back. Returns (rows, per-stage stored data) as [B*H, ...]."""
    from einops import rearrange

    from qkv import kernels

    s_q = tp.quantized_length(x.shape[2])
    flat = rearrange(x[:, :, :s_q], "b h s d -> (b h) s d")
    residual, stored = tp.staging.run(flat, tp.grouping, tp.smoothing, backend=backend)
    residual = residual.float()
    fmt = tp.format(x.shape[3]).codes
    rows = residual if fmt.axis == "token" else residual.transpose(1, 2)
    return kernels.quantize_pack(rows.contiguous(), fmt, backend=backend), stored


FUSION_SPECS = [
    *[(name, {"clusters": 8, "iters": 2} if "qvg" in name else {}) for name in
      ("qvg", "qvg-pro", "qvg-ref", "rtn", "kivi", "quarot")],
    ("blocks(t=1,h=2,w=2,height=4,width=5),centroid,int2(block=16)", {}),  # implicit assignments
    ("kmeans(clusters=4,iters=1),centroid,int3(block=32,axis=channel,mode=asym,scale=bf16),window(tokens=40)", {}),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec, overrides", FUSION_SPECS)
def test_fused_compress_is_bit_identical_to_the_unfused_path(spec, overrides, backend):
    """The last centroid subtraction deferred into quantize+pack changes no stored bit."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k, v = (t.bfloat16().to(device) for t in kv(shape=(1, 2, 160, 64), seed=3))
    policy = qkv.build_policy(spec, **overrides)
    for tp, x in ((policy.k, k), (policy.v, v)):
        ct = tp.compress(x, backend=backend)
        rows, stored = unfused_compress(tp, x, backend)
        fused = [ct.codes, ct.scales, ct.zeros, ct.scale_mult]
        for a, b in zip(fused, [rows.codes, rows.scales, rows.zeros, rows.mult]):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a.flatten(0, 1).view(torch.uint8), b.view(torch.uint8))
        assert len(ct.stages) == len(stored)
        for st, pair in zip(ct.stages, stored):
            for a, b in zip((st.centroids, st.assignments), pair):
                assert (a is None and b is None) or torch.equal(a.flatten(0, 1), b)


# -- errors that name the problem ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("qvg ", "remove the blanks around the preset 'qvg'"),
        ("qvg_pro", "did you mean 'qvg-pro'\\? presets: qvg, qvg-pro"),
        ("QVG", "did you mean 'qvg'"),
    ],
)
def test_a_misspelt_preset_names_the_preset(name, message):
    with pytest.raises(errors.UnknownComponentError, match=message):
        qkv.build_policy(name)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: qkv.build_policy("qvg", seed=2**64), "seed must be an integer \\[0, 9223372036854775807\\]"),
        (lambda: qkv.build_policy("faiss,centroid,int2", seed=2**40), "seed must be an integer \\[0, 2147483647\\]"),
        (lambda: qkv.build_policy("qvg", stages=True), "stages must be an integer"),
        (lambda: qkv.build_policy("qvg", stages=1.0), "stages must be an integer"),
        (lambda: qkv.build_policy("bf16,i32lsb"), "bf16 stores floats, it takes no packing \\(i32lsb\\)"),
        (lambda: qkv.build_policy("kmeans(tol=nan),centroid,int2"), "tol must be a finite number"),
        (lambda: qkv.build_policy("kmeans(tol=inf),centroid,int2"), "tol must be a finite number"),
        (lambda: qkv.Policy("int2", "int2"), "Policy: k must be TensorPolicy, got str"),
        (lambda: qkv.TensorPolicy("int2"), "quantizer must be Quantizer, got str"),
        (lambda: qkv.TensorPolicy(AffineQuantizer(bits=2), grouping="kmeans"), "grouping must be Grouper"),
        (lambda: qkv.TensorPolicy(CastQuantizer(), packing=I32LSBPacker()), "takes no packing"),
    ],
)
def test_bad_configurations_fail_at_build_time(build, message):
    with pytest.raises(errors.ConfigError, match=message):
        build()


def test_bad_arguments_to_compress_and_decompress_are_typed_errors():
    policy = qkv.build_policy("rtn")
    k = torch.randn(1, 2, 16, 64)
    ckv = policy.compress(k, k)
    with pytest.raises(errors.ConfigError, match="warm_start must be CompressedKV or None, got CompressedTensor"):
        policy.compress(k, k, warm_start=ckv.k)
    with pytest.raises(errors.ConfigError, match="warm_start must be CompressedTensor or None"):
        policy.k.compress(k, warm_start=ckv)
    with pytest.raises(errors.ConfigError, match="decompress: the data must be CompressedKV, got tuple"):
        policy.decompress((ckv.k, ckv.v))
    with pytest.raises(errors.ConfigError, match="must be CompressedTensor, got CompressedKV"):
        policy.k.decompress(ckv)


def test_compression_keeps_no_autograd_history():
    policy = qkv.build_policy("kivi", window=8)  # stores full-precision tokens too
    k = torch.randn(1, 2, 80, 64, requires_grad=True)
    v = k * 2
    ckv = policy.compress(k, v)
    stored = [t for ct in (ckv.k, ckv.v) for t in ct.tensors().values()]
    assert not any(t.requires_grad or t.grad_fn is not None for t in stored)
    assert not any(t.requires_grad for t in policy.decompress(ckv))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: torch.empty(1, 2, 8, 64, device="meta"), errors.DeviceError, "meta device"),
        (lambda: torch.randn(1, 2, 8, 64).to_sparse(), errors.DTypeError, "sparse_coo tensor; qkv takes dense"),
    ],
)
def test_meta_and_sparse_tensors_are_typed_errors(make, error, message):
    x = make()
    with pytest.raises(error, match=message):
        qkv.build_policy("rtn").compress(x, x)
    with pytest.raises(error, match=message):
        qkv.KVCache("rtn").append(0, x, x)


def test_token_group_is_what_a_policy_compresses_on_its_own():
    """Per-channel blocks (KIVI's keys) go in groups of their block, per-token codes, rotations and
    casts token by token; clustering reads a whole span."""
    assert qkv.build_policy("kivi").token_group == 32 and qkv.build_policy("kivi").k.token_group == 32
    assert qkv.build_policy("kivi").v.token_group == 1
    for name in ("rtn", "quarot", "bf16"):
        assert qkv.build_policy(name).token_group == 1
    for name in ("qvg", "qvg-pro"):
        assert qkv.build_policy(name).token_group is None
    assert qkv.build_policy("k:int2(block=16,axis=channel);v:int2(block=24,axis=channel)").token_group == 48
