"""qkv.adapters.streamdiffusionv2 against the upstream code itself: streamdiffusionv2's
``CausalWanModel`` (models/wan/causal_model.py), a tiny config, random weights.

``rollout`` restates the loop of ``CausalStreamInferencePipeline.inference_wo_batch``
(models/wan/causal_stream_inference.py): per chunk, one model call per denoising step at the same
``current_start``, the prediction re-noised for the next step, the last step at t = 0; the
pipeline itself needs the Wan text encoder and VAE weights, so only its loop is restated.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import qkv
from qkv.caches.layer_cache import LayerCache
from qkv.errors import CacheError, ConfigError, CorruptDataError

causal_model = pytest.importorskip(
    "models.wan.causal_model", reason="needs streamdiffusionv2 (pip install --no-deps streamdiffusionv2==0.1.1 ftfy)"
)
from qkv.caches.adapters import streamdiffusionv2 as adapter  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

C, F, H, W = 4, 2, 8, 8  # latent chunk: 2 frames of 4 x 4 patches
FRAME = (H // 2) * (W // 2)  # 16 tokens per frame
N = F * FRAME  # 32 tokens per chunk
HEADS, HEAD_DIM, TEXT = 2, 32, 8
TIMESTEPS = (700, 300, 0)


def tiny_model():
    torch.manual_seed(0)
    m = causal_model.CausalWanModel(dim=HEADS * HEAD_DIM, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=HEADS,
                                    num_layers=2, in_dim=C, out_dim=C, text_len=TEXT).eval()
    torch.nn.init.normal_(m.head.head.weight, std=0.02)  # upstream zero-initialises the output head
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def kv_dicts(model, capacity, batch=1):
    """What ``_initialize_kv_cache`` / ``_initialize_crossattn_cache`` allocate (fp32 here)."""
    kv = [{"k": torch.zeros(batch, capacity, HEADS, HEAD_DIM), "v": torch.zeros(batch, capacity, HEADS, HEAD_DIM),
           "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0]),
           "total_steps": len(TIMESTEPS), "current_step": len(TIMESTEPS)} for _ in model.blocks]
    cross = [{"k": None, "v": None, "is_init": False} for _ in model.blocks]
    return kv, cross


def rollout(model, chunks, capacity, batch=1, kv=None, starts=None, frames=F):
    """Outputs [B, C, F, H, W] of every call (chunks x denoising steps), fp32; chunks of ``frames``."""
    gen = torch.Generator().manual_seed(1)
    context = [torch.randn(TEXT, 32, generator=gen) for _ in range(batch)]
    kv, cross = kv if kv is not None else kv_dicts(model, capacity, batch)
    outs = []
    for c in range(chunks):
        n = frames * FRAME
        x = torch.randn(batch, C, frames, H, W, generator=gen)
        start = torch.full((batch,), c * n) if starts is None else starts(c)
        for t in TIMESTEPS:
            with torch.no_grad():
                out = model(list(x), torch.full((batch, frames), t), context, seq_len=10**6, kv_cache=kv,
                            crossattn_cache=cross, current_start=start, current_end=start + n)
            outs.append(out)
            x = 0.6 * out + 0.4 * torch.randn(out.shape, generator=gen)
    return outs


@pytest.fixture
def no_history_read(monkeypatch):
    """Fails the test if anything decompresses a layer's whole history (``LayerCache.read``)."""

    def read(self):
        raise AssertionError("the forward path decompressed the whole history")

    monkeypatch.setattr(LayerCache, "read", read)


def test_lossless_rollout_matches_the_upstream_cache(model, no_history_read):
    ref = rollout(model, 5, capacity=8 * N)
    with adapter.install(model, "fp32", span_chunks=2) as handle:
        ours = rollout(model, 5, capacity=8 * N)
        layer = handle.cache.layer(0)
        # chunk 0 is the sink (upstream's ring never overwrites it), chunks 1-2 a span, 3 the tail, 4 being denoised
        assert len(layer.spans) == 1 and layer.tokens == 4 * N
        assert handle.memory().tokens == 2 * 5 * N  # 2 blocks, 5 chunks held
    # fp32 rounding only: the attention is summed span by span (log-sum-exp merge) instead of at once
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert "forward" not in vars(model.blocks[0].self_attn)  # removed: upstream's own forward again
    assert all(torch.equal(a, b) for a, b in zip(ref, rollout(model, 5, capacity=8 * N)))


def test_the_guard_catches_a_path_that_reads_the_history(model, no_history_read):
    with adapter.install(model, "fp32", span_chunks=2, attention="read"):
        with pytest.raises(AssertionError, match="decompressed the whole history"):
            rollout(model, 3, capacity=8 * N)


def test_qvg_spans_hold_their_bounds_and_the_output_stays_close(model, bounded_spans):
    policy = qkv.build_policy("qvg", clusters=4, block=16)
    ref = rollout(model, 6, capacity=8 * N)
    with adapter.install(model, policy, span_chunks=2) as handle:
        ours = rollout(model, 6, capacity=8 * N)
        assert handle.memory().bits_per_element < 16
    assert len(bounded_spans) == 2 * 2  # two spans in each of the two blocks, each within its bound
    drift = [float((b - a).norm() / a.norm()) for a, b in zip(ref, ours)]
    assert max(drift[: 2 * 3]) <= 1e-5  # chunks 0-1 see no compressed span (chunks 0-1 form the first)
    assert 0 < max(drift) < 0.15  # measured 0.032 (4 clusters, blocks of 16, 64-token spans)


def test_one_chunk_spans_of_every_block_compress_in_one_pass(model, monkeypatch, compress_passes):
    """With a span per chunk, the first block to move on compresses every block's finished chunk
    in one pass; the spans equal those of block-by-block compression, bit for bit."""
    policy = qkv.build_policy("qvg", clusters=4, block=16)
    with adapter.install(model, policy, span_chunks=1) as handle:
        with monkeypatch.context() as m:
            m.setattr(qkv.KVCache, "compress_ahead", lambda self, chunks: None)  # block by block
            rollout(model, 4, capacity=8 * N)
        spans = [[sp.ckv for sp in handle.cache.layer(i).spans] for i in range(2)]
        handle.reset()
        compress_passes.clear()
        rollout(model, 4, capacity=8 * N)
        # chunk 0 is the sink; chunks 1 and 2 are compressed as chunks 2 and 3 start
        assert compress_passes == [2, 2]
        for i in range(2):
            for a, b in zip(spans[i], [sp.ckv for sp in handle.cache.layer(i).spans], strict=True):
                for x, y in ((a.k, b.k), (a.v, b.v)):
                    assert all(torch.equal(t, y.tensors()[name]) for name, t in x.tensors().items())


def test_the_chunk_position_is_read_from_its_tensor_once(model, monkeypatch):
    """Every block of every step gets the same ``current_start`` tensor: one read of it (a host
    sync on the GPU) per chunk, not one per block; a tensor changed in place is read again."""
    reads, original = [], adapter._starts

    def counting(current_start):
        reads.append(current_start)
        return original(current_start)

    monkeypatch.setattr(adapter, "_starts", counting)
    with adapter.install(model, "fp32", span_chunks=1) as handle:
        rollout(model, 3, capacity=8 * N)
        assert len(reads) == 3  # one per chunk (2 blocks x 3 steps each)
        start = torch.tensor([5])
        assert handle.start_of(start) == 5 and handle.start_of(start) == 5 and len(reads) == 4
        start.fill_(9)
        assert handle.start_of(start) == 9 and len(reads) == 5
        assert handle.start_of(torch.tensor([9])) == 9 and len(reads) == 6  # another tensor


def fresh_ring(model, sink_size=3):
    """Upstream keeps its ring queue on the attention modules across videos: start each run empty."""
    for block in model.blocks:
        block.self_attn.evict_idx, block.self_attn.sink_size = None, sink_size


def ring_dicts(model, capacity, batch):
    kv, cross = kv_dicts(model, capacity, batch)
    for d in kv:  # one end index per row, as upstream's row loop indexes them
        d["global_end_index"], d["local_end_index"] = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long)
    return kv, cross


@pytest.mark.parametrize("sink_size, batch", [(0, 1), (1, 1), (0, 2), (7, 1)])
def test_the_upstream_window_and_sink_are_reproduced(model, sink_size, batch):
    """Upstream's ring once the chunks reach its buffer (9 frames, chunks of 3): its queue of slots to
    overwrite, its step counter (one row: a chunk's later steps overwrite the oldest chunk, its first
    step's K/V stay in the window; two rows: every step advances the ring), its sink of
    ``sink_size`` frames; 12 chunks, lossless policy: fp32 rounding, memory within the window."""
    frames, capacity = 3, 9 * FRAME
    try:
        fresh_ring(model, sink_size)
        ref = rollout(model, 12, None, batch=batch, kv=ring_dicts(model, capacity, batch), frames=frames)
        fresh_ring(model, sink_size)
        with adapter.install(model, "fp32") as handle:
            ours = rollout(model, 12, None, batch=batch, kv=ring_dicts(model, capacity, batch), frames=frames)
            layer = handle.cache.layer(0)
            kept = max(1, sink_size // frames) * frames * FRAME
            # a sink of 7 frames keeps chunks 0-1: upstream's ring rewrites the last 3 slots only
            assert (layer.evicted > 0) == (sink_size < 6) and handle.cache.config.span_tokens == frames * FRAME
            assert handle.cache.config.sink_tokens == kept
            assert handle.memory().tokens == 2 * capacity  # the buffer's slots, per block
    finally:
        fresh_ring(model)
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_what_upstream_does_not_define_raises(model):
    try:
        fresh_ring(model)
        with adapter.install(model, "fp32", span_chunks=2):
            with pytest.raises(CacheError, match="stream batching"):
                rollout(model, 1, capacity=8 * N, batch=2, starts=lambda c: torch.tensor([N * c, N * c + N]))
            with pytest.raises(CacheError, match="0:96, of which only 64 were written"):
                rollout(model, 2, capacity=8 * N, starts=lambda c: torch.tensor([2 * N * c]))
        fresh_ring(model)
        with adapter.install(model, "fp32"):  # 8 frames, chunks of 3: the ring reads a slot never written
            with pytest.raises(CacheError, match="buffer's zeros"):
                rollout(model, 4, capacity=8 * FRAME, frames=3)
        fresh_ring(model)
        model.blocks[0].self_attn.adapt_sink_thr = 0.2
        with adapter.install(model, "fp32"):
            with pytest.raises(ConfigError, match="adapt_sink_thr"):
                rollout(model, 1, capacity=8 * FRAME, frames=1)
    finally:
        model.blocks[0].self_attn.adapt_sink_thr = -1
        fresh_ring(model)
    with pytest.raises(ConfigError, match="max_spans, num_layers"):
        adapter.install(model, "fp32", num_layers=2, max_spans=4)


def test_the_pipeline_allocates_no_kv_buffers(model):
    inference = pytest.importorskip("models.wan.causal_stream_inference")
    pipe = inference.CausalStreamInferencePipeline.__new__(inference.CausalStreamInferencePipeline)
    torch.nn.Module.__init__(pipe)
    pipe.generator = torch.nn.Module()
    pipe.generator.model = model
    pipe.num_transformer_blocks, pipe.num_heads, pipe.num_sink_tokens, pipe.adapt_sink_threshold = 2, HEADS, 1, -1
    pipe.kv_cache_length = 8 * N
    pipe.denoising_step_list = torch.tensor(TIMESTEPS)
    inference.CausalStreamInferencePipeline._initialize_kv_cache(pipe, 1, torch.float32, "cpu")
    upstream = pipe.kv_cache1
    with adapter.install(pipe, "fp32", span_chunks=2):
        pipe._initialize_kv_cache(1, torch.float32, "cpu")
        ours = pipe.kv_cache1
        assert [sorted(d) for d in ours] == [sorted(d) for d in upstream]
        assert all(d["k"].is_meta and d["k"].shape == u["k"].shape for d, u in zip(ours, upstream))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = rollout(model, 3, capacity=None, kv=(ours, kv_dicts(model, 1)[1]))
        assert int(ours[0]["global_end_index"]) == 3 * N and int(ours[0]["local_end_index"]) == 3 * N
    assert "_initialize_kv_cache" not in vars(pipe)
    ref = rollout(model, 3, capacity=8 * N)
    for a, b in zip(ref, out, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def chunk_steps(model, kv, chunks):
    """``rollout``'s loop over the chunks ``chunks`` only (each chunk's noise seeded by its index,
    so a rollout can stop and go on elsewhere)."""
    context = [torch.randn(TEXT, 32, generator=torch.Generator().manual_seed(1))]
    outs = []
    for c in chunks:
        gen = torch.Generator().manual_seed(100 + c)
        x = torch.randn(1, C, F, H, W, generator=gen)
        start = torch.tensor([c * N])
        for t in TIMESTEPS:
            with torch.no_grad():
                out = model(list(x), torch.full((1, F), t), context, seq_len=10**6, kv_cache=kv[0],
                            crossattn_cache=kv[1], current_start=start, current_end=start + N)
            outs.append(out)
            x = 0.6 * out + 0.4 * torch.randn(out.shape, generator=gen)
    return outs


def test_a_block_packs_exactly_in_a_seventh_of_its_bf16_bytes(model):
    """A block's state (compressed spans + the chunk being denoised) round-trips exactly; at QVG's
    span shape (~2.3 bits per value) the spans take under 1/6.5 of their bf16 bytes."""
    gen = torch.Generator().manual_seed(2)
    chunks = [(torch.randn(1, 1, 1024, 128, generator=gen).bfloat16(),
               torch.randn(1, 1, 1024, 128, generator=gen).bfloat16()) for _ in range(9)]
    policy = qkv.build_policy("qvg", clusters=32)  # C / S as in the paper: 256 clusters per 37,440 tokens
    with adapter.install(model, policy, span_chunks=4) as source, adapter.install(tiny_model(), policy,
                                                                                  span_chunks=4) as target:
        for c, (k, v) in enumerate(chunks):
            source.store(0, c * 1024, k, v)  # chunks 0-7 form two spans, chunk 8 is pending
        buffer, header = source.pack_block(0)
        target.unpack_block(0, buffer, header)
        assert all(torch.equal(a, b) for a, b in zip(source.cache.read(0), target.cache.read(0)))
        held, got = source.chunk[0], target.chunk[0]
        assert (got.slot, got.tokens, got.writes) == (8 * 1024, 1024, 1)
        assert torch.equal(got.k, held.k) and torch.equal(got.v, held.v)
        assert source.cache.layer(0).tail == [] and len(source.cache.layer(0).spans) == 2
        pending = 2 * chunks[8][0].numel() * 2
        assert (buffer.numel() - pending) * 6.5 < 8 * pending  # measured 6.9x
        with pytest.raises(CorruptDataError, match="outside a buffer"):
            target.unpack_block(1, buffer[: buffer.numel() // 2], header)
        assert target.chunk[1] is None and target.cache.layer(1).layout is None  # unchanged


def _moving_blocks(rank: int, world: int) -> None:
    """Rank 0 runs 3 chunks, then both blocks move to rank 1 as compressed bytes; both ranks go on
    for 2 chunks and must agree exactly; rank 0 then drops what it no longer owns."""
    import torch.distributed as dist

    model = tiny_model()
    kv = kv_dicts(model, 8 * N)
    handle = adapter.install(model, qkv.build_policy("qvg", clusters=4, block=16), span_chunks=2)
    manager = adapter.KVCacheManager(handle)
    if rank == 0:
        chunk_steps(model, kv, range(5))
    before, after = torch.tensor([[0, 2], [2, 2]]), torch.tensor([[0, 0], [0, 2]])
    assert manager.compute_block_owners(before, 2).tolist() == [0, 0]
    sent = manager.rebalance_kv_cache_by_diff(before, after, 2)
    held = 2 * 2 * 5 * N * HEADS * HEAD_DIM * 4  # blocks x (k, v) x chunks x tokens x heads x dim x fp32
    assert 0 < sent < held * 0.7, sent  # the sink, the tail and the chunk being denoised in fp32, a span compressed
    outs = torch.stack(chunk_steps(model, kv, range(5, 7)))
    both = [torch.empty_like(outs) for _ in range(world)]
    dist.all_gather(both, outs)
    assert torch.equal(both[0], both[1])
    manager.cleanup_kv_cache(after, 2)
    assert (handle.memory().total == 0) == (rank == 0)


def test_blocks_move_between_gloo_ranks_as_compressed_bytes():
    from ranks import run_ranks

    run_ranks(_moving_blocks, 2)


def test_a_buffer_above_the_rollout_compresses_the_first_chunk_and_refuses_a_ring(model):
    fresh_ring(model, sink_size=0)
    ref = rollout(model, 5, capacity=20 * N)
    with adapter.install(model, "fp32", span_chunks=2) as handle:
        fresh_ring(model, sink_size=0)
        ours = rollout(model, 5, capacity=20 * N)
        layer = handle.cache.layer(0)
        # chunks 0-1 and 2-3, and 4 in the tail: stored at its last write (kv_cache["total_steps"])
        assert handle.memory().sink == 0 and len(layer.spans) == 2 and layer.tokens == 5 * N and not handle.pending()
        for a, b in zip(ref, ours, strict=True):
            assert (a - b).abs().max() <= 1e-5 * a.abs().max()
        fresh_ring(model, sink_size=0)
        with pytest.raises(CacheError, match="sized for global attention"):  # 17 chunks: no window
            rollout(model, 18, capacity=17 * N)
    with adapter.install(model, "fp32") as handle:  # by default a span per chunk
        fresh_ring(model, sink_size=0)
        rollout(model, 5, capacity=20 * N)
        layer = handle.cache.layer(0)
        assert [sp.tokens for sp in layer.spans] == [N] * 5 and not layer.tail and not handle.pending()


def test_a_global_buffer_holds_no_chunk_in_full_precision_between_model_calls(model, compress_passes):
    """In a buffer sized for global attention, a chunk's K/V are dropped after each model call but
    the last of its ``total_steps`` (the next call rewrites them before anything reads them), and
    the last call's are compressed there, ``blocks_per_pass`` blocks in one pass: between calls
    nothing waits in full precision, and the outputs are upstream's to fp32 rounding."""
    fresh_ring(model, sink_size=0)
    ref = rollout(model, 4, capacity=20 * N)
    kv = kv_dicts(model, 20 * N)
    held = []
    with adapter.install(model, "fp32", blocks_per_pass=1) as handle:
        hook = model.register_forward_hook(lambda *_: held.append((handle.pending(), handle.memory().tokens)))
        try:
            ours = rollout(model, 4, capacity=None, kv=kv)
        finally:
            hook.remove()
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert all(pending == [] for pending, _ in held)
    steps = len(TIMESTEPS)
    # two blocks: the stored tokens grow by a chunk each, at every chunk's last call only
    assert [tokens for _, tokens in held] == [2 * N * (c // steps) for c in range(1, 4 * steps + 1)]
    assert compress_passes == [1, 1] * 4  # blocks_per_pass=1: a pass per block


@pytest.mark.parametrize("total, match", [(2, "written again after the 2 writes"), (4, "written 3 times, not the 4")])
def test_total_steps_that_are_not_the_model_calls_per_chunk_raise(model, total, match):
    """``total_steps`` below the calls per chunk: the extra write raises; above them: the next
    chunk raises, naming the chunk whose K/V were not kept."""
    fresh_ring(model, sink_size=0)
    kv, cross = kv_dicts(model, 20 * N)
    for d in kv:
        d["total_steps"] = total
    with adapter.install(model, "fp32"), pytest.raises(CacheError, match=match):
        rollout(model, 2, capacity=None, kv=(kv, cross))
    for bad in (0, "3", True):
        kv, cross = kv_dicts(model, 20 * N)
        kv[0]["total_steps"] = bad
        with adapter.install(model, "fp32"), pytest.raises(ConfigError, match="total_steps"):
            rollout(model, 1, capacity=None, kv=(kv, cross))
    with pytest.raises(ConfigError, match="blocks_per_pass"):
        adapter.install(model, "fp32", blocks_per_pass=0)


def test_a_block_packs_its_chunk_between_calls(model):
    """Between two denoising calls a block's chunk has no K/V (dropped) but its slots and write
    count: they round-trip, and the receiving handle goes on with the chunk's next write."""
    fresh_ring(model, sink_size=0)
    kv = kv_dicts(model, 20 * N)
    gen = torch.Generator().manual_seed(5)
    context = [torch.randn(TEXT, 32, generator=gen)]
    x = torch.randn(1, C, F, H, W, generator=gen)
    start = torch.tensor([0])
    with adapter.install(model, "fp32") as source, adapter.install(tiny_model(), "fp32") as target:
        with torch.no_grad():
            model(list(x), torch.full((1, F), TIMESTEPS[0]), context, seq_len=10**6, kv_cache=kv[0],
                  crossattn_cache=kv[1], current_start=start, current_end=start + N)
        buffer, header = source.pack_block(0)
        assert "k" not in header["chunk"]
        target.unpack_block(0, buffer, header)
        got = target.chunk[0]
        assert (got.slot, got.tokens, got.k, got.v, got.writes, got.stored) == (0, N, None, None, 1, False)
        header["chunk"]["writes"] = 0
        with pytest.raises(CorruptDataError, match="written 0 times"):
            target.unpack_block(0, buffer, header)


def test_final_chunks_left_short_of_a_pass_are_stored_when_the_forward_returns(model, compress_passes):
    """With more ``blocks_per_pass`` than blocks the pass never fills: the waiting final chunks are
    stored, in one pass, when the model's forward returns, whichever blocks it ran."""
    fresh_ring(model, sink_size=0)
    with adapter.install(model, "fp32", blocks_per_pass=8) as handle:
        rollout(model, 3, capacity=20 * N)
        assert handle.pending() == [] and handle.waiting == []
    assert compress_passes == [2, 2, 2]
