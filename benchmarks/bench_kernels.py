"""GPU kernel benchmark: qkv vs the reference QVG implementation (PyPI quant-videogen 0.1.0).

At the paper's shapes (Self-Forcing span [1, 12, 37440, 128], LongCat span [1, 32, 29640, 128],
bf16), on data with cluster structure and on real K/V tiled to those shapes, measured side by
side in one run: decode time and achieved bandwidth vs the device's copy bandwidth, encode time
at equal k-means iterations and at equal error, and relative MSE on the same tensors; and qkv's
warm-started K+V encode (a streaming cache's steady state) eager and replayed from a CUDA graph.

    python benchmarks/bench_kernels.py --out benchmarks/results/bench_kernels.json [--real PATH]
    PYTHONPATH=. python3 benchmarks/bench_kernels.py --seeding [--small] [--out PATH]
    PYTHONPATH=. python3 benchmarks/bench_kernels.py --warm-encode [--real PATH] [--out PATH]
    PYTHONPATH=. python3 benchmarks/bench_kernels.py --breakdown [--out PATH]
    PYTHONPATH=. python3 benchmarks/bench_kernels.py --decode [--real PATH] [--out PATH]

``--real`` is a safetensors file with ``k``/``v`` [H, S, D] bf16 (real K/V, tiled to the shapes);
``--write-real PATH`` writes one from real keys (no GPU needed): layer 2 of Whisper tiny.en's
encoder over 30,000 tokens of speech (``qkv.realdata``'s ``whisper-encoder``), two 64-dim heads
side by side as one 128-dim head, [3, 30000, 128] (the committed H200 run used it). k-means alone
(random init, 256 clusters) is also timed against flash-kmeans 0.3.1, the reference's k-means.
``--seeding`` measures only the k-means seedings (random / kmeans++ / kmeans||, 256 clusters):
time per span, its GPU time per kernel (the profiler's, on a GPU) and the error after the presets'
5 Lloyd iterations; with ``--small`` at a small shape, on the GPU if there is one and on the CPU otherwise (wall time, torch assignment).
``--warm-encode`` measures only the warm-started encodes, eager and replayed from CUDA graphs.
``--breakdown`` measures only the GPU time per kernel of one 2-iteration encode of a clustered
LongCat span, checked and unchecked (the profiles the full run also writes), for comparing commits
on one machine.
``--decode`` measures only the decodes (the reference's, qkv's qvg and rtn), each against the
GPU time of filling a tensor of its output's shape once (the write floor: the decode writes 7x
the bytes it reads), which every run records beside the copy floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import clustered, copy_bandwidth, gpu_ms, ms, write_json
from safetensors.torch import load_file

import qkv
from qkv.caches.encode_graphs import EncodeGraphs
from qkv.evaluation.metrics import relative_mse

SHAPES = {"self-forcing": (1, 12, 37440, 128), "longcat": (1, 32, 29640, 128)}
SMALL_SHAPES = {"small": (1, 4, 4096, 64)}
# the warm-started encodes: the paper's spans, and one Self-Forcing chunk (a span a chunk, as the
# Self-Forcing adapters store them), where the host's launches weigh most
WARM_SHAPES = {**SHAPES, "self-forcing chunk": (1, 12, 4680, 128)}


def real_tiled(shape, path, key="k") -> torch.Tensor:
    src = load_file(path)[key].cuda()  # [H0, S0, D]
    b, h, s, d = shape
    reps_h = -(-h // src.shape[0])
    reps_s = -(-s // src.shape[1])
    return src.repeat(reps_h, reps_s, 1)[:h, :s].reshape(shape).contiguous()


def write_real(path: str) -> None:
    """Whisper tiny.en encoder keys of layer 2 as [3, 30000, 128] bf16 (heads paired along D)."""
    from einops import rearrange
    from safetensors.torch import save_file

    from qkv.realdata import load_dataset

    k = load_dataset("whisper-encoder")[2].k[0]  # [6, 30000, 64]
    save_file({"k": rearrange(k, "(h two) s d -> h s (two d)", two=2).bfloat16().contiguous()}, path)
    print(f"wrote {path}")


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    return 0


def reference(x, iters):
    from quant_videogen.functions import triton_prq_dequantize_tensor, triton_prq_quantize_tensor

    def enc():
        return triton_prq_quantize_tensor(x, 1, 256, 64, max_iters=iters, quantize_fn=lambda t: 2)

    state = enc()
    dec = lambda: triton_prq_dequantize_tensor(state, 64, 2)  # noqa: E731
    stored = sum(nbytes(state[k]) for k in ("centroids_list", "cluster_ids_list", "residual_quant", "scales"))
    return enc, dec, stored, relative_mse(x, dec())


def ours(x, spec):
    tp = qkv.build_policy(spec).k
    ct = tp.compress(x)
    return (lambda: tp.compress(x)), (lambda: tp.decompress(ct)), ct.nbytes, relative_mse(x, tp.decompress(ct))


def write_floor_ms(x: torch.Tensor, fills: int = 20, reps: int = 10) -> float:
    """GPU time of writing a tensor of ``x``'s shape and dtype once (a fill: ``fills`` of them back
    to back between two CUDA events on the current stream, so that the GPU never waits for a
    launch; the median of ``reps``): a decode that writes that output cannot take less (it also
    reads the codes). Not replayed from a CUDA graph (``gpu_ms``): so timed, with the filled
    tensor freed right after, the LongCat rows' tensors of a ``--decode`` run came out altered
    (their rel. MSE 19-98% below every other run's) in two runs of two on an H100; never with
    events. Not explained."""
    out = torch.empty_like(x)
    out.fill_(1.0)  # warm-up
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(fills):
            out.fill_(1.0)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / fills)
    return statistics.median(times)


def run(args, decode_only: bool = False) -> dict:
    """Every case side by side; ``decode_only``: only the decodes (no encode timing; the 2-iteration
    encodes and rtn), against the write floor and the copy floor."""
    results = {}
    bw = copy_bandwidth()
    results["copy_bandwidth_TBps"] = bw / 1e12
    rows = []
    datasets = ["clustered"] + (["real"] if args.real else [])
    for shape_name, shape in SHAPES.items():
        for data in datasets:
            x = clustered(shape) if data == "clustered" else real_tiled(shape, args.real)
            out_bytes = x.numel() * 2
            write_floor = write_floor_ms(x)
            cases = [("reference (2 it)", *reference(x, 2))]
            if not decode_only:
                cases += [
                    ("reference (20 it)", *reference(x, 20)),
                    ("qkv qvg-ref (2 it)", *ours(x, qkv.build_policy("qvg-ref").spec)),
                    ("qkv qvg-ref, 5 it", *ours(x, qkv.build_policy("qvg-ref", iters=5).spec)),
                    ("qkv qvg-ref, 20 it", *ours(x, "kmeans(iters=20,init=random,tol=0),centroid,int2(mode=sym)")),
                ]
            cases.append(("qkv qvg, 2 it", *ours(x, qkv.build_policy("qvg", iters=2).spec)))
            if decode_only:
                cases.append(("qkv rtn", *ours(x, qkv.build_policy("rtn").spec)))
            else:
                cases += [
                    ("qkv qvg, 2 it, finish=update", *ours(x, qkv.build_policy("qvg", iters=2, finish="update").spec)),
                    ("qkv qvg-ref, finish=update (2 it)", *ours(x, qkv.build_policy("qvg-ref", finish="update").spec)),
                    ("qkv qvg, 20 it", *ours(x, "kmeans(iters=20,init=random,tol=0),centroid,int2")),
                    ("qkv qvg preset (5 it)", *ours(x, qkv.build_policy("qvg").spec)),
                ]
            for name, enc, dec, stored, err in cases:
                t_enc, t_dec = (None if decode_only else ms(enc)), ms(dec)
                rows.append({
                    "shape": shape_name, "data": data, "impl": name, "encode_ms": t_enc,
                    "decode_ms": t_dec, "decode_gpu_ms": gpu_ms(dec), "decode_TBps": (stored + out_bytes) / (t_dec * 1e-3) / 1e12,
                    "decode_frac_of_copy": (stored + out_bytes) / (t_dec * 1e-3) / bw,
                    "write_floor_gpu_ms": write_floor, "stored_bytes": stored, "rel_mse": err,
                })
                r = rows[-1]
                g = r["decode_gpu_ms"]
                r["decode_gpu_frac_of_copy"] = None if g is None else (stored + out_bytes) / (g * 1e-3) / bw
                r["decode_gpu_over_write_floor"] = None if g is None else g / write_floor
                enc_text = "-" if t_enc is None else f"{t_enc:8.3f}"
                print(f"{shape_name:12s} {data:9s} {name:26s} enc {enc_text} ms  dec {t_dec:7.3f} ms "
                      f"({r['decode_TBps']:.2f} TB/s, {100 * r['decode_frac_of_copy']:.0f}% of copy; GPU alone {g} ms, "
                      f"the output's fill {write_floor} ms)  relMSE {err:.5f}", flush=True)
            del x
            torch.cuda.empty_cache()
    results["rows"] = rows
    if decode_only:
        return results
    results["equal_error"] = equal_error(rows)
    x = real_tiled(SHAPES["longcat"], args.real) if args.real else clustered(SHAPES["longcat"])
    results["encode_breakdown"] = encode_breakdown(x)
    results["encode_breakdown_unchecked"] = encode_breakdown(x, validate=False)
    results["seeding"] = seeding({k: SHAPES[k] for k in ("longcat", "self-forcing")}, "cuda")
    results["kmeans_alone"] = kmeans_alone(x)
    results["warm_encode"] = warm_encode(WARM_SHAPES, args.real)
    return results


def warm_encode(shapes: dict, real: str | None) -> list[dict]:
    """A streaming cache's steady-state encode: a span's K and V (here the same tensor twice, so K
    and V are compressed in one pass) warm-started from the previous span, without the value check
    (the cache checks chunks as they come), per call (host included), eagerly and replayed from a
    CUDA graph (``KVCache(encode_graphs=True)``), for 2 and 5 k-means iterations; the eager
    encode's GPU time alone; and both spans' error."""
    rows = []
    for shape_name, shape in shapes.items():
        x = real_tiled(shape, real) if real else clustered(shape)
        for iters in (2, 5):
            policy = qkv.build_policy("qvg", iters=iters)
            warm = policy.compress(x, x)
            graphs = EncodeGraphs()
            eager = lambda: policy.compress(x, x, warm_start=warm, validate=False)  # noqa: E731
            graphed = lambda: policy.compress(x, x, warm_start=warm, validate=False, graphs=graphs)  # noqa: E731
            err = {name: relative_mse(x, policy.decompress(fn())[0]) for name, fn in (("eager", eager), ("graphed", graphed))}
            rows.append({"shape": shape_name, "iters": iters, "eager_ms": ms(eager), "graphed_ms": ms(graphed),
                         "eager_gpu_ms": gpu_ms(eager), "graphs": len(graphs),
                         "rel_mse_eager": err["eager"], "rel_mse_graphed": err["graphed"]})
            print("warm encode", rows[-1], flush=True)
        del x
        torch.cuda.empty_cache()
    return rows


def kmeans_alone(x) -> list[dict]:
    """k-means alone (random init, 256 clusters, no tolerance) at 2 and 5 Lloyd iterations, qkv vs
    flash-kmeans 0.3.1 (``batch_kmeans_Euclid``, the reference's k-means library) on the same
    tokens: time per call, and per further iteration (the 5- minus the 2-iteration time, over 3).
    qkv both ways it can end: with a last assignment pass (its default) and without, as
    flash-kmeans (``finish="update"``: the same passes as flash-kmeans)."""
    from flash_kmeans import batch_kmeans_Euclid

    from qkv.grouping.kmeans import kmeans

    flat = x.flatten(0, 1).contiguous()  # [B*H, S, D]: one row per head
    impls = {
        "qkv": lambda it: kmeans(flat, 256, it, tol=0.0, init="random"),
        "qkv finish=update": lambda it: kmeans(flat, 256, it, tol=0.0, init="random", finish="update"),
        "flash-kmeans": lambda it: batch_kmeans_Euclid(flat, 256, max_iters=it, tol=0.0),
    }
    rows = []
    for name, fn in impls.items():
        t = {it: ms(lambda it=it: fn(it), warmup=10, rep=50) for it in (2, 5)}
        rows.append({"impl": name, "ms_2_iters": t[2], "ms_5_iters": t[5], "ms_per_iter": (t[5] - t[2]) / 3})
        print(f"  k-means alone {name:13s} 2 it {t[2]:.3f} ms, 5 it {t[5]:.3f} ms, per iteration {rows[-1]['ms_per_iter']:.3f} ms")
    return rows


def equal_error(rows) -> list[dict]:
    """For every reference row: the fastest qkv encode whose error is at most the reference's."""
    out = []
    for ref in (r for r in rows if r["impl"].startswith("reference")):
        ours = [r for r in rows if r["impl"].startswith("qkv") and r["shape"] == ref["shape"]
                and r["data"] == ref["data"] and r["rel_mse"] <= ref["rel_mse"]]
        best = min(ours, key=lambda r: r["encode_ms"], default=None)
        out.append({"shape": ref["shape"], "data": ref["data"], "reference": ref["impl"],
                    "reference_encode_ms": ref["encode_ms"], "reference_rel_mse": ref["rel_mse"],
                    "qkv": None if best is None else best["impl"],
                    "qkv_encode_ms": None if best is None else best["encode_ms"],
                    "qkv_rel_mse": None if best is None else best["rel_mse"]})
        print(f"equal error: {ref['shape']} {ref['data']} {ref['impl']} {ref['encode_ms']:.2f} ms "
              f"-> {out[-1]['qkv']} {out[-1]['qkv_encode_ms']}")
    return out


def encode_breakdown(x, validate: bool = True) -> list[dict]:
    """GPU time per kernel of one qvg (2 iterations) encode, from the profiler; ``validate=False``:
    without the value check, as a streaming cache compresses its spans (it checks each chunk as it
    arrives)."""
    tp = qkv.build_policy("qvg", iters=2).k
    return gpu_breakdown(lambda: tp.compress(x, validate=validate), "encode" if validate else "unchecked encode")


def gpu_breakdown(fn, what: str) -> list[dict]:
    """GPU time per kernel of one call of ``fn`` (after one warm-up call), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [
        {"kernel": e.key[:70], "calls": e.count, "cuda_ms": e.device_time_total / 1000}
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    rows.sort(key=lambda r: -r["cuda_ms"])
    total, calls = sum(r["cuda_ms"] for r in rows), sum(r["calls"] for r in rows)
    print(f"  GPU time of one {what}: {total:.3f} ms in {calls} kernels")
    for r in rows[:12]:
        print(f"  {r['cuda_ms']:8.3f} ms  x{r['calls']:<3d} {r['kernel']}")
    return rows


def seeding(shapes: dict, device: str) -> list[dict]:
    """Per shape and seeding: the seeding's time per span (256 clusters, all heads in one call),
    its time replayed from a CUDA graph (None where the capture fails: each seeding draws from a
    seeded ``torch.Generator`` of its own, which a graph captured this way does not register, so
    far always None), its GPU time per kernel, and the k-means objective after the presets' 5
    Lloyd iterations relative to sum |x|^2 (the same data and seed for every seeding)."""
    from qkv.grouping.kmeans import SEEDINGS, kmeans

    rows = []
    for shape_name, shape in shapes.items():
        x = clustered(shape, device=device).flatten(0, 1)  # [B*H, S, D]: one row per head
        energy = x.float().square().sum().item()
        for init, fn in SEEDINGS.items():
            gen = torch.Generator(device=device).manual_seed(0)
            seed_once = lambda: fn(x, 256, gen, "auto")  # noqa: E731
            breakdown = None
            if device == "cuda":
                t, graph = ms(seed_once, warmup=5, rep=50), gpu_ms(seed_once, rep=20)
                breakdown = gpu_breakdown(seed_once, f"{init} seeding")
            else:
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    seed_once()
                    times.append(1e3 * (time.perf_counter() - start))
                t, graph = statistics.median(times), None
            rel = kmeans(x, 256, 5, init=init, seed=0).objective[-1].sum().item() / energy
            rows.append({"shape": shape_name, "init": init, "seed_ms": t, "seed_graph_ms": graph, "rel_objective": rel,
                         "gpu_ms": None if breakdown is None else sum(r["cuda_ms"] for r in breakdown),
                         "gpu_breakdown": breakdown})
            print(f"{shape_name:12s} seeding {init:9s} {t:9.3f} ms per span (CUDA graph: {graph} ms)  "
                  f"objective after 5 iterations / |x|^2 {rel:.5f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/bench_kernels.json")
    parser.add_argument("--real", help="safetensors with real k/v [H, S, D] bf16")
    parser.add_argument("--write-real", metavar="PATH", help="write the real-keys file (see above) and stop")
    parser.add_argument("--seeding", action="store_true", help="time only the k-means seedings")
    parser.add_argument("--small", action="store_true", help="with --seeding: a small shape, CPU if no GPU")
    parser.add_argument("--warm-encode", action="store_true", help="time only the warm-started encodes, eager and graphed")
    parser.add_argument("--breakdown", action="store_true", help="only the GPU time per kernel of one LongCat encode")
    parser.add_argument("--decode", action="store_true", help="only the decodes, with the write floor")
    args = parser.parse_args()
    if args.write_real:
        write_real(args.write_real)
        return
    if args.seeding:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = seeding(SMALL_SHAPES if args.small else {k: SHAPES[k] for k in ("longcat", "self-forcing")}, device)
        write_json(args.out, {"seeding": rows})
        print(f"wrote {args.out}")
        return
    if args.breakdown:
        x = clustered(SHAPES["longcat"])
        write_json(args.out, {"encode_breakdown": encode_breakdown(x),
                              "encode_breakdown_unchecked": encode_breakdown(x, validate=False)})
        print(f"wrote {args.out}")
        return
    if args.warm_encode:
        write_json(args.out, {"warm_encode": warm_encode(WARM_SHAPES, args.real)})
        print(f"wrote {args.out}")
        return
    results = run(args, decode_only=args.decode)
    write_json(args.out, results)
    print(f"copy bandwidth {results['copy_bandwidth_TBps']:.2f} TB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
