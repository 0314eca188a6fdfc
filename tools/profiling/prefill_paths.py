"""A prompt's prefill through the batch engine's paged path against the one-request path (IPEX's
own attention), one tier of the default model, prompt length by prompt length in the same run;
the paged path both with every position's logits and with the last one's (`kernels.last_logits`,
what the batch engine runs). A
diagnostic for `bench throughput` (issue 15): every request's prefill is time the running streams
wait, so a slower paged prefill lowers a batch's tokens/s and raises its worst token gap.

    .venv/bin/python tools/profiling/prefill_paths.py --tier bf16 --lengths 16,64,150,256,400

Prints, per prompt length, the median of the repeats (after one discarded warm-up) of each path in
milliseconds, and their ratios to the one-request path.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from tierserve.domain.config import default_config
from tierserve.worker.kernels import decode_attention
from tierserve.worker.kernels.last_logits import prefill_graph
from tierserve.worker.kernels.paged_kv import (
    BlockPool,
    PagedRow,
    blocks_for,
    cache_shape,
    empty_past,
    paged_forward,
)
from tierserve.worker.preparation import prepare_tier


def median_ms(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: the first forward of a new shape costs far more
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def positions_of(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(int(ids.shape[1])).unsqueeze(0)


def paged_prefill(graph: Any, pool: BlockPool, ids: torch.Tensor, keep_from: int | None = None) -> None:
    row = PagedRow()
    paged_forward(graph, pool, [row], ids, positions_of(ids), keep_from=keep_from)
    pool.release(row)


def one_request_prefill(model: Any, layers: int, ids: torch.Tensor) -> None:
    model.trace_graph(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=empty_past(layers, 1),
        position_ids=positions_of(ids),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="bf16")
    parser.add_argument("--lengths", default="16,64,150,256,400", help="prompt lengths in tokens")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = prepare_tier(default_config([0, 1]), args.tier).loaded.model
    kernel = decode_attention.load(decode_attention.default_dir()).kernel
    layers = int(model.config.num_hidden_layers)
    print(
        "| prompt tokens | paged, every position's logits, ms | paged, last position's, ms | "
        "one-request path ms | paged every / one-request | paged last / one-request |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        trimmed = prefill_graph(model)
        if trimmed is None:
            raise SystemExit(f"{args.tier}'s graph could not be trimmed to the last position's logits")
        for length in (int(n) for n in args.lengths.split(",")):
            ids = torch.randint(100, 20000, (1, length), generator=torch.Generator().manual_seed(length))
            pool = BlockPool(cache_shape(model), blocks_for(length) + 1, kernel)
            every_ms = median_ms(partial(paged_prefill, model.trace_graph, pool, ids), args.repeats)
            last_ms = median_ms(partial(paged_prefill, trimmed, pool, ids, length - 1), args.repeats)
            one_ms = median_ms(partial(one_request_prefill, model, layers, ids), args.repeats)
            print(
                f"| {length} | {every_ms:.1f} | {last_ms:.1f} | {one_ms:.1f} | "
                f"{every_ms / one_ms:.2f}x | {last_ms / one_ms:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
