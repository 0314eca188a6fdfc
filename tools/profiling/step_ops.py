"""A batched decode step op by op, one row against eight: which ops grow with the batch and which
are a fixed cost per step (issue 15's scaling). A diagnostic, not a benchmark of record.

    .venv/bin/python tools/profiling/step_ops.py --tier int8-sq --length 250 --out step-ops.json

Steps the tier's traced graph over the paged cache the batch engine keeps (tierserve's decode
kernel), every row holding `--length` cached positions, and prints the median step time and each
op's self time per step under torch's profiler at 1 and at `--rows` rows, largest first; and the
same steps with the attention op unfused (its torch calls made from Python, as before
`tierserve::paged_decode`), side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from batched_step import paged_step
from prefill_paths import median_ms

from tierserve.domain.config import default_config
from tierserve.worker.kernels import decode_attention
from tierserve.worker.kernels.paged_kv import BlockPool, cache_shape
from tierserve.worker.preparation import prepare_tier

TOP_OPS = 20
PROFILED_STEPS = 4


def profiled(step: Any, steps: int) -> tuple[float, dict[str, tuple[float, int]]]:
    """Median ms of `steps` steps, and each op's (self ms, calls) per step."""
    for _ in range(4):
        step()
    median = median_ms(step, steps)
    with torch.profiler.profile() as profile:
        for _ in range(PROFILED_STEPS):
            step()
    ops = {
        e.key: (e.self_cpu_time_total / PROFILED_STEPS / 1e3, e.count // PROFILED_STEPS)
        for e in profile.key_averages()
    }
    return median, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="bf16")
    parser.add_argument("--length", type=int, default=250, help="cached positions per row")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded = prepare_tier(default_config([0, 1]), args.tier).loaded
    kernel = decode_attention.load(decode_attention.default_dir()).kernel
    if kernel is None:
        raise SystemExit("tierserve's decode-attention kernel did not build")
    ids = torch.randint(100, 20000, (1, args.length), generator=torch.Generator().manual_seed(0))
    measured: dict[int, tuple[float, dict[str, tuple[float, int]]]] = {}
    unfused: dict[int, float] = {}
    room = -(-(args.length + 2 * (args.steps + PROFILED_STEPS + 5)) // 16) + 1
    with torch.inference_mode(), loaded.run_context():
        for rows in (1, args.rows):
            pool = BlockPool(cache_shape(loaded.model), rows * room, kernel)
            step = paged_step(loaded.model, ids, rows, args.steps, kernel, pool)
            measured[rows] = profiled(step, args.steps)
            # The same step with the attention op's dozen torch calls from Python, side by side.
            fused, pool.fused_decode = pool.fused_decode, None
            unfused[rows] = profiled(step, args.steps)[0]
            pool.fused_decode = fused
    (one_ms, one), (many_ms, many) = measured[1], measured[args.rows]
    print(
        f"{args.tier}, {args.length} cached positions: step {one_ms:.2f} ms at 1 row,",
        f"{many_ms:.2f} at {args.rows}",
    )
    print(f"unfused attention op: {unfused[1]:.2f} ms at 1 row, {unfused[args.rows]:.2f} at {args.rows}")
    print(f"| op | ms at 1 row | ms at {args.rows} rows | calls per step |")
    print("|---|---:|---:|---:|")
    names = sorted(set(one) | set(many), key=lambda name: -many.get(name, (0.0, 0))[0])[:TOP_OPS]
    rows_out = []
    for name in names:
        alone, batched = one.get(name, (0.0, 0)), many.get(name, (0.0, 0))
        print(f"| `{name}` | {alone[0]:.2f} | {batched[0]:.2f} | {batched[1]} |")
        rows_out.append(
            {"op": name, "ms_1_row": round(alone[0], 3), "ms_rows": round(batched[0], 3), "calls": batched[1]}
        )
    report = {
        "tier": args.tier,
        "length": args.length,
        "rows": args.rows,
        "step_ms_1_row": round(one_ms, 2),
        "step_ms_rows": round(many_ms, 2),
        "unfused_step_ms_1_row": round(unfused[1], 2),
        "unfused_step_ms_rows": round(unfused[args.rows], 2),
        "ops": rows_out,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
