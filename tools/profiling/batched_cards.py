"""Accuracy cards scored two ways on the same model and text: through `generate` (IPEX's own
attention, one request, as the worker's card is scored) and through the batch engine's path (every
evaluation chunk a row of one batch over the paged KV cache, teacher-forced). Issue 15 asks that a
batching worker's card describe its batched path; this measures how far the two are apart. A
diagnostic, not a benchmark of record.

    .venv/bin/python tools/profiling/batched_cards.py --tiers fp32,bf16,int8-sq,int4-woq --out cards.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tierserve.domain.config import default_config
from tierserve.domain.textsets import eval_path, read_paragraphs
from tierserve.worker.accuracy import batched_log_probs, eval_chunks, measure_card, reference_log_probs
from tierserve.worker.preparation import prepare_tier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiers", default="fp32,bf16,int8-sq,int4-woq")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = default_config([0, 1])
    data = config.data
    rows = []
    reference = None
    for tier in args.tiers.split(","):
        prepared = prepare_tier(config, tier)
        loaded = prepared.loaded
        chunks = eval_chunks(
            loaded.tokenizer, read_paragraphs(eval_path(data)), data.eval_tokens, data.eval_chunk_tokens
        )
        if reference is None:
            reference = reference_log_probs(prepared.model_dir, chunks)
        started = time.perf_counter()
        served = measure_card(loaded, chunks, reference)
        served_s = time.perf_counter() - started
        started = time.perf_counter()
        batched = measure_card(loaded, chunks, reference, scored=batched_log_probs(loaded, chunks))
        batched_s = time.perf_counter() - started
        for path, card, seconds in (("generate", served, served_s), ("batched", batched, batched_s)):
            row = {
                "tier": tier,
                "path": path,
                "perplexity_delta_pct": round(card.perplexity_delta_pct, 3),
                "kl_divergence": round(card.kl_divergence, 5),
                "top1_agreement": round(card.top1_agreement, 4),
                "eval_tokens": card.eval_tokens,
                "seconds": round(seconds, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
