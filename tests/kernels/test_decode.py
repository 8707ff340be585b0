"""The decode path (flash-decoding over compressed spans) against decompress-then-SDPA.

Same tolerance as tests/kernels/test_attention.py: against an fp32 attention over the history
decompressed in fp32, the kernel's error is at most twice that of decompress + SDPA in the
queries' dtype, in max and in mean. Shapes stay small: without a GPU the kernel runs in Triton's
interpreter. Also: the plain-torch twin, the plan reused across calls, the method choice, and on a
GPU Llama-3-8B attention shapes and a CUDA graph of ``KVCache.attend``.
"""


import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import qkv  # noqa: E402
from qkv import kernels  # noqa: E402
from qkv.errors import BackendError, ConfigError, ShapeError  # noqa: E402
from qkv.kernels import CompressedSpan, DenseKV, SpanPlan  # noqa: E402
from qkv.kernels.attention import attention_decode_torch  # noqa: E402

from test_attention import (  # noqa: E402
    DEVICE,
    PRESETS,
    assert_within_twice_the_torch_error,
    history,
    materialized,
    policy,
    randn,
)


def decode(q, segments):
    return kernels.attention(q, segments, backend="triton", method="decode")


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_with_gqa(name):
    """Sink, a span with evicted tokens, a tail; 4 query heads on 2 KV heads, 1 and 5 queries."""
    segments = history(name, seed=PRESETS.index(name) + 40)
    for sq in (1, 5):
        q = randn(77 + sq, 1, 4, sq, 64)
        assert_within_twice_the_torch_error(decode(q, segments), q, segments)


@pytest.mark.parametrize("spec", [
    "int4(block=16,axis=channel)",
    "int2(block=48,axis=channel,mode=asym),i32lsb",  # a scale block that straddles tiles
    "int1(block=32,axis=channel),i32lsb",  # 32 codes per word: more than a key tile
    "int3(block=16)",  # codes across word boundaries
])
def test_per_channel_and_unaligned_layouts(spec):
    pol = qkv.build_policy(spec)
    k, v = randn(60, 1, 2, 150, 64, scale=2.0), randn(61, 1, 2, 150, 64)
    segments = [CompressedSpan(pol.compress(k, v), 9), DenseKV(randn(62, 1, 2, 20, 64), randn(63, 1, 2, 20, 64))]
    q = randn(64, 1, 2, 2, 64)
    assert_within_twice_the_torch_error(decode(q, segments), q, segments)


@pytest.mark.parametrize("names, sq", [(("qvg", "rtn"), 3), (("quarot", "rtn"), 3), (("quarot", "rtn"), 9)])
def test_many_pieces_several_spans_and_dense_segments_fp16(names, sq):
    """Three spans of two layouts (two launches into one set of partials), three full-precision
    segments (two joined), a batch of 2, fp16. With quarot's spans and few query rows a KV head
    (3 queries x 2 heads) the partials are in the rotated basis: the rtn spans' and the
    full-precision ones' are rotated into it, and the merge rotates back; with more (9 x 2) the
    quarot programs rotate their own partials back."""
    pols = [policy(names[0], 64), policy(names[1], 64), policy(names[0], 64)]
    segments = []
    for i, pol in enumerate(pols):
        k = randn(90 + i, 2, 2, 100, 64, dtype=torch.float16, scale=2.0)
        segments.append(CompressedSpan(pol.compress(k, randn(95 + i, 2, 2, 100, 64, dtype=torch.float16)), 3 * i))
    for i in range(3):
        segments.append(DenseKV(randn(100 + i, 2, 2, 30, 64, dtype=torch.float16),
                                randn(110 + i, 2, 2, 30, 64, dtype=torch.float16)))
    q = randn(120, 2, 4, sq, 64, dtype=torch.float16)
    assert_within_twice_the_torch_error(decode(q, segments), q, segments)


def test_the_torch_twin_is_the_fp32_attention():
    segments = history("qvg", seed=5, span=600, skip=30)  # several pieces of DECODE_PIECE keys
    q = randn(14, 1, 4, 3, 64)
    out = attention_decode_torch(q, segments, scale=0.07)
    k, v = materialized(segments)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.07, enable_gqa=True)
    assert (out.float() - ref).abs().max() <= 2**-8 * ref.abs().max()
    assert torch.equal(kernels.attention(q, segments, scale=0.07, backend="torch", method="decode"), out)


def test_a_plan_builds_its_records_and_tables_once():
    """A SpanPlan keeps the kernels' records and device tables: a second call builds nothing, and a
    plan for one span more takes over the records of the spans it shares."""
    segments = history("qvg", seed=8, span=120)
    plan = SpanPlan([segments[1]])
    q = randn(9, 1, 2, 1, 64)
    first = decode(q, [segments[0], plan, segments[2]])
    tables = dict(plan._tables)
    assert torch.equal(decode(q, [segments[0], plan, segments[2]]), first)
    assert plan._tables == tables and all(plan._tables[key] is tables[key] for key in tables)
    more = CompressedSpan(policy("qvg", 64).compress(randn(10, 1, 2, 64, 64), randn(11, 1, 2, 64, 64)))
    grown = SpanPlan([segments[1], more], previous=plan)
    assert grown._records[id(segments[1].ckv)] is plan._records[id(segments[1].ckv)]
    assert_within_twice_the_torch_error(decode(q, [grown, segments[2]]), q, [segments[1], more, segments[2]])


@pytest.mark.parametrize("name, options", [("kivi", {}), ("rtn", {"span_tokens": 16})])
def test_a_decoding_loop_needs_one_compiled_variant_of_the_decode_kernels(name, options, monkeypatch):
    """Triton compiles a kernel again for every new class of an integer argument it specializes
    (equal to 1, a multiple of 16, other). The decode and merge kernels' counts (tail length, work
    items, partials) change at every step of a decoding loop, so each argument must keep one
    specialization through it: a new one stalled a generation for seconds every few hundred steps
    on a GPU (benchmarks/cold_start.py). The launches are recorded here, not run."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction

    from qkv.kernels.triton import decode as host

    keys = {"decode": set(), "merge": set()}

    def spy(label, kernel):
        # the parameters as Triton's JIT sees them (the tests may run interpreted)
        kernel = kernel.jit
        params = kernel.params if hasattr(kernel, "params") else JITFunction(kernel.fn, **kernel.kwargs).params

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    values = [*args, *(kwargs[p.name] for p in params[len(args):])]
                    keys[label].add(tuple(
                        libtriton.native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize,
                                                         not p.do_not_specialize_on_alignment)
                        for p, v in zip(params, values) if not p.is_constexpr))
                return launch
        return Spy()

    monkeypatch.setattr(host, "decode_kernel", spy("decode", host.decode_kernel))
    monkeypatch.setattr(host, "merge_kernel", spy("merge", host.merge_kernel))
    gen = torch.Generator().manual_seed(7)
    layer = qkv.KVCache(name, num_layers=1, **options).layer(0)
    layer.append(*(torch.randn(1, 2, 256, 64, generator=gen).bfloat16() for _ in range(2)))
    q = torch.randn(1, 4, 1, 64, generator=gen).bfloat16()
    for _ in range(70):  # KIVI: a span every 32 steps; rtn: every 16, the tail 1 to 16 tokens
        token = torch.randn(1, 2, 1, 64, generator=gen).bfloat16()
        layer.append(token, token)
        host.decode_triton(q, layer.attention_segments())
    assert len(keys["decode"]) == 1 and len(keys["merge"]) == 1


def test_a_plan_that_adds_spans_extends_the_earlier_tables_to_those_built_anew():
    """A plan whose spans are an earlier plan's and then more builds its span table by extending
    the earlier one (the new spans' rows appended on the device): the same tables, work items and
    layouts as a plan made from scratch, through spans of two layouts (a new group), spans with
    evicted tokens and a plan that drops a span (then built anew); decoding reads the same (the
    last two plans: all six spans, and five after the drop)."""
    from qkv.kernels.triton.decode import plan_support, plan_table

    pols = [policy("kivi", 64), policy("qvg", 64)]
    spans = [CompressedSpan(pols[i % 3 == 2].compress(randn(20 + i, 1, 2, 40 + 7 * i, 64),
                                                      randn(40 + i, 1, 2, 40 + 7 * i, 64)), skip=3 * (i == 0))
             for i in range(6)]
    q, piece = randn(12, 1, 4, 1, 64), 32
    plan = None
    for n in (1, 2, 3, 5, 6, 6):
        kept = spans[:n] if plan is None or n > len(plan.spans) else spans[1:n]  # the last: one dropped
        grown, fresh = SpanPlan(kept, previous=plan), SpanPlan(kept)
        assert (grown._base is not None) == (plan is not None and kept[0] is plan.spans[0])
        a, b = plan_table(grown, q.device, piece), plan_table(fresh, q.device, piece)
        assert a.keys == b.keys == grown.tokens and a.nbytes == b.nbytes and len(a.groups) == len(b.groups)
        for ga, gb in zip(a.groups, b.groups):
            assert ga.layouts == gb.layouts and ga.n_items == gb.n_items and ga.nbytes == gb.nbytes
            assert torch.equal(ga.table, gb.table) and torch.equal(ga.items[: ga.n_items], gb.items[: gb.n_items])
        assert plan_support(grown, q) == plan_support(fresh, q) is None
        if n == 6:
            assert torch.equal(decode(q, [grown]), decode(q, [fresh]))
        plan = grown
    assert len(a.groups) == 2


def test_the_method_choice():
    q1 = randn(1, 1, 2, 1, 64)
    assert kernels.choose_method(q1) is kernels.Method.DECODE
    assert kernels.choose_method(randn(1, 1, 2, kernels.DECODE_MAX_QUERIES + 1, 64)) is (
        kernels.Method.STAGED if DEVICE == "cuda" else kernels.Method.FUSED)
    assert kernels.choose_method(q1, "staged") is kernels.Method.STAGED
    with pytest.raises(BackendError, match="valid methods: auto, decode, fused, staged"):
        kernels.choose_method(q1, "flash")
    with pytest.raises(BackendError, match="^unknown attention method of type list; valid methods"):
        kernels.choose_method(q1, [q1])  # named by its type, not printed whole
    # a span the decode kernel cannot read (5 stages): "auto" takes the fused op, "decode" raises
    deep = qkv.build_policy("kmeans(clusters=4,iters=2),centroid,progressive(stages=5),int2(block=16)")
    segments = [CompressedSpan(deep.compress(randn(11, 1, 2, 64, 64), randn(12, 1, 2, 64, 64)))]
    with pytest.raises(BackendError, match="5 smoothing stages"):
        decode(q1, segments)
    assert_within_twice_the_torch_error(kernels.attention(q1, segments, backend="triton"), q1, segments)


@pytest.mark.skipif(DEVICE != "cuda", reason="full shapes need a GPU")
@pytest.mark.parametrize("name", ["qvg", "kivi", "rtn", "quarot", "bf16"])
@pytest.mark.parametrize("sq", [1, 16])
def test_llama_shapes_on_the_gpu(name, sq):
    """Llama-3-8B attention: 32 query heads on 8 KV heads x 128, two 4,096-token spans, a tail."""
    pol = qkv.build_policy(name, clusters=256) if name == "qvg" else qkv.build_policy(name)
    segments = []
    for i in range(2):
        k, v = randn(30 + i, 1, 8, 4096, 128, scale=2.0), randn(40 + i, 1, 8, 4096, 128)
        segments.append(CompressedSpan(pol.compress(k, v), 17 * i))
    segments.append(DenseKV(randn(50, 1, 8, 300, 128), randn(51, 1, 8, 300, 128)))
    q = randn(52, 1, 32, sq, 128)
    assert_within_twice_the_torch_error(decode(q, segments), q, segments)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name, attend_graphs", [("qvg", False), ("quarot", False), ("rtn", True)])
def test_attend_is_captured_in_a_cuda_graph(name, attend_graphs):
    """Fixed shapes: KVCache.attend (decode path) replayed from a CUDA graph gives the eager result;
    nothing on its path copies to the device or waits for it. With ``attend_graphs`` the layer's
    own graph stays out of the caller's capture (a capture inside a capture would fail): the
    call inside it runs as it would eagerly."""
    cache = qkv.KVCache(name, span_tokens=1024, attend_graphs=attend_graphs)
    for i in range(5):
        cache.append(0, randn(60 + i, 1, 8, 512, 128), randn(70 + i, 1, 8, 512, 128))
    q = randn(80, 1, 32, 1, 128)
    eager = cache.attend(0, q)  # the plan and its tables are built here
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cache.attend(0, q)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache.attend(0, q)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert not attend_graphs or cache.layer(0).attend_graph.refused is None


@pytest.mark.parametrize("name", ["quarot", "qvg"])
def test_queries_laid_out_by_token_and_rotated_keys(name):
    """Queries as transformers hands them over ([B, S, H, D] transposed: a head's queries are not
    contiguous), several per head: the rotated queries a launch computes for rotated keys are read
    with the same strides as the queries themselves."""
    segments = history(name, seed=31)
    q = randn(32, 1, 3, 4, 64).transpose(1, 2)  # [B, H=4, Sq=3, D] with token-major strides
    assert not q.is_contiguous()
    assert_within_twice_the_torch_error(decode(q, segments), q, segments)


@pytest.mark.parametrize("name, window, b", [("qvg", 0, 1), ("qvg", 16, 1), ("qvg-pro", 0, 1), ("qvg", 0, 2)])
def test_keys_scored_through_their_centroids(name, window, b, monkeypatch):
    """``DecodeTile.key_scores``: the keys' centroids scored once per call (q . c, a launch per
    span group) and gathered per key, over two spans (one with evicted tokens; with ``window``,
    full-precision tokens after the quantized ones) and a full-precision segment, 4 query heads on
    2 KV heads, a batch of ``b``, 1 and 3 queries. A table read at the wrong stage, span, row or
    (batch, KV head) fails the bound."""
    from qkv.kernels.triton import decode as dec
    from qkv.kernels.triton.tiles import INTERPRETER

    launches: list = []
    scores_kernel = dec.centroid_scores_kernel
    monkeypatch.setattr(dec, "centroid_scores_kernel", _Counted(scores_kernel, launches))
    pol = qkv.build_policy(name, clusters=8, block=64 if name == "qvg" else 16, window=window)
    segments = []
    for i in range(2):
        k, v = randn(130 + i, b, 2, 90 + 40 * i, 64, scale=2.0), randn(135 + i, b, 2, 90 + 40 * i, 64)
        segments.append(CompressedSpan(pol.compress(k, v), 11 * i))
    segments.append(DenseKV(randn(140, b, 2, 20, 64), randn(141, b, 2, 20, 64)))
    tile = dataclasses.replace(INTERPRETER["decode"], block_n=32, piece=64, key_scores=0)  # GPU: >= 32 keys
    for sq in (1, 3):
        q = randn(142 + sq, b, 4, sq, 64)
        out = dec.decode_triton(q, [SpanPlan(segments[:2]), segments[2]], tile=tile)
        assert_within_twice_the_torch_error(out, q, segments)
    assert len(launches) == 2
    # from more keys than the call reads (2 spans, 11 evicted: 209 live keys a batch row): no table
    for least, made in ((209 * b, 3), (209 * b + 1, 3)):
        dec.decode_triton(q, [SpanPlan(segments[:2]), segments[2]], tile=dataclasses.replace(tile, key_scores=least))
        assert len(launches) == made


@pytest.mark.parametrize("window", [16, 40])
def test_rotated_spans_with_full_precision_tokens_in_small_pieces(window):
    """Hadamard-rotated spans (quarot) whose newest tokens are kept in full precision, cut into
    work items of 64 keys and tiles of 32: items within the quantized tokens, items that reach the
    first tile holding full-precision ones (read in the second loop, those tokens taken into the
    stored basis) and items that start past it; one span partly evicted; 1 query (the merge rotates
    the partials back) and 9 (18 rows: each program rotates its own)."""
    from qkv.kernels.triton import decode as dec
    from qkv.kernels.triton.tiles import INTERPRETER

    pol = qkv.build_policy("quarot", window=window)
    segments = [CompressedSpan(pol.compress(randn(150 + i, 1, 2, 90 + 40 * i, 64, scale=2.0),
                                            randn(155 + i, 1, 2, 90 + 40 * i, 64)), 11 * i) for i in range(2)]
    segments.append(DenseKV(randn(160, 1, 2, 20, 64), randn(161, 1, 2, 20, 64)))
    tile = dataclasses.replace(INTERPRETER["decode"], block_n=32, piece=64)
    for sq in (1, 9):
        q = randn(162 + sq, 1, 4, sq, 64)
        out = dec.decode_triton(q, [SpanPlan(segments[:2]), segments[2]], tile=tile)
        assert_within_twice_the_torch_error(out, q, segments, rounded_partials=True)


class _Counted:
    """A kernel launcher that records its launches."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


@pytest.mark.skipif(DEVICE != "cuda", reason="the limit is a GPU's")
def test_a_gpu_refuses_key_tiles_below_32_keys():
    from qkv.errors import ConfigError
    from qkv.kernels.triton.decode import decode_triton
    from qkv.kernels.triton.tiles import INTERPRETER

    segments = history("rtn", seed=3)
    with pytest.raises(ConfigError, match="block_n=16"):
        decode_triton(randn(4, 1, 4, 1, 64), segments, tile=INTERPRETER["decode"])


@pytest.mark.parametrize("name, sink", [("qvg", True), ("kivi", False)])
def test_a_tail_whose_live_keys_the_device_counts(name, sink):
    """``live``: the last segment is a tail buffer's room, of which the device holds the count of
    keys (a call replayed from a CUDA graph while the tail grows). At every count the output is
    the call's over those keys alone (the torch twin's to the bit; the kernel's within its
    rounding of the same call), the newest live key weighs most (a count off by one is far off)
    and the room after it is NaN (never read); with and without a sink segment before the tail."""
    segments = history(name, seed=130)
    if not sink:
        segments = segments[1:]
    tail = segments[-1]
    nan = torch.full((1, 2, 30, 64), float("nan"), dtype=tail.k.dtype, device=tail.k.device)
    q = randn(131, 1, 4, 1, 64)
    newest = 8 * q[:, :, 0].unflatten(1, (2, 2)).mean(2)  # [1, 2, 64]: scored far above the rest
    for n in (1, 17, 40, 41):
        k_room, v_room = torch.cat([tail.k, nan], 2), torch.cat([tail.v, nan], 2)
        k_room[:, :, n - 1], v_room[:, :, n - 1] = newest, randn(132 + n, 1, 2, 64)
        live = torch.tensor([n], dtype=torch.int32, device=q.device)
        alone = [*segments[:-1], DenseKV(k_room[:, :, :n], v_room[:, :, :n])]
        counted = [*segments[:-1], DenseKV(k_room, v_room)]
        want = kernels.attention(q, alone, backend="torch", method="decode")
        assert torch.equal(kernels.attention(q, counted, backend="torch", method="decode", live=live), want)
        got = kernels.attention(q, counted, backend="triton", method="decode", live=live)
        torch.testing.assert_close(got, want, atol=1e-2, rtol=0)
        assert (got.float() - v_room[:, :, n - 1].float().repeat_interleave(2, 1)[:, :, None]).abs().max() < 0.1


def test_live_counts_are_refused_where_they_cannot_be_read():
    segments = history("rtn", seed=140)
    q = randn(141, 1, 4, 1, 64)
    live = torch.tensor([3], dtype=torch.int32, device=q.device)
    with pytest.raises(ConfigError, match="decode path only"):
        kernels.attention(q, segments, method="staged", live=live)
    with pytest.raises(ShapeError, match="last segment must be a DenseKV"):
        kernels.attention(q, segments[:2], method="decode", live=live)
    with pytest.raises(ShapeError, match="int32 tensor of one element"):
        kernels.attention(q, segments, method="decode", live=live.long())
    empty = DenseKV(segments[2].k[:, :, :0], segments[2].v[:, :, :0])
    with pytest.raises(BackendError, match="has no room"):
        kernels.attention(q, [*segments, empty], backend="triton", method="decode", live=live * 0)
    with pytest.raises(ShapeError, match="live=41 keys of a last segment of 40"):
        kernels.attention(q, segments, backend="torch", method="decode", live=torch.tensor([41], dtype=torch.int32, device=q.device))
