"""Where a batched decode step's time goes: one tier's traced IPEX graph stepping B rows that
each hold a cache of the same length, on the paged cache the batch engine keeps, with tierserve's
decode-attention kernel and with IPEX's paged kernel side by side in the same run (and, with
`--ipex-layout`, IPEX's own cache layout). A diagnostic for `bench throughput` (issue 15), not a
benchmark of record.

    .venv/bin/python tools/profiling/batched_step.py --tier bf16 --length 400 --out step.json

Prints, per cache and batch size, the median step time and the share of the profiled time in
attention over the cache (the decode kernel, IPEX's `reshape_and_cache` and the Python op that
calls them; IPEX's layout: `ipex::iakv_sdp::*`) and in the linear layers, lm_head included
(the ops differ by CPU: `ipex_prepack::*` and `aten::mm` where bf16 computes in float32,
`torch_ipex::tpp_*` and `ipex_prepack::*` where it computes in bf16), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ipex_layout import BatchKvCache, layer_caches

from tierserve.domain.config import default_config
from tierserve.worker.kernels import decode_attention
from tierserve.worker.kernels.decode_attention import DecodeKernel
from tierserve.worker.kernels.paged_kv import BlockPool, PagedRow, cache_shape, empty_past, paged_forward
from tierserve.worker.preparation import prepare_tier

GROUPS = {
    "attention over the cache": (
        "ipex::iakv_sdp",
        "ipex::single_query_cached_kv_attention",
        "tierserve::decode_attention",
        "ipex::reshape_and_cache",
        "torch_ipex::masked_multihead_self_attention",
    ),
    "linears and lm_head": (
        "ipex_prepack::",
        "torch_ipex::tpp_",
        "aten::mm",
        "aten::addmm",
        "tierserve::bf16_linear",
        "tierserve::fp32_linear",
        "tierserve::int8_",
        "tierserve::int4_",
    ),
}


def ipex_layout_step(model: Any, prompt_cache: Any, length: int, batch: int) -> Callable[[], None]:
    cache = BatchKvCache.of_sequence(prompt_cache, length)
    for _ in range(batch - 1):
        cache.join(BatchKvCache.of_sequence(prompt_cache, length))
    tokens = torch.full((batch, 1), 42, dtype=torch.long)

    def step() -> None:
        positions = torch.full((batch, 1), cache.length, dtype=torch.long)
        result = model.trace_graph(
            input_ids=tokens,
            attention_mask=cache.attention_mask(),
            past_key_values=cache.past_key_values(),
            position_ids=positions,
        )
        cache.advance(result[1], 1)

    return step


def paged_step(
    model: Any,
    ids: torch.Tensor,
    batch: int,
    steps: int,
    kernel: DecodeKernel | None,
    pool: BlockPool | None = None,
) -> Callable[[], None]:
    """A decode step of `batch` rows over copies of `ids`' cache, with room for `steps` steps
    (in `pool` if given, which must have that room)."""
    length = int(ids.shape[1])
    pool = pool or BlockPool(cache_shape(model), batch * (-(-(length + steps) // 16) + 1), kernel)
    rows = [PagedRow() for _ in range(batch)]
    for row in rows:
        paged_forward(model.trace_graph, pool, [row], ids, torch.arange(length).unsqueeze(0))
    tokens = torch.full((batch, 1), 42, dtype=torch.long)

    def step() -> None:
        positions = torch.tensor([[row.length] for row in rows])
        paged_forward(model.trace_graph, pool, rows, tokens, positions)

    return step


def measured(step: Callable[[], None], steps: int) -> tuple[float, dict[str, float]]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with torch.profiler.profile() as profile:
        for _ in range(4):
            step()
    events = profile.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {
        name: round(sum(e.self_cpu_time_total for e in events if e.key.startswith(prefixes)) / total, 3)
        for name, prefixes in GROUPS.items()
    }
    return round(1e3 * statistics.median(times), 1), shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="bf16")
    parser.add_argument("--length", type=int, default=400, help="cached positions per row")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--ipex-layout",
        action="store_true",
        help="also step IPEX's own cache layout (the engine before the paged cache)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ours = decode_attention.load(decode_attention.default_dir())
    if ours.kernel is None:
        raise SystemExit(f"tierserve's decode-attention kernel did not build: {ours.reason}")
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
            # Each cache's step has the 4 profiled steps and the timed ones within its room.
            steps = {
                "paged, tierserve kernel": paged_step(model, ids, batch, args.steps + 8, ours.kernel),
                "paged, IPEX kernel": paged_step(model, ids, batch, args.steps + 8, None),
            }
            if args.ipex_layout:
                steps["ipex layout"] = ipex_layout_step(model, prompt_cache, args.length, batch)
            for cache, step in steps.items():
                step_ms, shares = measured(step, args.steps)
                row = {"cache": cache, "batch": batch, "step_ms_median": step_ms, **shares}
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.out.write_text(json.dumps({"tier": args.tier, "length": args.length, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
