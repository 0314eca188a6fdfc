"""int8 weight-only linear kernels side by side at the row counts a batch gives them: PyTorch's
`_weight_int8pack_mm` (bf16 inputs) and IPEX's weight-only kernel (bf16 compute) as int8-sq's
down_proj runs it (`kernels.ipex_int8_linear`, every call padded by 4 zero rows), and whether a
row's result is the same bits alone and among others. A diagnostic for int8-sq's down_proj, not
a benchmark of record.

    .venv/bin/python tools/profiling/int8_linears.py --out int8-linears.json

Times each kernel over `--layers` distinct weight matrices in turn (so they are read from memory,
as in a forward, not from cache) and prints the median microseconds per call as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tierserve.worker.kernels.ipex_int8_linear import IpexInt8WoqLinear, rows_independent
from tierserve.worker.kernels.linears import Int8WoqLinear
from tierserve.worker.kernels.quantizers import quantize_int8

ROWS = (1, 2, 4, 8, 9, 16, 64, 257)


def per_call_us(calls: list[Callable[[], torch.Tensor]], repeats: int) -> float:
    for call in calls:
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - start) / len(calls))
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-features", type=int, default=576, help="the default model's hidden size")
    parser.add_argument("--in-features", type=int, default=1536, help="the default model's intermediate size")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    weights = [
        quantize_int8(torch.randn(args.out_features, args.in_features, generator=generator) * 0.05)
        for _ in range(args.layers)
    ]
    kernels = {
        "aten _weight_int8pack_mm": [
            Int8WoqLinear(w["qweight"], w["scales"], torch.bfloat16, torch.float32) for w in weights
        ],
        "IPEX weight-only, padded": [
            IpexInt8WoqLinear(w["qweight"], w["scales"], torch.float32) for w in weights
        ],
    }
    rows_out = []
    print(f"{args.out_features} x {args.in_features}, {args.layers} matrices; microseconds per call")
    print("| rows | " + " | ".join(kernels) + " |")
    print("|---:|" + "---:|" * len(kernels))
    with torch.inference_mode():
        independent = {name: rows_independent(layers[0]) for name, layers in kernels.items()}
        # Each kernel's first calls at a new row count build and cache its primitives.
        for rows in ROWS:
            x = torch.randn(rows, args.in_features, generator=generator)
            for layers in kernels.values():
                for layer in layers:
                    layer(x)
        for rows in ROWS:
            x = torch.randn(rows, args.in_features, generator=generator)
            row = {"rows": rows}
            for name, layers in kernels.items():
                row[name] = round(
                    per_call_us([lambda layer=layer, x=x: layer(x) for layer in layers], args.repeats), 1
                )
            rows_out.append(row)
            print(f"| {rows} | " + " | ".join(f"{row[name]:.1f}" for name in kernels) + " |", flush=True)
    print("rows independent of the batch: " + ", ".join(f"{name}: {ok}" for name, ok in independent.items()))
    report = {
        "shape": [args.out_features, args.in_features],
        "layers": args.layers,
        "threads": torch.get_num_threads(),
        "us_per_call": rows_out,
        "rows_independent": independent,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
