"""A tier's batch step and prompt chunk with tierserve's linear kernels (`woq_int8.cpp`,
`woq_int4.cpp`, `dynamic_int8.cpp`, `bf16_linear.cpp`, `fp32_linear.cpp`) against the same tier on
the kernels they replace (PyTorch's and fbgemm's; IPEX's for bf16 and fp32), side by side in one
process, rounds interleaved so that the machine's drift hits both alike. A diagnostic for issue
15's scaling on CPUs without AMX, not a benchmark of record.

    .venv/bin/python tools/profiling/int8_kernels_ab.py --tier int8-sq --out ab.json
    .venv/bin/python tools/profiling/int8_kernels_ab.py --tier int4-woq --without int4 --out ab.json
    .venv/bin/python tools/profiling/int8_kernels_ab.py --tier bf16 --without bf16 --out ab.json
    .venv/bin/python tools/profiling/int8_kernels_ab.py --tier fp32 --without fp32 --rows 1,2,4,8,16 \
        --out ab.json

Both models come from the tier's one artifact (the stored weights do not depend on the kernel).
Each round times, for each model in turn, a decode step at 1, 8 and 16 rows over caches of
`--length` positions (median of `--steps`; rows `--rows`) and a prompt chunk of `--chunk` tokens prefilled
through the batch's path; the table gives each figure's median over `--rounds` rounds, and the
ratios `throughput_ceiling.py` would derive from them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from batched_step import paged_step
from prefill_paths import median_ms

from tierserve.domain.config import default_config
from tierserve.domain.textsets import calibration_path
from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import decode_attention, linears
from tierserve.worker.kernels.paged_kv import BlockPool, PagedRow, blocks_for, cache_shape, paged_forward
from tierserve.worker.preparation import prepare_tier
from tierserve.worker.tiers import TierContext, make_tier

KERNEL_GETTERS = {
    "int8": "tierserve_int8_kernel",
    "int4": "tierserve_int4_kernel",
    "dynamic": "tierserve_dynamic_int8_kernel",
    "bf16": "tierserve_bf16_kernel",
    "fp32": "tierserve_fp32_kernel",
}


def without_library_int8(load: Callable[[], Any], kernels: tuple[str, ...] = tuple(KERNEL_GETTERS)) -> Any:
    """What `load` gives with tierserve's `kernels` unavailable (aten's and fbgemm's then)."""
    unavailable = {KERNEL_GETTERS[kernel]: lambda: None for kernel in kernels}
    with mock.patch.multiple(linears, **unavailable):
        return load()


def chunk_forward(model: Any, kernel: Any, tokens: int) -> Callable[[], None]:
    """One prompt chunk of `tokens` tokens through the batch's path, from an empty cache."""
    ids = torch.randint(100, 20000, (1, tokens), generator=torch.Generator().manual_seed(1))
    pool = BlockPool(cache_shape(model), blocks_for(tokens) + 1, kernel)

    def run() -> None:
        row = PagedRow()
        paged_forward(model.trace_graph, pool, [row], ids, torch.arange(tokens).unsqueeze(0))
        pool.release(row)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="int8-sq")
    parser.add_argument("--length", type=int, default=201, help="cached positions per row")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", default="1,8,16", help="the batch sizes stepped (1, 8 and 16 among them)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--without",
        default=",".join(KERNEL_GETTERS),
        help=f"the kernels the second model goes without, of {', '.join(KERNEL_GETTERS)} (default all)",
    )
    args = parser.parse_args()
    rows_stepped = [int(rows) for rows in args.rows.split(",")]
    config = default_config([0, 1])
    prepared = prepare_tier(config, args.tier)
    context = TierContext(
        recipe=config.recipe(args.tier), isa=CpuIsa.detect(), calibration_file=calibration_path(config.data)
    )
    without = tuple(args.without.split(","))
    other = without_library_int8(
        lambda: make_tier(args.tier, context).load(prepared.model_dir, prepared.artifact_dir), without
    )
    models = {"tierserve": prepared.loaded, f"without {args.without}": other}
    kernels = {name: loaded.kernel for name, loaded in models.items()}
    attention = decode_attention.load(decode_attention.default_dir()).kernel
    ids = torch.randint(100, 20000, (1, args.length), generator=torch.Generator().manual_seed(0))
    times: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    with torch.inference_mode():
        runs = {}
        for name, loaded in models.items():
            with loaded.run_context():
                runs[name] = {
                    **{
                        f"step {rows}": paged_step(loaded.model, ids, rows, 200, attention)
                        for rows in rows_stepped
                    },
                    f"chunk {args.chunk}": chunk_forward(loaded.model, attention, args.chunk),
                }
        for round_ in range(args.rounds):
            for name, loaded in models.items():
                with loaded.run_context():
                    for what, run in runs[name].items():
                        repeats = args.steps if what.startswith("step") else 3
                        times[name].setdefault(what, []).append(median_ms(run, repeats))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    medians = {name: {what: statistics.median(v) for what, v in t.items()} for name, t in times.items()}
    report = {
        "tier": args.tier,
        "length": args.length,
        "without": without,
        "kernels": kernels,
        "median_ms": medians,
    }
    print(json.dumps(report, indent=2))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    whats = list(next(iter(medians.values())))
    print("| kernels | " + " | ".join(f"{w} ms" for w in whats) + " | 8-row step vs 1 | 16 vs 1 |")
    print("|---|" + "---:|" * (len(whats) + 2))
    for name, m in medians.items():
        cells = " | ".join(f"{m[w]:.2f}" for w in whats)
        print(f"| {name} | {cells} | {m['step 8'] / m['step 1']:.2f}x | {m['step 16'] / m['step 1']:.2f}x |")


if __name__ == "__main__":
    main()
