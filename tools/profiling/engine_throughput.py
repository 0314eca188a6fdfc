"""Closed-loop tokens/s of one tier's batch engine in this process, no gRPC, no router: what the
batch itself reaches, with the prompt-chunk options side by side in the same run. A diagnostic
for `bench throughput` (issue 15), not a benchmark of record.

    .venv/bin/python tools/profiling/engine_throughput.py --tier bf16 --streams 1,8,16 --out engine.json

Each variant (prompt chunks packed with the rows' step or not; a prompt's logits at its last
position only or at every one) serves, per stream count, that many streams each sending the next
greedy request as soon as its last ends (at least 8 requests per level), with the prompts of
`bench throughput` (16 to 320 words) and 128 new tokens. The engine steps on the main thread (as a
worker's does: see `BatchEngine.run`). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve.benchmarks.livepool import prompt_words
from tierserve.benchmarks.throughput.run import make_prompts
from tierserve.domain.config import default_config
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.batching.engine import BatchEngine, BatchLimits
from tierserve.worker.engine import Engine
from tierserve.worker.kernels import decode_attention, last_logits
from tierserve.worker.preparation import prepare_tier

NEW_TOKENS = 128


@dataclass(frozen=True)
class Variant:
    name: str
    packed: bool
    last_logits: bool


VARIANTS = (
    Variant("packed, last logits", packed=True, last_logits=True),
    Variant("packed, every position's logits", packed=True, last_logits=False),
    Variant("chunk alone, last logits", packed=False, last_logits=True),
    Variant("chunk alone, every position's logits", packed=False, last_logits=False),
)


def closed_loop(batch: BatchEngine, engine: Engine, prompts: list[str], streams: int) -> dict[str, float]:
    """Tokens/s of `streams` closed-loop streams; called off the engine's thread."""
    per_stream = max(2, -(-8 // streams))
    order = itertools.count()
    made: list[int] = []
    lock = threading.Lock()

    def stream() -> None:
        for _ in range(per_stream):
            index = next(order)
            request = GenerationParams(
                prompts[index % len(prompts)], NEW_TOKENS, SamplingParams(), (), f"engine-{index}"
            )
            outcome = batch.submit(
                engine.prepare(request), request, lambda _: None, lambda: False, time.perf_counter()
            ).future.result()
            with lock:
                made.append(outcome.generated_tokens)

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"streams": streams, "tokens": sum(made), "seconds": seconds, "tokens_per_s": sum(made) / seconds}


def run_variant(
    variant: Variant, engine: Engine, prompts: list[str], levels: list[int], kernel: Any
) -> list[dict[str, float]]:
    graph = last_logits.prefill_graph(engine.loaded.model)
    limits = BatchLimits(max_batch=max(levels), packed_prefill=variant.packed)
    results: list[dict[str, float]] = []
    with BatchEngine(engine, limits, in_own_thread=False, decode_kernel=kernel) as batch:
        batch._prefill_graph = graph if variant.last_logits else None  # the variant's prefill graph

        def drive() -> None:
            closed_loop(batch, engine, prompts, 1)  # warm-up
            results.extend(closed_loop(batch, engine, prompts, n) for n in levels)
            batch.stop()

        driver = threading.Thread(target=drive)
        driver.start()
        batch.run()
        driver.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="bf16")
    parser.add_argument("--streams", default="1,8,16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = default_config([0, 1])
    levels = [int(n) for n in args.streams.split(",")]
    engine = Engine(prepare_tier(config, args.tier).loaded)
    kernel = decode_attention.load(decode_attention.default_dir()).kernel
    prompts = make_prompts(prompt_words(config))
    report: dict[str, Any] = {"tier": args.tier, "new_tokens": NEW_TOKENS, "variants": {}}
    print("| variant | streams | tokens | seconds | tokens/s | vs 1 stream |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in VARIANTS:
        results = run_variant(variant, engine, prompts, levels, kernel)
        report["variants"][variant.name] = results
        one = next((r["tokens_per_s"] for r in results if r["streams"] == 1), None)
        for r in results:
            ratio = f"{r['tokens_per_s'] / one:.2f}x" if one else "-"
            print(
                f"| {variant.name} | {r['streams']} | {r['tokens']} | {r['seconds']:.2f} | "
                f"{r['tokens_per_s']:.1f} | {ratio} |",
                flush=True,
            )
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
