"""qkv.adapters.flashdreams against flashdreams' own ``WanDiTNetwork`` (recipes/wan, tiny config,
random weights): ``network.initialize_cache`` and ``network(...)`` run unchanged, chunk by chunk,
with several denoising calls per chunk at the same ``current_chunk_idx``, as
``Wan21Transformer.predict_flow`` drives it.

Two flashdreams kernels are CUDA-only, so their math is restated on the CPU
(``upstream_flashdreams.py``: the fused Triton RoPE and the cuDNN SDPA).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import qkv
from qkv.caches.layer_cache import LayerCache
from qkv.errors import CacheError, ConfigError

network_mod = pytest.importorskip(
    "flashdreams.recipes.wan.transformer.impl.network",
    reason="needs flashdreams (pip install --no-deps flashdreams==0.1.0 loguru tyro nvidia-ml-py)",
)
rope_mod = pytest.importorskip("flashdreams.core.attention.rope")
from qkv.caches.adapters import flashdreams as adapter  # noqa: E402
from upstream_flashdreams import cpu_kernels, rope_torch  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

N = 32  # tokens per chunk: 2 latent frames of 4 x 4 patches


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    net = network_mod.WanDiTNetworkConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=8, text_dim=32,
                                          freq_dim=32, in_dim=4, out_dim=4).setup().eval()
    net.update_parameters_after_loading_checkpoint()
    net.rope = rope_mod.RotaryPositionEmbedding3D(len_t=2, len_h=4, len_w=4, head_dim=32, h_extrapolation_ratio=1.0,
                                                  w_extrapolation_ratio=1.0, interleaved=True, device="cpu")
    with cpu_kernels(net):
        yield net


def rollout(net, chunks, window, sink, steps=3):
    """(every call's output, the network cache)."""
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(1, 8, 32, generator=gen)
    outs = []
    with torch.no_grad():
        cache = net.initialize_cache(chunk_size=N, window_size=window, sink_size=sink, text_embeddings=text)
        for c in range(chunks):
            x = torch.randn(1, N, 16, generator=gen)
            freqs = net.rope.shift_t(c)
            for t in (700.0, 300.0, 0.0)[:steps]:
                out = net(x, torch.tensor([t]), cache, freqs, current_chunk_idx=c)
                outs.append(out)
                x = x + 0.3 * out
    return outs, cache


@pytest.fixture
def no_history_read(monkeypatch):
    def read(self):
        raise AssertionError("the forward path decompressed the whole history")

    monkeypatch.setattr(LayerCache, "read", read)


@pytest.mark.parametrize("window, sink", [(8 * N, 0), (3 * N, N)], ids=["global", "sink+window"])
def test_lossless_rollout_matches_the_upstream_cache(network, no_history_read, window, sink):
    ref, _ = rollout(network, 8, window, sink)
    with adapter.install(network, "fp32", span_chunks=2) as handle:
        ours, cache = rollout(network, 8, window, sink)
        layer = cache[0].self_attn.layer
        assert len(layer.spans) >= 1
        assert layer.evicted == (0 if sink == 0 else (8 - 4) * N)  # 4 chunks fit: the sink and 3 newest
        assert handle.memory().tokens == 2 * min(8 * N, window + sink)
    # fp32 rounding only: the attention is summed per segment (log-sum-exp merge) instead of at once
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert "apply_kv" not in vars(network.blocks[0].self_attn)


def test_spans_are_one_chunk_unless_the_options_say_otherwise(network):
    """Each chunk is compressed as the next one starts (nothing waits in bf16 for a span to fill);
    ``span_chunks`` or ``span_tokens`` still sets the span."""
    for options, spans in (({}, [N] * 3), ({"span_chunks": 2}, [2 * N]), ({"span_tokens": 3 * N}, [3 * N])):
        with adapter.install(network, "fp32", **options):
            _, cache = rollout(network, 4, 8 * N, 0)
            layer = cache[0].self_attn.layer
            assert [sp.ckv.k.shape[2] for sp in layer.spans] == spans, options
            assert layer.tokens == 3 * N  # the fourth chunk is held apart, being denoised


def test_the_guard_catches_a_path_that_reads_the_history(network, no_history_read):
    with adapter.install(network, "fp32", span_chunks=2, attention="read"):
        with pytest.raises(AssertionError, match="decompressed the whole history"):
            rollout(network, 4, 8 * N, 0)


def test_qvg_stays_close_and_stores_less(network, bounded_spans):
    ref, _ = rollout(network, 8, 3 * N, N)
    with adapter.install(network, qkv.build_policy("qvg", clusters=4, block=16), span_chunks=2) as handle:
        ours, cache = rollout(network, 8, 3 * N, N)
        mem = handle.memory()
        spans = [sp for i in range(2) for sp in cache[i].self_attn.layer.spans]
    assert bounded_spans  # every compressed span within its guaranteed error bound
    drift = [float((b - a).norm() / a.norm()) for a, b in zip(ref, ours)]
    assert max(drift[: 3 * 3]) <= 1e-5  # chunks 0-2 see the sink and the tail only (the first span forms at 3)
    assert 0 < max(drift) < 0.02  # measured 5.7e-3 (4 clusters, blocks of 16)
    fp32 = sum(sp.ckv.k.shape[2] for sp in spans) * 2 * 2 * 32 * 4  # K and V, 2 heads of 32, 4 bytes
    assert spans and 0 < mem.compressed * 6 < fp32  # measured 3.8 bits per value (4 clusters on 64-token spans)


def by_passes(monkeypatch, target, run) -> dict:
    """``run()``'s outputs under ``install(target, qvg, blocks_per_pass=1 and 2)``, each with the
    pairs per compression pass (``Policy.compress_many`` call); the two runs' outputs are
    checked equal, bit for bit."""
    passes = []
    real = qkv.Policy.compress_many

    def counted(self, pairs, **kwargs):
        passes.append(len(pairs))
        return real(self, pairs, **kwargs)

    monkeypatch.setattr(qkv.Policy, "compress_many", counted)
    policy = qkv.build_policy("qvg", clusters=4, block=16)
    runs = {}
    for per_pass in (1, 2):
        passes.clear()
        with adapter.install(target, policy, blocks_per_pass=per_pass):
            runs[per_pass] = run(), list(passes)
    for a, b in zip(runs[1][0], runs[2][0], strict=True):
        assert torch.equal(a, b)
    return {per_pass: counts for per_pass, (_, counts) in runs.items()}


def test_the_network_alone_stores_every_blocks_chunk_in_passes(network, monkeypatch):
    """Driven without the transformer, a chunk is stored when the next one starts: the first
    block to start it stores every block's, ``blocks_per_pass`` per compression pass, with the
    spans and outputs of one pass a block, a sink and a rolling window included; a block whose
    chunk was stored so may not rewrite it."""
    passes = by_passes(monkeypatch, network, lambda: rollout(network, 5, 3 * N, N)[0])
    # 5 chunks: the first 4 are stored as the next starts (the first into the sink, uncompressed)
    assert passes == {1: [1] * 6, 2: [2] * 3}
    with adapter.install(network, "fp32"):
        cache = network.initialize_cache(chunk_size=N, window_size=4 * N, sink_size=0,
                                         text_embeddings=torch.zeros(1, 8, 32))
        first, second = cache[0].self_attn, cache[1].self_attn
        for block in (first, second):
            block.before_update(0)
            block.update(torch.randn(1, N, 2, 32), torch.randn(1, N, 2, 32))
            block.after_update(0)
        first.before_update(1)  # stores both blocks' chunk 0
        assert second.chunk is None and second.layer.tokens == N
        with pytest.raises(CacheError, match="cannot be written again"):
            second.before_update(0)


def test_unsupported_settings_raise(network):
    with adapter.install(network, "fp32"):
        with pytest.raises(ConfigError, match="whole chunks"):
            rollout(network, 1, 3 * N, N // 2)
        _, cache = rollout(network, 1, 8 * N, 0)
        with pytest.raises(CacheError, match="expected 0 or 1"):
            cache.before_update(2)
        fresh = adapter.QKVBlockCache(qkv.KVCache("fp32"), 0, chunk_size=N, window_size=4 * N, sink_size=0)
        with pytest.raises(CacheError, match="before the chunk's update"):
            fresh.cached_k()  # upstream's buffer refuses a read outside an update too
    network.blocks[0].self_attn.apply_rope_before_kvcache = False
    try:
        with pytest.raises(ConfigError, match="apply_rope_before_kvcache"):
            adapter.install(network, "fp32")
    finally:
        network.blocks[0].self_attn.apply_rope_before_kvcache = True
    assert "initialize_cache" not in vars(network.blocks[1].self_attn)  # a failed install leaves nothing behind


# -- the transformer (recipes/wan Wan21Transformer), as DiffusionModel.generate / finalize drive it --
@pytest.fixture(scope="module")
def transformer():
    from flashdreams.recipes.wan.transformer.wan21 import Wan21TransformerConfig

    torch.manual_seed(0)
    net = network_mod.WanDiTNetworkConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=8, text_dim=32,
                                          freq_dim=32, in_dim=4, out_dim=4)
    tr = Wan21TransformerConfig(network=net, dtype=torch.float32, len_t=2, window_size_t=16, compile_network=False,
                                use_cuda_graph=False).setup()
    with cpu_kernels(tr.network):
        yield tr


def generate(tr, chunks, watch=None):
    """Each chunk as ``DiffusionModel`` runs it: ``cache.start``, two denoising ``predict_flow``
    calls, ``finalize_kv_cache`` at the context noise (0: the clean latent), ``cache.finalize``;
    ``watch(cache, c)`` after chunk ``c``. Every denoising output."""
    gen = torch.Generator().manual_seed(1)
    outs = []
    with torch.no_grad():
        cache = tr.initialize_autoregressive_cache(height=8, width=8, text_embeddings=torch.randn(1, 8, 32, generator=gen))
        for c in range(chunks):
            cache.start(c)
            x = torch.randn(tr.latent_shape, generator=gen)
            for t in (700.0, 300.0):
                out = tr.predict_flow(x, torch.tensor(t), cache)
                outs.append(out)
                x = x + 0.3 * out
            tr.finalize_kv_cache(noisy_latent=x, timestep=torch.tensor(0.0), cache=cache)
            cache.finalize(c)
            if watch is not None:
                watch(cache, c)
    return outs


def test_the_transformer_stores_each_chunk_at_its_last_write(transformer, no_history_read):
    """Installed on the transformer, every block stores its chunk when finalize_kv_cache has
    written it for the last time: between chunks no block holds one in full precision, and the
    outputs are upstream's; installed on the network alone, the chunk waits for the next one."""
    ref = generate(transformer, 5)

    def held(cache, c, stored):
        blocks = [b.self_attn for b in cache.network_cache.block_caches]
        assert all((b.chunk is None) == stored for b in blocks), c
        assert all(b.layer.tokens == (c + stored) * N for b in blocks), c

    with adapter.install(transformer, "fp32") as handle:
        tokens = []
        ours = generate(transformer, 5, lambda cache, c: (held(cache, c, True), tokens.append(handle.memory().tokens)))
        assert tokens == [2 * (c + 1) * N for c in range(5)]  # 2 blocks, every chunk stored
        assert "finalize_kv_cache" in vars(transformer)
    assert "finalize_kv_cache" not in vars(transformer)
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    with adapter.install(transformer.network, "fp32"):
        generate(transformer, 3, lambda cache, c: held(cache, c, False))


def test_final_chunks_are_compressed_blocks_per_pass_at_a_time(transformer, monkeypatch):
    """The blocks' chunks at their last write go through one compression pass per
    ``blocks_per_pass`` blocks (one a chunk for both blocks here), and the spans and outputs are
    those of one pass a block, bit for bit."""
    passes = by_passes(monkeypatch, transformer, lambda: generate(transformer, 3))
    assert passes == {1: [1] * 6, 2: [2] * 3}  # 3 chunks x 2 blocks
    with pytest.raises(ConfigError, match="blocks_per_pass"):
        adapter.install(transformer, "fp32", blocks_per_pass=0)


def test_a_chunk_stored_at_its_last_write_is_not_written_again(transformer):
    with adapter.install(transformer, "fp32"):
        with pytest.raises(CacheError, match="stored at its last write"):
            generate(transformer, 1, lambda cache, c: cache.start(c))


def test_a_transformer_that_replays_cuda_graphs_is_refused(transformer, monkeypatch):
    monkeypatch.setattr(transformer.config, "use_cuda_graph", True)
    with pytest.raises(ConfigError, match="use_cuda_graph=False"):
        adapter.install(transformer, "fp32")
    assert "finalize_kv_cache" not in vars(transformer)
    assert "initialize_cache" not in vars(transformer.network.blocks[0].self_attn)


# -- context parallelism (gloo ranks) ----------------------------------------------------------------
def _cp_network(group, method):
    """The fixture's tiny network on this rank, its self-attention context-parallel over ``group``
    as ``set_context_parallel_group`` makes it (the mesh on the CPU: upstream names "cuda"), and
    flashdreams' cuDNN SDPA restated with its log-sum-exp ([B, H, S, 1], as cuDNN returns it)."""
    from torch.distributed.device_mesh import DeviceMesh

    from flashdreams.core.attention import cp as cp_mod

    def sdpa_cudnn(query, key, value, return_lse=False):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)[:2]
        return out, (lse.unsqueeze(-1) if return_lse else None)

    cp_mod.torch_sdpa_cudnn = sdpa_cudnn
    rope_mod.apply_rotary_pos_emb = rope_torch
    torch.manual_seed(0)
    net = network_mod.WanDiTNetworkConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=8, text_dim=32,
                                          freq_dim=32, in_dim=4, out_dim=4, cp_method=method).setup().eval()
    net.update_parameters_after_loading_checkpoint()
    net.rope = rope_mod.RotaryPositionEmbedding3D(len_t=2, len_h=4, len_w=4, head_dim=32, h_extrapolation_ratio=1.0,
                                                  w_extrapolation_ratio=1.0, interleaved=True, device="cpu")
    mesh = DeviceMesh.from_group(group, device_type="cpu")
    for block in net.blocks:
        block.self_attn.attn_op.device_mesh = mesh
    return net


def _cp_rollout(net, rank, world, chunks, window, sink):
    """``rollout`` on this rank's token shard of every chunk (and of its RoPE), per-rank sizes."""
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(1, 8, 32, generator=gen)
    n, outs = N // world, []
    with torch.no_grad():
        cache = net.initialize_cache(chunk_size=n, window_size=window // world, sink_size=sink // world,
                                     text_embeddings=text)
        for c in range(chunks):
            x = torch.randn(1, N, 16, generator=gen)[:, rank * n : (rank + 1) * n]
            freqs = net.rope.shift_t(c)[rank * n : (rank + 1) * n]
            for t in (700.0, 300.0, 0.0):
                out = net(x, torch.tensor([t]), cache, freqs, current_chunk_idx=c)
                outs.append(out)
                x = x + 0.3 * out
    return outs, cache


def _cp_worker(rank, world, method):
    import torch.distributed as dist

    net = _cp_network(dist.group.WORLD, method)
    for window, sink in ((8 * N, 0), (3 * N, N)):
        ref, upstream = _cp_rollout(net, rank, world, 8, window, sink)
        with adapter.install(net, "fp32", span_chunks=2) as handle:
            with mock.patch.object(LayerCache, "read", side_effect=AssertionError("the forward path read the history")):
                ours, cache = _cp_rollout(net, rank, world, 8, window, sink)
            layer = cache[0].self_attn.layer
            assert cache[0].self_attn.parallel is not None and len(layer.spans) >= 1
            # a rank holds 1/world of the K/V (2 layers x K, V x 2 heads x 32), as upstream's buffer
            assert handle.memory().elements * world == 2 * 2 * 2 * 32 * min(8 * N, window + sink)
            theirs = upstream[1].self_attn
            theirs.before_update(7)  # a rewrite of the last chunk: its buffer as the forward read it
            mine, want = cache[1].self_attn.cached_k(), theirs.cached_k()  # this rank's tokens, all heads
            assert mine.shape == want.shape and (mine - want).abs().max() <= 1e-5 * want.abs().max()  # as the outputs
            theirs.after_update(7)
        for a, b in zip(ref, ours, strict=True):  # fp32 rounding: partial results merged in another order
            assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (rank, method, window)
        with adapter.install(net, qkv.build_policy("qvg", clusters=4, block=16), span_chunks=2):
            lossy, cache = _cp_rollout(net, rank, world, 8, window, sink)
            mesh = net.blocks[0].self_attn.attn_op.device_mesh
            net.blocks[0].self_attn.attn_op.device_mesh = None  # context parallelism turned off under the cache
            with pytest.raises(CacheError, match="changed after initialize_cache"):
                with torch.no_grad():
                    net(torch.randn(1, N // world, 16), torch.tensor([0.0]), cache, net.rope.shift_t(8)[: N // world],
                        current_chunk_idx=8)
            net.blocks[0].self_attn.attn_op.device_mesh = mesh
        drift = max(float((b - a).norm() / a.norm()) for a, b in zip(ref, lossy))
        assert 0 < drift < 0.03, (rank, method, drift)


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_context_parallel_rollout_matches_upstreams_on_two_ranks(method):
    """flashdreams' own context parallelism (``core/attention/cp.py``: ring all-gathers every rank's
    buffer, Ulysses all-to-alls it by heads) against the adapter's (ring: queries gathered and
    partial results merged; Ulysses: a rank's cache holds its heads), on two gloo ranks: a lossless
    cache gives every rank upstream's outputs up to fp32 rounding, with a sink and rolling window
    too; qvg stays close."""
    from ranks import run_ranks

    run_ranks(_cp_worker, 2, method, timeout=240.0)
