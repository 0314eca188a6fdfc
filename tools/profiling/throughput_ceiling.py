"""The most `bench throughput` could measure for a tier on this machine, from its measured parts:
each prompt's prefill and the decode step at 1, 8 and 16 rows. A diagnostic for issue 15's
targets, not a benchmark of record.

    .venv/bin/python tools/profiling/throughput_ceiling.py --tier bf16 --out ceiling.json

In a closed loop each stream's request costs its prompt's prefill, which no other stream shares,
and `new_tokens` decode steps, which the streams share. One stream makes new_tokens tokens in
P + new_tokens x s(1), where P is the mean prefill over the benchmark's prompts and s(N) the
step at N rows. At N streams a prompt's chunks are packed with the rows' step, and a packed
forward costs at least the chunk alone, so each chunk adds at least its prefill less one step:
with every step full and nothing else on the machine (no router, no gRPC, no ramp at the start
and end of a level), N streams make N x new_tokens tokens in no less than
N x mean(max(0, P_i - chunks_i x s(N))) + new_tokens x s(N). The ratio of the two rates bounds
"N vs 1 stream" from above. Prefill is timed through the batch's path (paged cache, chunks of
`--chunk` tokens, logits at the last position only); steps over caches of the benchmark's mean
row length (mean prompt plus half the new tokens) with tierserve's decode kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from batched_step import paged_step
from prefill_paths import median_ms

from tierserve.benchmarks.livepool import prompt_words
from tierserve.benchmarks.throughput.run import make_prompts
from tierserve.domain.config import default_config
from tierserve.worker.kernels import decode_attention, last_logits
from tierserve.worker.kernels.paged_kv import BlockPool, PagedRow, blocks_for, cache_shape, paged_forward
from tierserve.worker.preparation import prepare_tier

NEW_TOKENS = 128
ROWS = (1, 8, 16)


def prefill_ms(model: Any, kernel: Any, ids: torch.Tensor, chunk: int, repeats: int) -> float:
    """One prompt prefilled chunk by chunk through the batch's path, as the engine does alone."""
    graph = last_logits.prefill_graph(model)
    length = int(ids.shape[1])
    pool = BlockPool(cache_shape(model), blocks_for(length) + 1, kernel)

    def prefill() -> None:
        row = PagedRow()
        for start in range(0, length, chunk):
            end = min(length, start + chunk)
            positions = torch.arange(start, end).unsqueeze(0)
            if graph is None:
                paged_forward(model.trace_graph, pool, [row], ids[:, start:end], positions)
            else:
                paged_forward(graph, pool, [row], ids[:, start:end], positions, keep_from=end - start - 1)
        pool.release(row)

    return median_ms(prefill, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="bf16")
    parser.add_argument("--chunk", type=int, default=256, help="prompt tokens per forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = default_config([0, 1])
    loaded = prepare_tier(config, args.tier).loaded
    model, tokenizer = loaded.model, loaded.tokenizer
    kernel = decode_attention.load(decode_attention.default_dir()).kernel
    prompts = make_prompts(prompt_words(config))
    with torch.inference_mode(), loaded.run_context():
        encoded = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
        prefills = [prefill_ms(model, kernel, ids, args.chunk, args.repeats) for ids in encoded]
        mean_prompt = statistics.fmean(int(ids.shape[1]) for ids in encoded)
        length = round(mean_prompt + NEW_TOKENS / 2)
        ids = torch.randint(100, 20000, (1, length), generator=torch.Generator().manual_seed(0))
        steps = {rows: median_ms(paged_step(model, ids, rows, 40, kernel), 12) for rows in ROWS}
    prefill = statistics.fmean(prefills)
    one = prefill + NEW_TOKENS * steps[1]
    chunks = [-(-int(ids.shape[1]) // args.chunk) for ids in encoded]

    def added_by_prompts(rows: int) -> float:
        return statistics.fmean(max(0.0, p - c * steps[rows]) for p, c in zip(prefills, chunks, strict=True))

    ceilings = {
        rows: rows * one / (rows * added_by_prompts(rows) + NEW_TOKENS * steps[rows]) for rows in ROWS
    }
    report = {
        "tier": args.tier,
        "prompt_tokens": [int(ids.shape[1]) for ids in encoded],
        "prefill_ms": [round(ms, 1) for ms in prefills],
        "mean_prefill_ms": round(prefill, 1),
        "cached_positions": length,
        "step_ms": {str(rows): round(ms, 2) for rows, ms in steps.items()},
        "ceiling_vs_1_stream": {str(rows): round(c, 2) for rows, c in ceilings.items() if rows > 1},
        "step_vs_1_row": {str(rows): round(steps[rows] / steps[1], 3) for rows in ROWS if rows > 1},
    }
    print(json.dumps(report, indent=2))
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
