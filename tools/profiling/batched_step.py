"""Where a batched decode step's time goes: one tier's traced IPEX graph stepping B rows that
each hold a cache of the same length, as the batch engine runs it, timed and profiled per batch
size. A diagnostic for `bench throughput` (issue 15), not a benchmark of record.

    .venv/bin/python tools/profiling/batched_step.py --tier bf16 --length 400 --out step.json

Prints, per batch size, the median step time and the share of the profiled time in IPEX's
attention over its cache (`ipex::iakv_sdp::*`), the lm_head (`aten::mm`) and the other linears
(`ipex_prepack::*`), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tierserve.domain.config import default_config
from tierserve.worker.kernels.iakv_cache import BatchKvCache, empty_past, layer_caches
from tierserve.worker.preparation import prepare_tier

GROUPS = {"attention over the cache": "ipex::iakv_sdp", "lm_head": "aten::mm", "linears": "ipex_prepack::"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="bf16")
    parser.add_argument("--length", type=int, default=400, help="cached positions per row")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model = prepare_tier(default_config([0, 1]), args.tier).loaded.model
    layers = int(model.config.num_hidden_layers)
    ids = torch.randint(100, 20000, (1, args.length), generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        out = model.trace_graph(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=empty_past(layers, 1),
            position_ids=torch.arange(args.length).unsqueeze(0),
        )
        prompt_cache = layer_caches(out[1])
        for batch in (int(b) for b in args.batches.split(",")):
            cache = BatchKvCache.of_sequence(prompt_cache, args.length)
            for _ in range(batch - 1):
                cache.join(BatchKvCache.of_sequence(prompt_cache, args.length))
            tokens = torch.full((batch, 1), 42, dtype=torch.long)

            def step(cache: BatchKvCache = cache, tokens: torch.Tensor = tokens, batch: int = batch) -> None:
                positions = torch.full((batch, 1), cache.length, dtype=torch.long)
                result = model.trace_graph(
                    input_ids=tokens,
                    attention_mask=cache.attention_mask(),
                    past_key_values=cache.past_key_values(),
                    position_ids=positions,
                )
                cache.advance(result[1], 1)

            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            with torch.profiler.profile() as profile:
                for _ in range(4):
                    step()
            events = profile.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            shares = {
                name: round(sum(e.self_cpu_time_total for e in events if e.key.startswith(prefix)) / total, 3)
                for name, prefix in GROUPS.items()
            }
            row = {"batch": batch, "step_ms_median": round(1e3 * statistics.median(times), 1), **shares}
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.write_text(json.dumps({"tier": args.tier, "length": args.length, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
