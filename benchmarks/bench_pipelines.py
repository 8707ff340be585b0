"""The pipeline adapters at real sizes, side by side with each client's own cache, on one GPU.

Random weights (no registry carries the real ones), bf16, batch 1, every rollout twice per cache
(the second timed: Triton kernels, cuDNN plans and compiled flex-attention shapes are then warm):

- ``self_forcing``: streamdiffusionv2's ``CausalWanModel`` at Wan2.1-1.3B (30 blocks, 12 x 128,
  FFN 8,960, text 512 x 4,096; no sink, as Self-Forcing), chunks of 3 latent frames x 1,560 tokens (480 x 832 video), per
  chunk 4 denoising forwards (t = 1000, 750, 500, 250) and the clean forward at t = 0 that fills
  the cache (``CausalStreamInferencePipeline.inference_wo_batch``'s loop), global attention (the
  buffer holds the whole rollout). Upstream: its bf16 ``kv_cache`` dicts; qkv:
  ``qkv.adapters.streamdiffusionv2.install(model, policy)`` with meta-device dicts.
- ``self_forcing_github``: Self-Forcing's own inference path (restated in
  ``tests/caches/upstream_self_forcing.py``: its causal Wan model, wrapper, scheduler and
  ``CausalInferencePipeline``) at the same sizes; its buffer holds 21 frames (7 chunks with global
  attention, its rolling window of 21 frames beyond). Upstream: the pipeline's own dicts; qkv:
  ``qkv.adapters.self_forcing.install(pipeline, policy)``.
- ``anyflow_far``: ``AnyFlowFARPipeline.__call__`` itself (prompt embeddings given, no VAE,
  latents out) on a diffusers ``AnyFlowFARTransformer3DModel`` as
  ``nvidia/AnyFlow-FAR-Wan2.1-1.3B-Diffusers`` (Wan2.1-1.3B sizes, full_chunk_limit 3), chunk
  partition 1 + 3 x (chunks - 1) latent frames at 480 x 832, 4 steps of its flow-map scheduler
  per chunk (the read steps) and the cache-prefill after it, no guidance (the pipeline's
  default); flex attention compiled, as diffusers expects. Upstream: the cache tensors
  ``__call__`` allocates; qkv: ``qkv.adapters.anyflow_far.install(pipe)`` (those tensors then
  views of one zero), which also builds the prefill's mask blockwise; so a third
  rollout, ``upstream_blockwise_mask``, runs upstream's cache with that mask
  (``qkv.adapters.anyflow_far.cache_block_mask``): what the cache alone changes; and unless
  ``--option prefill=...`` picks one, qkv runs with both prefills: the default (only the chunks
  the caches lack re-encoded) and ``full_prefill`` in the JSON (the whole context, as upstream).
- ``sana_wm``: diffusers' ``SanaWMLTX2Refiner.__call__`` itself (prompt encoding replaced by
  random embeddings, no VAE) on a ``SanaWMLTX2RefinerTransformer3DModel`` with the class defaults
  (LTX-2's sizes: 48 blocks, 32 x 128), 720 x 1280 video (22 x 40 latent tokens per frame),
  sink 1 + blocks of 3 frames, ``kv_max_frames`` 11, its 3-step distilled schedule. The window
  bounds the cache; qkv: ``qkv.adapters.sana_wm.install``.
- ``flashdreams``: flashdreams' ``Wan21Transformer`` (``recipes/wan``; its network config's
  defaults: Wan2.1-1.3B) driven as ``DiffusionModel.generate`` / ``finalize`` drive it: per chunk
  ``cache.start``, 4 denoising ``predict_flow`` calls, ``finalize_kv_cache`` with the clean
  latent (context noise 0) and ``cache.finalize``; chunks of 3 latent frames x 1,560 tokens,
  global attention (a window of the whole rollout, no sink), eager on both sides (no
  ``torch.compile`` or CUDA graph: the adapter takes none). Upstream: its ``BlockKVCache``
  buffers; qkv: ``qkv.adapters.flashdreams.install(transformer, policy)`` (each chunk stored at
  its last write). ``--tiny`` runs its two CUDA-only kernels restated in torch
  (``tests/caches/upstream_flashdreams.py``).

- ``longcat_video``: LongCat-Video's DiT as restated in ``tests/caches/upstream_longcat_video.py``
  (the GitHub code is not pip-installable; its attention, RoPE and condition cache as upstream,
  flash attention replaced by torch's) at LongCat-Video's sizes (48 blocks, 32 x 128, 4,096
  hidden, umT5 captions; 13.6B parameters made in bf16, the timestep embedding and modulations in
  fp32 as upstream's autocast regions compute them), 480 x 832 video: per chunk (a segment of the
  long-video demo) the condition pass over the last 19 latent frames (29,640 tokens, the
  ``kv_cache_dict``) and ``generate_vc``'s 4 denoising steps with CFG over 5 new latent frames.
  Upstream: the dict's bf16 tensors; qkv: ``qkv.adapters.longcat_video.install``.
- ``hy_worldplay``: HY-WorldPlay's DiT and AR rollout (``_ar_rollout_inner``: memory retrieval,
  the selected frames re-encoded every chunk, 4 denoising steps with CFG) as restated in
  ``tests/caches/upstream_hy_worldplay.py``, at HunyuanVideo-1.5's sizes (WorldPlay-8B's backbone;
  diffusers' ``HunyuanVideo15Transformer3DModel`` defaults: 54 double-stream blocks, 16 x 128,
  MLP ratio 4, text 3,584), 40 x 44 latent tokens per frame (7,040-token chunks of 4 frames), a
  camera that walks forward while it turns away and back, run under bf16 autocast. Upstream: the
  bf16 vision and text K/V its dicts hold at the end; qkv: ``qkv.adapters.hy_worldplay.install``
  (every frame encoded once and kept compressed, so drift includes that change of method).

Per client and cache: per-chunk wall time (synchronized; the clean/prefill/capture forward
included), the KV bytes at the end (upstream: the tensors holding K/V; qkv: ``handle.memory()``),
the rollout's peak GPU memory beyond the weights, and the output drift per chunk (relative L2 of
the last denoising output against the upstream's, free-running). ``capacity``: the longest
rollout whose K/V fit in 24 GiB (global-attention clients), from the measured bytes per chunk.

    bash scripts/setup.sh test
    for c in self_forcing anyflow_far sana_wm flashdreams; do
      PYTHONPATH=. python3 benchmarks/bench_pipelines.py --clients $c --out benchmarks/results/bench_pipelines_h200.json
    done
    PYTHONPATH=. python3 benchmarks/bench_pipelines.py --clients longcat_video --chunks 3 \
      --out benchmarks/results/bench_pipelines_h200.json
    PYTHONPATH=. python3 benchmarks/bench_pipelines.py --clients hy_worldplay --chunks 6 \
      --out benchmarks/results/bench_pipelines_h200.json

``--clients`` picks some (results merge into ``--out``), ``--chunks`` the rollout length (32),
``--span-chunks`` the chunks per compressed span (the adapter's default if not given: one chunk for
Self-Forcing, 8 for AnyFlow-FAR's coarse context; each span carries its own centroids, so short
spans cost bytes: at Self-Forcing sizes 165 MB per chunk with 1-chunk spans, 124 MB with 8),
``--policy`` the compressed policy (qvg), ``--option KEY=VALUE`` an option of the adapter's
``install`` (repeatable; e.g. ``blocks_per_pass=16``, or ``validate=False``: the cache's value
checks off), ``--override KEY=VALUE`` an override of the policy (repeatable; e.g.
``warm_iters=3``), ``--tiny`` a CPU smoke run at toy sizes.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import importlib
import json
import math
import pathlib
import sys
import time
import warnings

import torch

import qkv

GiB = 2**30
BUDGET = 24 * GiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Run:
    """One rollout's measurements: wall time per chunk, peak memory beyond the start (read after
    every chunk, before any later rollout resets the peak), the last denoising output per chunk
    (CPU fp32, for the drift). ``watch``: called after every chunk, untimed."""

    def __init__(self, device: torch.device, watch=None) -> None:
        self.device, self.times, self.outputs, self.peak_bytes, self.watch = device, [], [], None, watch
        self.forwards: list[list[float]] = [[]]  # per chunk, each forward's wall time
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def forward(self):
        """Time one forward of the current chunk (synchronized before and after)."""
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.forwards[-1].append(time.perf_counter() - start)

    def chunk_done(self, output: torch.Tensor) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times.append(now - self.t0)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
        self.outputs.append(output.detach().float().cpu())
        self.forwards.append([])
        if self.watch is not None:
            self.watch()
        self.t0 = time.perf_counter()  # the copy to the CPU and the watch are not timed



class MostHeld:
    """The most an adapter's handle held after any chunk (``handle.memory().total``), as a
    :class:`Run`'s watch."""

    def __init__(self) -> None:
        self.bytes = 0

    def reset(self) -> None:
        self.bytes = 0

    def watch(self, handle):
        """A :class:`Run` watch for ``handle`` (None: no watch)."""
        if handle is None:
            return None
        return lambda: setattr(self, "bytes", max(self.bytes, handle.memory().total))


@contextlib.contextmanager
def profiled(on: bool, trace: str | None = None):
    """Profile the block when ``on``: print the top operators by GPU and by host time, and write
    a Chrome trace to ``trace`` if given."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        yield
        if cuda:
            torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    table = prof.key_averages()
    if cuda:  # by own GPU time, deep enough to hold every kernel qkv adds
        print(table.table(sort_by="self_cuda_time_total", row_limit=70, max_name_column_width=90), flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


@contextlib.contextmanager
def made_in(device: torch.device, dtype: torch.dtype):
    """Modules made in the block get their parameters on ``device`` in ``dtype`` directly (a model
    of billions of parameters is never first made in fp32, or on the CPU)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def restated(module: str):
    """A client's restatement in tests/caches (its GitHub code is not pip-installable)."""
    path = str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "caches")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(module)


def twice(rollout, reset=None):
    """Run ``rollout`` twice (the first warms every kernel and compiled shape), keep the second;
    ``reset`` frees the first rollout's cache before the second starts, so that the second's peak
    is measured from the weights alone."""
    rollout()
    if reset is not None:
        reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rollout()


def drift(reference: Run, run: Run) -> list[float]:
    """Per chunk, the relative L2 of ``run``'s last denoising output against ``reference``'s."""
    return [float((b - a).norm() / a.norm()) for a, b in zip(reference.outputs, run.outputs)]


def compare(upstream: dict, ours: dict, up_run: Run, our_run: Run) -> dict:
    t_up, t_ours = sum(up_run.times), sum(our_run.times)
    return {
        "upstream": {**upstream, "chunk_s": up_run.times, "forward_s": up_run.forwards[:-1],
                     "peak_bytes": up_run.peak_bytes},
        "qkv": {**ours, "chunk_s": our_run.times, "forward_s": our_run.forwards[:-1], "peak_bytes": our_run.peak_bytes},
        "kv_ratio": upstream["kv_bytes"] / ours["kv_bytes"],
        "peak_ratio": (up_run.peak_bytes / our_run.peak_bytes) if up_run.peak_bytes else None,
        "latency_overhead": t_ours / t_up - 1,
        "latency_overhead_last_8": sum(our_run.times[-8:]) / sum(up_run.times[-8:]) - 1,
        "drift": drift(up_run, our_run),
    }


def key_values(items: list[str], flag: str) -> dict:
    """``KEY=VALUE`` items as a dict (each value a Python literal, else a string)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def install_options(args) -> dict:
    """Options for the adapter's ``install``: ``--span-chunks`` if given (else the adapter's
    default) and every ``--option KEY=VALUE``."""
    return {**({} if args.span_chunks is None else {"span_chunks": args.span_chunks}),
            **key_values(args.option, "--option")}


def span_chunks(cache: qkv.KVCache, chunk_tokens: int) -> int:
    """Chunks of ``chunk_tokens`` per span of ``cache``."""
    config = cache.layer(0).config
    return config.span_chunks if config.span_chunks is not None else config.span_tokens // chunk_tokens


def capacity(fixed: float, per_chunk: float, held: int = 0) -> int | None:
    """Chunks whose K/V fit in the budget: ``held`` chunks in ``fixed`` bytes plus ``per_chunk``
    bytes per further chunk (None when nothing was measured: a rollout too short to compress a span)."""
    return held + max(0, math.floor((BUDGET - fixed) / per_chunk)) if per_chunk > 0 else None


# the Self-Forcing-style loop's timesteps per chunk: 4 denoising forwards, then the clean one that
# fills the cache
STEPS = (1000, 750, 500, 250, 0)


def denoise_chunk(args, run: Run, label: str, c: int, x: torch.Tensor, forward, gen: torch.Generator) -> None:
    """Chunk ``c`` of a Self-Forcing-style rollout: ``forward(x, t)`` at each of :data:`STEPS`
    returns the denoised chunk, noised again to the next step's level (the clean forward's output
    is not used); the last denoising output goes to ``run``. Each forward is timed, and profiled
    (``--profile-chunk``, traces named after ``label``) for the chunk asked for."""
    for i, t in enumerate(STEPS):
        trace = f"{args.trace}/{label}_chunk{c}_step{i}.json" if args.trace else None
        with run.forward(), profiled(c == args.profile_chunk and i in (0, 1, len(STEPS) - 1), trace):
            out = forward(x, t)
        if i == len(STEPS) - 2:
            last_denoised = out
        sigma = STEPS[i + 1] / 1000 if i + 1 < len(STEPS) else 0.0
        noise = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        x = ((1 - sigma) * out + sigma * noise).to(x.dtype)
    run.chunk_done(last_denoised)


# -- Self-Forcing (streamdiffusionv2's CausalWanModel) ---------------------------------------------
def self_forcing(args, device, dtype) -> dict:
    from models.wan.causal_model import CausalWanModel

    if args.tiny:
        cfg = dict(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=2, num_layers=2, text_len=8)
        lat_h, lat_w, text = 8, 8, (8, 32)
    else:
        cfg = dict(dim=1536, ffn_dim=8960, freq_dim=256, text_dim=4096, num_heads=12, num_layers=30, text_len=512)
        lat_h, lat_w, text = 60, 104, (512, 4096)
    frames, chunks = 3, args.chunks
    n = frames * (lat_h // 2) * (lat_w // 2)
    with torch.device(device):
        model = CausalWanModel(in_dim=16, out_dim=16, **cfg).to(dtype).eval()
        torch.nn.init.normal_(model.head.head.weight, std=0.02)  # upstream zero-initialises the head
    for block in model.blocks:  # Self-Forcing's default: no sink (streamdiffusionv2's 3 frames are for
        block.self_attn.sink_size = 0  # its rolling window; with global attention upstream never uses it)
    heads, head_dim, blocks = cfg["num_heads"], cfg["dim"] // cfg["num_heads"], cfg["num_layers"]
    capacity_tokens = (chunks + 1) * n  # above the rollout: global attention, no ring buffer

    def dicts(meta: bool) -> tuple[list, list]:
        where = "meta" if meta else device
        kv = [{"k": torch.zeros(1, capacity_tokens, heads, head_dim, dtype=dtype, device=where),
               "v": torch.zeros(1, capacity_tokens, heads, head_dim, dtype=dtype, device=where),
               "global_end_index": torch.tensor([0], device=device), "local_end_index": torch.tensor([0], device=device),
               "total_steps": len(STEPS), "current_step": len(STEPS)} for _ in range(blocks)]
        cross = [{"k": None, "v": None, "is_init": False} for _ in range(blocks)]
        return kv, cross

    held = MostHeld()

    def rollout(meta: bool, handle=None) -> tuple[Run, list]:
        name = "qkv" if meta else "upstream"
        gen = torch.Generator(device).manual_seed(0)
        context = [torch.randn(*text, generator=gen, device=device, dtype=dtype)]
        run = Run(device, held.watch(handle))  # before the cache is allocated: the rollout's peak includes it
        kv, cross = dicts(meta)
        with torch.no_grad():
            for c in range(chunks):
                x = torch.randn(1, 16, frames, lat_h, lat_w, generator=gen, device=device, dtype=dtype)
                start = torch.tensor([c * n], device=device)
                denoise_chunk(args, run, f"self_forcing_{name}", c, x, lambda x, t: model(
                    list(x), torch.full((1, frames), t, device=device), context, seq_len=10**7, kv_cache=kv,
                    crossattn_cache=cross, current_start=start, current_end=start + n), gen)
        return run, kv

    up_run, kv = twice(lambda: rollout(False))
    up_bytes = sum(d[name][:, : chunks * n].numel() * d[name].element_size() for d in kv for name in ("k", "v"))
    del kv
    with qkv.adapters.streamdiffusionv2.install(model, args.policy, **install_options(args)) as handle:
        our_run, _ = twice(lambda: rollout(True, handle), lambda: (handle.reset(), held.reset()))
        mem = handle.memory()
        span = span_chunks(handle.cache, n)
        compressed_chunks = len(handle.cache.layer(0).spans) * span
        per_pass = handle.blocks_per_pass
    bf16_chunk = up_bytes / chunks
    result = compare({"kv_bytes": up_bytes}, {"kv_bytes": mem.total, "kv_bytes_max_after_a_chunk": held.bytes,
                                              "memory": memory_dict(mem)}, up_run, our_run)
    result["span_chunks"] = span
    # qkv: up to a span less one chunk waits in bf16 (the tail), and within the chunk's last model
    # call up to blocks_per_pass blocks' chunk wait for their compression pass
    result["capacity"] = {
        "chunk_tokens": n,
        "upstream_chunks": capacity(0, bf16_chunk),
        "qkv_chunks": capacity((span - 1 + per_pass / blocks) * bf16_chunk, mem.compressed / max(compressed_chunks, 1),
                               span),
    }
    return result


# -- Self-Forcing's GitHub pipeline (restated: tests/caches/upstream_self_forcing.py) -------------
def self_forcing_github(args, device, dtype) -> dict:
    upstream = restated("upstream_self_forcing")

    if args.tiny:
        cfg = dict(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=2, num_layers=2, text_len=8)
        lat_h, lat_w = 8, 8
    else:  # Wan2.1-1.3B, 480 x 832
        cfg = dict(dim=1536, ffn_dim=8960, freq_dim=256, text_dim=4096, num_heads=12, num_layers=30, text_len=512)
        lat_h, lat_w = 60, 104
    frame, chunks = (lat_h // 2) * (lat_w // 2), args.chunks
    # upstream's buffer holds 21 frames (32,760 tokens at 1.3B): 7 chunks with global attention; a
    # longer rollout takes its rolling window of 21 frames
    local = -1 if chunks <= 7 else 21
    with made_in(device, dtype):
        model = upstream.CausalWanModel(in_dim=16, out_dim=16, local_attn_size=local, **cfg).eval()
        torch.nn.init.normal_(model.head.head.weight, std=0.02)  # upstream zero-initialises the head
    pipe = upstream.CausalInferencePipeline(upstream.WanDiffusionWrapper(model))
    pipe.num_transformer_blocks, pipe.frame_seq_length = cfg["num_layers"], frame
    pipe.KV_HEADS, pipe.KV_HEAD_DIM = cfg["num_heads"], cfg["dim"] // cfg["num_heads"]
    pipe.KV_TOKENS, pipe.TEXT_TOKENS = 21 * frame, cfg["text_len"]
    gen = torch.Generator(device).manual_seed(0)
    noise = torch.randn(1, 3 * chunks, 16, lat_h, lat_w, generator=gen, device=device, dtype=dtype)
    prompt = {"prompt_embeds": torch.randn(1, cfg["text_len"], cfg["text_dim"], generator=gen, device=device,
                                           dtype=dtype)}

    held = MostHeld()

    def rollout(handle=None) -> Run:
        pipe.kv_cache1 = pipe.crossattn_cache = None  # the last rollout's: freed before the start
        run = Run(device, held.watch(handle))  # before the pipeline allocates its caches: the peak includes them
        pipe.chunk_done = run.chunk_done
        torch.manual_seed(1)  # the scheduler's re-noising draws: the same for both caches
        with torch.no_grad():
            pipe.inference(noise, prompt)
        return run

    up_run = twice(rollout)
    up_bytes = sum(d[name].numel() * d[name].element_size() for d in pipe.kv_cache1 for name in ("k", "v"))
    with qkv.adapters.self_forcing.install(pipe, args.policy, **install_options(args)) as handle:
        our_run = twice(lambda: rollout(handle), lambda: (handle.reset(), held.reset()))
        mem = handle.memory()
    result = compare({"kv_bytes": up_bytes}, {"kv_bytes": mem.total, "kv_bytes_max_after_a_chunk": held.bytes,
                                              "memory": memory_dict(mem)}, up_run, our_run)
    result["local_attn_size"] = local
    return result


def memory_dict(mem) -> dict:
    return {k: getattr(mem, k) for k in ("compressed", "sink", "tail", "warm_start", "tokens", "total",
                                         "bits_per_element")}


# -- AnyFlow-FAR (diffusers) ---------------------------------------------------------------------------
def anyflow_far(args, device, dtype) -> dict:
    from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel
    from diffusers.schedulers import FlowMapEulerDiscreteScheduler

    from qkv.caches.adapters.anyflow_far import _mask_builder  # the adapter's own mask patch, on upstream's cache

    if args.tiny:
        cfg = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=32, freq_dim=32)
        lat_h, lat_w, text = 8, 8, (8, 32)
    else:
        import torch.nn.attention.flex_attention as fa

        # compiled, as diffusers expects (eager flex attention materializes the scores); the
        # default recompiles once with dynamic shapes when the key length changes
        fa.flex_attention = torch.compile(fa.flex_attention)
        cfg = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                   freq_dim=256)
        lat_h, lat_w, text = 60, 104, (512, 4096)
    part = (1,) + (3,) * (args.chunks - 1)
    limit = 3
    with torch.device(device):
        model = AnyFlowFARTransformer3DModel(in_channels=16, out_channels=16, full_chunk_limit=limit,
                                             chunk_partition=part, **cfg).to(dtype).eval()
    heads, head_dim, blocks = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]
    full, coarse = (lat_h // 2) * (lat_w // 2), (lat_h // 4) * (lat_w // 4)

    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                              scheduler=FlowMapEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)

    def rollout() -> Run:
        """``AnyFlowFARPipeline.__call__`` itself (its cache allocation included); hooks on the
        transformer time each forward and end a chunk at its prefill (the last: at its last step)."""
        gen = torch.Generator(device).manual_seed(0)
        prompt = torch.randn(1, *text, generator=gen, device=device, dtype=dtype)
        latents = torch.randn(1, 16, sum(part), lat_h, lat_w, generator=gen, device=device)
        run, profiling, last = Run(device), contextlib.ExitStack(), {}

        def pre_hook(module, inputs, kwargs):
            if len(run.times) == args.profile_chunk and not run.forwards[-1]:  # the chunk's forwards together
                profiling.enter_context(profiled(True))
            sync(device)
            last["start"] = time.perf_counter()

        def hook(module, inputs, kwargs, output):
            sync(device)
            run.forwards[-1].append(time.perf_counter() - last["start"])
            if kwargs["kv_cache_flag"]["is_cache_step"]:
                profiling.close()
                run.chunk_done(last["pred"])
            else:
                last["pred"] = output[0]

        hooks = [model.register_forward_pre_hook(pre_hook, with_kwargs=True),
                 model.register_forward_hook(hook, with_kwargs=True)]
        try:
            pipe(prompt_embeds=prompt, latents=latents, height=8 * lat_h, width=8 * lat_w,
                 num_frames=4 * (sum(part) - 1) + 1, num_inference_steps=4, chunk_partition=list(part),
                 output_type="latent")
        finally:
            profiling.close()
            for h in hooks:
                h.remove()
        run.chunk_done(last["pred"])  # the last chunk: no prefill after it
        return run

    def blockwise_mask() -> Run:
        """Upstream's own cache, its prefill mask built by ``cache_block_mask`` (as the adapter does)."""
        model.build_attention_mask = _mask_builder(model, model.build_attention_mask)
        try:
            return rollout()
        finally:
            del model.build_attention_mask

    up_run = twice(rollout)
    blockwise_run = twice(blockwise_mask)
    # what the last chunk's read steps attend to besides the chunk: the coarse context and the
    # limit - 1 full-resolution chunks before it
    coarse_tokens, full_tokens = sum(part[: len(part) - limit]) * coarse, sum(part[len(part) - limit : -1]) * full
    per_token = 2 * blocks * heads * head_dim * torch.finfo(dtype).bits // 8  # K and V, all blocks
    up_bytes = (coarse_tokens + full_tokens) * per_token  # what the upstream holds at the last chunk
    with qkv.adapters.anyflow_far.install(pipe, args.policy, **install_options(args)) as handle:
        our_run = twice(rollout, handle.reset)
        mem = handle.memory()
        context = handle.cache.layer(0)
        span = span_chunks(handle.cache, 3 * coarse)
        compressed_context = sum(sp.ckv.nbytes for sp in context.spans) * blocks
        context_chunks = len(context.spans) * span
    allocated = (limit * max(part) * full + (len(part) - limit + 1) * max(part) * coarse) * per_token
    result = compare({"kv_bytes": up_bytes, "allocated_bytes": allocated},
                     {"kv_bytes": mem.total, "memory": memory_dict(mem)}, up_run, our_run)
    result["span_chunks"] = span
    # the same comparison against upstream's cache with the adapter's mask: what the cache alone changes
    alone = compare({"kv_bytes": up_bytes}, {"kv_bytes": mem.total}, blockwise_run, our_run)
    result["upstream_blockwise_mask"] = {
        "chunk_s": blockwise_run.times, "forward_s": blockwise_run.forwards[:-1], "peak_bytes": blockwise_run.peak_bytes,
        # the same mask: 0 up to the compiled kernels' run-to-run rounding
        "drift_vs_upstream": drift(up_run, blockwise_run),
        **{f"qkv_{k}": alone[k] for k in ("peak_ratio", "latency_overhead", "latency_overhead_last_8", "drift")}}
    options = install_options(args)
    if "prefill" not in options:  # also the other prefill: upstream's re-encoding of the whole context
        with qkv.adapters.anyflow_far.install(pipe, args.policy, **options, prefill="full") as handle:
            full_run = twice(rollout, handle.reset)
            full_kv = handle.memory().total
        other = compare({"kv_bytes": up_bytes}, {"kv_bytes": full_kv}, up_run, full_run)
        result["full_prefill"] = {
            **other["qkv"], **{k: other[k] for k in ("kv_ratio", "peak_ratio", "latency_overhead",
                                                     "latency_overhead_last_8", "drift")},
            "peak_ratio_vs_blockwise_mask": blockwise_run.peak_bytes / full_run.peak_bytes if full_run.peak_bytes else None,
            "drift_vs_incremental_prefill": drift(our_run, full_run)}
    coarse_chunk, full_region = 3 * coarse * per_token, (limit - 1) * 3 * full * per_token
    result["capacity"] = {
        "upstream_chunks": capacity(full_region, coarse_chunk, limit - 1),
        # qkv: the full-resolution context as compressed now, up to a span of coarse chunks in bf16
        "qkv_chunks": capacity(mem.compressed - compressed_context + span * coarse_chunk,
                               compressed_context / max(context_chunks, 1), limit - 1 + span),
    }
    return result


# -- SANA-WM refiner (diffusers) -------------------------------------------------------------------------
def sana_wm(args, device, dtype) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2RefinerTransformer3DModel
    from diffusers.pipelines.sana_wm.refiner import SanaWMLTX2Refiner

    if args.tiny:
        cfg = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32,
                   cross_attention_dim=64, num_layers=2, caption_channels=16, audio_in_channels=8,
                   audio_num_attention_heads=2, audio_attention_head_dim=16, audio_cross_attention_dim=32)
        lat_h, lat_w, text, channels = 4, 4, (6, 16), 8
    else:
        cfg = {}  # the class defaults: LTX-2's sizes
        lat_h, lat_w, text, channels = 22, 40, (256, 3840), 128
    with torch.device(device):
        transformer = SanaWMLTX2RefinerTransformer3DModel(**cfg).to(dtype).eval()
    pipe = SanaWMLTX2Refiner(transformer=transformer, connectors=None, tokenizer=None, text_encoder=None,
                             scheduler=FlowMatchEulerDiscreteScheduler(), vae=None)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device).manual_seed(0)
    embeds = torch.randn(1, *text, generator=gen, device=device, dtype=dtype)
    pipe._encode_prompt = lambda prompt, device, dtype: (embeds, torch.ones(1, text[0], dtype=torch.long, device=device))
    sink, block, window = 1, 3, 11
    stage1 = torch.randn(1, channels, sink + block * args.chunks, lat_h, lat_w, generator=gen, device=device, dtype=dtype)
    forwards_per_block = 4  # 3 denoising steps + the capture of the refined block

    def rollout() -> tuple[Run, torch.Tensor]:
        run, calls, profiling = Run(device), [], contextlib.ExitStack()

        def pre_hook(module, inputs, kwargs):
            chunk = len(calls) // forwards_per_block
            if kwargs.get("kv_cache_mode") != "capture_pre_rope" and chunk == args.profile_chunk:
                if len(calls) % forwards_per_block == 0:  # the chunk's forwards, profiled together
                    profiling.enter_context(profiled(True))

        def hook(module, inputs, kwargs, output):
            if kwargs.get("kv_cache_mode") != "capture_pre_rope":
                calls.append(output[0] if isinstance(output, tuple) else output.sample)
                if len(calls) % forwards_per_block == 0:
                    profiling.close()
                    run.chunk_done(calls[-2])  # the last denoising step's output
        removes = [transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   transformer.register_forward_hook(hook, with_kwargs=True)]
        try:
            latents = pipe(stage1, "a prompt", fps=24.0, generator=torch.Generator(device).manual_seed(1),
                           sink_size=sink, block_size=block, kv_max_frames=window, output_type="latent")
        finally:
            profiling.close()
            for remove in removes:
                remove.remove()
        return run, latents

    up_run, _ = twice(rollout)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    per_token = 2 * len(transformer.transformer_blocks) * inner * torch.finfo(dtype).bits // 8
    up_bytes = window * lat_h * lat_w * per_token  # sink + full history, what upstream holds at the end
    with qkv.adapters.sana_wm.install(pipe, args.policy, **install_options(args)) as handle:
        our_run, _ = twice(rollout, handle.reset)
        mem = handle.memory()
    return compare({"kv_bytes": up_bytes}, {"kv_bytes": mem.total, "memory": memory_dict(mem)}, up_run, our_run)


# -- LongCat-Video (GitHub; the DiT restated in tests/caches/upstream_longcat_video.py) --------------------
def longcat_video(args, device, dtype) -> dict:
    upstream = restated("upstream_longcat_video")

    if args.tiny:
        cfg = dict(hidden_size=64, depth=2, num_heads=2, caption_channels=32, adaln_tembed_dim=32,
                   frequency_embedding_size=32)
        cond, noise, lat_h, lat_w, text = 2, 2, 8, 8, (6, 32)
    else:  # LongCat-Video's DiT (13.6B: 48 blocks, 32 x 128, umT5 captions), 480 x 832 video
        cfg = dict(hidden_size=4096, depth=48, num_heads=32, caption_channels=4096, adaln_tembed_dim=512,
                   frequency_embedding_size=256)
        cond, noise, lat_h, lat_w, text = 19, 5, 60, 104, (512, 4096)
    with made_in(device, dtype):  # 13.6B parameters: no fp32 copy first
        dit = upstream.LongCatVideoTransformer3DModel(in_channels=16, out_channels=16, **cfg).eval()
    # upstream computes the timestep embedding and the modulations in fp32 (autocast regions)
    for module in (dit.t_embedder, dit.final_layer.adaLN_modulation, *(b.adaLN_modulation for b in dit.blocks)):
        module.float()
    sigmas = torch.linspace(1.0, 0.0, 5, device=device)  # 4 denoising steps, CFG (guidance 4)
    blocks, inner = cfg["depth"], cfg["hidden_size"]

    def rollout(held: list) -> Run:
        """``segments`` continuations, each conditioned on the last ``cond`` latent frames of the
        video so far: the condition pass (``_cache_clean_latents``) and ``generate_vc``'s steps."""
        gen = torch.Generator(device).manual_seed(0)
        embeds = torch.randn(2, 1, *text, generator=gen, device=device, dtype=dtype)
        mask = torch.ones(2, text[0], dtype=torch.long, device=device)
        video = torch.randn(1, 16, cond, lat_h, lat_w, generator=gen, device=device, dtype=dtype)
        run = Run(device)
        with torch.no_grad():  # no default device: upstream puts its RoPE tables on q's device itself
            for _ in range(args.chunks):
                x = torch.randn(1, 16, noise, lat_h, lat_w, generator=gen, device=device, dtype=dtype)
                with run.forward():
                    kv = upstream.cache_clean_latents(dit, video[:, :, -cond:], *text)
                with run.forward():
                    _, out = upstream.generate_vc(dit, torch.cat([video[:, :, -cond:], x], 2), cond, embeds, mask,
                                                  sigmas, kv_cache_dict=kv)
                held[:] = [kv]
                video = torch.cat([video, out[:, :, cond:].to(dtype)], 2)
                run.chunk_done(out[:, :, cond:])
        return run

    held = []
    up_run = twice(lambda: rollout(held), held.clear)
    up_bytes = sum(t.numel() * t.element_size() for pair in held[0].values() for t in pair)
    held.clear()
    with qkv.adapters.longcat_video.install(dit, args.policy, **install_options(args)) as handle:
        our_run = twice(lambda: rollout(held), held.clear)
        mem = handle.memory()
    held.clear()
    result = compare({"kv_bytes": up_bytes}, {"kv_bytes": mem.total, "memory": memory_dict(mem)}, up_run, our_run)
    per_segment = 2 * blocks * inner * cond * lat_h * lat_w // 4 * torch.finfo(dtype).bits // 8
    result["condition"] = {"latent_frames": cond, "tokens": cond * lat_h * lat_w // 4, "bf16_bytes": per_segment}
    return result


# -- HY-WorldPlay (GitHub; the DiT and AR rollout restated in tests/caches/upstream_hy_worldplay.py) ----------
def hy_worldplay(args, device, dtype) -> dict:
    upstream = restated("upstream_hy_worldplay")

    if args.tiny:
        cfg = dict(in_channels=4, hidden_size=64, heads_num=2, mm_double_blocks_depth=2, rope_dim_list=(8, 12, 12),
                   text_states_dim=24)
        lat_h, lat_w, text = 2, 2, (6, 24)
    else:  # HunyuanVideo-1.5's DiT (8.3B; diffusers' HunyuanVideo15Transformer3DModel defaults), 7,040-token chunks
        cfg = dict(in_channels=32, hidden_size=2048, heads_num=16, mm_double_blocks_depth=54,
                   rope_dim_list=(16, 56, 56), text_states_dim=3584, mlp_width_ratio=4.0)
        lat_h, lat_w, text = 40, 44, (256, 3584)
    channels, frames = cfg["in_channels"], 4 * args.chunks
    with made_in(device, dtype):
        model = upstream.HunyuanVideo_1_5_DiffusionTransformer(**cfg).eval()
        model.add_action_parameters()
    gen = torch.Generator().manual_seed(1)
    timesteps = torch.tensor([1000.0, 750.0, 500.0, 250.0])  # 4 denoising steps, CFG
    points = (torch.randn(300, 3, generator=gen) * 4).to(device)
    yaw = torch.cat([torch.linspace(0, 1.6, frames // 2), torch.linspace(1.6, 0.2, frames - frames // 2)])
    w2c = torch.eye(4).repeat(frames, 1, 1)  # a camera walking forward while it turns away and back
    w2c[:, 0, 0], w2c[:, 0, 2], w2c[:, 2, 0], w2c[:, 2, 2] = yaw.cos(), -yaw.sin(), yaw.sin(), yaw.cos()
    w2c[:, 2, 3] = -0.2 * torch.arange(frames) + 0.05 * torch.randn(frames, generator=gen)
    inputs = dict(
        timesteps=timesteps, prompt_embeds=torch.randn(2, *text, generator=gen).to(device, dtype),
        prompt_mask=torch.ones(2, text[0], dtype=torch.long, device=device),
        vision_states=torch.zeros(2, 1, 8, device=device, dtype=dtype),
        cond_latents=torch.randn(1, channels + 1, frames, lat_h, lat_w, generator=gen).to(device, dtype),
        task_type="i2v", extra_kwargs={"byt5_text_states": torch.zeros(2, 3, 8, device=device),
                                       "byt5_text_mask": torch.ones(2, 3, device=device)},
        viewmats=w2c[None].to(device), Ks=torch.tensor([[1.2, 0, 0.5], [0, 1.2, 0.5], [0, 0, 1.0]]).repeat(
            1, frames, 1, 1).to(device), action=torch.randint(0, 4, (1, frames), generator=gen).float().to(device),
        device=device)
    latents = torch.randn(1, channels, frames, lat_h, lat_w, generator=gen).to(device, dtype)
    pipe = upstream.HunyuanVideo_1_5_Pipeline(model, timesteps, args.chunks, points)
    pipe.target_dtype, pipe.autocast_enabled = dtype, device.type == "cuda"  # upstream runs in bf16 under autocast
    per_chunk = 2 * len(timesteps)  # denoising forwards a chunk: every step, both CFG branches

    def rollout() -> Run:
        run, calls, profiling = Run(device), [], contextlib.ExitStack()

        def denoising(kwargs) -> bool:
            return bool(kwargs.get("ar_vision_inference")) and not kwargs.get("cache_vision")

        def pre_hook(module, inputs_, kwargs):  # the chunk's denoising forwards, profiled together
            if args.profile_chunk is not None and denoising(kwargs) and len(calls) == per_chunk * args.profile_chunk:
                profiling.enter_context(profiled(True))

        def hook(module, inputs_, kwargs, output):  # a chunk ends with its last step's negative branch
            if denoising(kwargs):
                calls.append(1)
                if len(calls) % per_chunk == 0:
                    profiling.close()
                    run.chunk_done(output[0])
        removes = [model.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   model.register_forward_hook(hook, with_kwargs=True)]
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                pipe._ar_rollout_inner(latents=latents.clone(), **inputs)
        finally:
            profiling.close()
            for remove in removes:
                remove.remove()
        return run

    def held_bytes() -> int:
        dicts = [d for name in ("_kv_cache", "_kv_cache_neg") for d in getattr(pipe, name) or []]
        return sum(t.numel() * t.element_size() for d in dicts for t in d.values() if torch.is_tensor(t))

    up_run = twice(rollout, pipe.init_kv_cache)
    up_bytes = held_bytes()
    pipe.init_kv_cache()
    with qkv.adapters.hy_worldplay.install(pipe, args.policy, **install_options(args)) as handle:
        our_run = twice(rollout, handle.reset)
        mem = handle.memory()
    result = compare({"kv_bytes": up_bytes}, {"kv_bytes": mem.total, "memory": memory_dict(mem)}, up_run, our_run)
    result["frame_tokens"] = lat_h * lat_w
    return result


# -- flashdreams (recipes/wan Wan21Transformer) --------------------------------------------------------
def flashdreams(args, device, dtype) -> dict:
    from flashdreams.recipes.wan.transformer.impl.network import WanDiTNetworkConfig
    from flashdreams.recipes.wan.transformer.wan21 import Wan21TransformerConfig

    if args.tiny:
        net_cfg = dict(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=2, num_layers=2, text_len=8)
        lat_h, lat_w = 8, 8
    else:
        net_cfg = {}  # the network config's defaults are Wan2.1-1.3B's
        lat_h, lat_w = 60, 104
    frames, chunks = 3, args.chunks
    n = frames * (lat_h // 2) * (lat_w // 2)
    with made_in(device, dtype):  # eager on both sides: the adapter takes no CUDA graph, so neither does upstream
        tr = Wan21TransformerConfig(network=WanDiTNetworkConfig(**net_cfg), dtype=dtype, len_t=frames,
                                    window_size_t=frames * chunks, compile_network=False, use_cuda_graph=False).setup()
    net = tr.network
    held = MostHeld()

    def rollout(handle=None) -> tuple[Run, object]:
        name = "qkv" if handle is not None else "upstream"
        gen = torch.Generator(device).manual_seed(0)
        text = torch.randn(1, net.text_len, net.text_dim, generator=gen, device=device, dtype=dtype)
        run = Run(device, held.watch(handle))  # before the cache is allocated: the rollout's peak includes it
        with torch.no_grad():
            cache = tr.initialize_autoregressive_cache(height=lat_h, width=lat_w, text_embeddings=text)

            def forward(x, t):  # DiffusionModel.generate's predict_flow calls, then finalize's
                timestep = torch.tensor(float(t), device=device)
                if t > 0:
                    return tr.predict_flow(x, timestep, cache)
                tr.finalize_kv_cache(noisy_latent=x, timestep=timestep, cache=cache)
                cache.finalize(cache.autoregressive_index)  # the chunk cache.start began
                return x

            for c in range(chunks):
                cache.start(c)
                x = torch.randn(tr.latent_shape, generator=gen, device=device, dtype=dtype)
                denoise_chunk(args, run, f"flashdreams_{name}", c, x, forward, gen)
        return run, cache

    with contextlib.ExitStack() as stack:
        if args.tiny:  # flashdreams' RoPE and attention kernels are CUDA-only
            stack.enter_context(restated("upstream_flashdreams").cpu_kernels(net))
        up_run, cache = twice(rollout)
        up_bytes = sum(t.numel() * t.element_size() for b in cache.network_cache.block_caches
                       for t in (b.self_attn._k, b.self_attn._v))
        del cache
        with qkv.adapters.flashdreams.install(tr, args.policy, **install_options(args)) as handle:
            our_run, _ = twice(lambda: rollout(handle), lambda: (handle.reset(), held.reset()))
            mem = handle.memory()
            span = span_chunks(handle.cache, n)
            compressed_chunks = len(handle.cache.layer(0).spans) * span
    result = compare({"kv_bytes": up_bytes}, {"kv_bytes": mem.total, "kv_bytes_max_after_a_chunk": held.bytes,
                                              "memory": memory_dict(mem)}, up_run, our_run)
    result["span_chunks"] = span
    # qkv: up to a span less one chunk waits in bf16 (the tail); each chunk is stored at its last write
    result["capacity"] = {
        "chunk_tokens": n,
        "upstream_chunks": capacity(0, up_bytes / chunks),
        "qkv_chunks": capacity((span - 1) * up_bytes / chunks, mem.compressed / max(compressed_chunks, 1), span),
    }
    return result


CLIENTS = {"self_forcing": self_forcing, "self_forcing_github": self_forcing_github, "anyflow_far": anyflow_far,
           "sana_wm": sana_wm, "longcat_video": longcat_video, "hy_worldplay": hy_worldplay,
           "flashdreams": flashdreams}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--policy", default="qvg")
    parser.add_argument("--clusters", type=int, help="k-means clusters per span (the policy's own if not given)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the policy (repeatable; qkv.build_policy's: e.g. warm_iters=3)")
    parser.add_argument("--profile-chunk", type=int,
                        help="print the profiler's top operators for this chunk of every rollout (slows that chunk; "
                             "SANA-WM: its refined block's forwards together)")
    parser.add_argument("--trace", help="with --profile-chunk: a folder for the profiled forwards' Chrome traces")
    parser.add_argument("--span-chunks", type=int,
                        help="chunks per compressed span (Self-Forcing, AnyFlow-FAR; the adapter's default if not given)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option for the adapter's install (repeatable), e.g. blocks_per_pass=16 or validate=False")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/bench_pipelines_h200.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.trace:
        pathlib.Path(args.trace).mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    out = pathlib.Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    overrides = {**({"clusters": args.clusters} if args.clusters is not None else {}),
                 **key_values(args.override, "--override")}
    if args.tiny:  # head_dim 32 at toy sizes: smaller quantizer blocks and fewer clusters
        overrides = {"block": 16, "clusters": 8, **overrides}
    if overrides:
        args.policy = qkv.build_policy(args.policy, **overrides)
    for name in args.clients.split(","):
        torch.manual_seed(0)
        results[name] = {"chunks": args.chunks, "policy": str(args.policy), "install_options": install_options(args),
                         **CLIENTS[name](args, device, dtype)}
        r = results[name]
        print(f"{name}: KV {r['kv_ratio']:.2f}x smaller, peak {r['peak_ratio'] or float('nan'):.2f}x, "
              f"latency {100 * r['latency_overhead']:+.1f}% (last 8 chunks {100 * r['latency_overhead_last_8']:+.1f}%), "
              f"drift max {max(r['drift']):.2e}, capacity {r.get('capacity')}", flush=True)
        if "upstream_blockwise_mask" in r:
            b = r["upstream_blockwise_mask"]
            print(f"  against upstream with the blockwise mask: peak {b['qkv_peak_ratio'] or float('nan'):.2f}x, "
                  f"latency {100 * b['qkv_latency_overhead']:+.1f}%; that mask's drift from upstream's "
                  f"{max(b['drift_vs_upstream']):.2e}", flush=True)
        if "full_prefill" in r:
            i = r["full_prefill"]
            print(f"  with prefill=\"full\": KV {i['kv_ratio']:.2f}x smaller, peak {i['peak_ratio'] or float('nan'):.2f}x, "
                  f"latency {100 * i['latency_overhead']:+.1f}% (last 8 chunks {100 * i['latency_overhead_last_8']:+.1f}%), "
                  f"drift max {max(i['drift']):.2e} ({max(i['drift_vs_incremental_prefill']):.2e} from the incremental "
                  "prefill's)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results.pop("environment", None)
    if args.tiny:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    else:
        from common import write_json

        write_json(out, results)


if __name__ == "__main__":
    main()
