"""GPU time of the stable sorts that can order a span's tokens by cluster (the sorted k-means update).

On random assignments [N, S] of C = 256 clusters at LongCat's and Self-Forcing's spans: torch's
sort of each row (``dim=1``) on uint8 ids, as the update sorted before; one flat sort of every row
at once on int16 (and int32) keys that add n * C to row n's ids (``flat_*``), and the int16 flat
sort with those keys built in the timed call: by an int64 add and a conversion
(``flat_i16_build``) or, as ``order_by_cluster`` builds them, by a conversion and an int16 add
(``flat_i16_build_int16``). ``same``: the flat int16 sort orders every row's tokens as the row
sort does.

    PYTHONPATH=. python3 benchmarks/sort_variants.py --out benchmarks/results/sort_variants.json
"""

from __future__ import annotations

import argparse

import torch
from common import gpu_ms, write_json

SPANS = {"longcat": (32, 29640, 256), "self-forcing": (12, 37440, 256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for name, (n, s, c) in SPANS.items():
        a = torch.randint(0, c, (n, s), device="cuda")
        offsets = torch.arange(n, device="cuda").view(-1, 1) * c
        by_rows = a.to(torch.uint8)
        flat16 = (a + offsets).to(torch.int16).flatten()
        flat32 = (a + offsets).to(torch.int32).flatten()

        def build16():
            keys = a.to(torch.int16)
            keys += (torch.arange(n, dtype=torch.int16, device="cuda") * c).view(-1, 1)
            return torch.sort(keys.flatten(), stable=True)

        def build64():
            return torch.sort((a + offsets).to(torch.int16).flatten(), stable=True)  # noqa: B023 - timed at once

        _, order_rows = torch.sort(by_rows, dim=1, stable=True)
        _, order_flat = build16()
        row = {"span": name, "n": n, "s": s, "c": c,
               "rows_u8": gpu_ms(lambda: torch.sort(by_rows, dim=1, stable=True)),  # noqa: B023 - timed at once
               "flat_i16": gpu_ms(lambda: torch.sort(flat16, stable=True)),  # noqa: B023
               "flat_i32": gpu_ms(lambda: torch.sort(flat32, stable=True)),  # noqa: B023
               "flat_i16_build": gpu_ms(build64),
               "flat_i16_build_int16": gpu_ms(build16),
               "same": bool(torch.equal(order_flat.view(n, s) - torch.arange(n, device="cuda").view(-1, 1) * s, order_rows))}
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
