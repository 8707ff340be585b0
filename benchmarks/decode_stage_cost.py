"""What qvg's centroids cost one-query decoding: the decode kernel's time without them.

At the Llama-3-8B attention shapes of ``bench_decode.py`` (1 x 32k, 1 x 128k, 8 x 32k history in
spans of 4,096 tokens, one query), ``KVCache.attend`` over a ``qvg`` cache replayed from a CUDA
graph, as it runs and with its launches' layouts stripped of the value stage (no centroid rows
gathered under the value tiles), of the key stage (no q . c table built or read), or of both.
Without a stage the output is wrong: the rows are timings only, of the same codes, tiles and
launch sizes, so each difference is what that stage's centroids cost. ``rtn`` (no stages, the
same 2-bit codes) and bf16 SDPA on the same tokens for scale.

    python benchmarks/decode_stage_cost.py --out benchmarks/results/decode_stage_cost_h100.json
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F

from bench_decode import HEAD_DIM, HEADS, build, graph_timed, history
from common import gpu_main_args, overridden, write_json

import qkv.kernels.triton.decode as decode

CASES = ((1, 32 * 1024), (1, 128 * 1024), (8, 32 * 1024))
# (row name, value stage dropped, key stage dropped)
MODES = (("as_is", False, False), ("no_value_stage", True, False), ("no_key_stage", False, True),
         ("no_stages", True, True))


def stripped(static, values: bool, keys: bool):
    """``decode._static`` whose launches read the spans without the value and/or key stage."""

    def strip(plan, q, h_kv, tile):
        st = static(plan, q, h_kv, tile)
        launches = []
        for group, *constexprs, scores in st.launches:
            changed = []
            for kw in constexprs:
                kw = dict(kw)
                if values and kw["V"].STAGES:
                    kw["V"] = dataclasses.replace(kw["V"], A_T=())
                if keys and kw["K"].STAGES:
                    kw["K"] = dataclasses.replace(kw["K"], A_T=())
                    kw["KEY_SCORES"] = False
                changed.append(kw)
            launches.append((group, *changed, None if keys else scores))
        return dataclasses.replace(st, launches=tuple(launches))

    return strip


def main() -> None:
    args = gpu_main_args(__doc__, "decode_stage_cost.py")
    rows = []
    for batch, tokens in CASES:
        k, v = history(batch, tokens)
        q = (torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda") * 0.5).bfloat16()
        row = {"batch": batch, "history": tokens, "queries": 1}
        for policy in ("qvg", "rtn"):
            cache = build(policy, k, v)
            for name, values, keys in MODES if policy == "qvg" else MODES[:1]:
                with overridden(decode, {"_static": stripped(decode._static, values, keys)}):
                    row[f"{policy}_{name}_ms"] = graph_timed(lambda: cache.attend(0, q))
            del cache
        row["bf16_sdpa_ms"] = graph_timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        print(json.dumps(row), flush=True)
        rows.append(row)
        del k, v
        torch.cuda.empty_cache()
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
