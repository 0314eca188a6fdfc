"""Whether this worker's model can be batched, checked on the model itself before it serves:
greedy text made in a batch must equal the text made alone, or the worker serves one request
at a time and says why in Describe (never silently wrong)."""

from __future__ import annotations

import logging
import time

from tierserve.domain.config import BatchingConfig
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.batching.engine import BatchEngine, BatchLimits
from tierserve.worker.engine import Engine

log = logging.getLogger(__name__)

# Different lengths, so the check covers left padding and a row joining a running batch.
_CHECK_PROMPTS = (
    "The three primary colours are",
    "Write one sentence about the sea, the wind and the boats that sail between the islands:",
)
_CHECK_TOKENS = 12


def start_batching(engine: Engine, config: BatchingConfig) -> tuple[BatchEngine | None, str]:
    """A running batch engine for `engine`, or None and the reason requests go one at a time."""
    if not config.enabled:
        return None, "continuous batching is off ([batching] enabled = false): one request at a time"
    if getattr(engine.loaded.model, "trace_graph", None) is None:
        return (
            None,
            "continuous batching unavailable: the model has no IPEX decoder graph; one request at a time",
        )
    batch = BatchEngine(
        engine, BatchLimits(max_batch=config.max_batch, kv_cache_tokens=config.kv_cache_tokens)
    )
    try:
        problem = _batched_text_differs(engine, batch)
    except Exception as error:  # any failure of the batched path means: do not use it
        log.exception("batched self-check failed")
        problem = f"the batched forward failed ({type(error).__name__}: {error})"
    if problem:
        batch.stop()
        return None, f"continuous batching unavailable: {problem}; one request at a time"
    return (
        batch,
        f"continuous batching: up to {config.max_batch} streams, KV cache {config.kv_cache_tokens} tokens",
    )


def _batched_text_differs(engine: Engine, batch: BatchEngine) -> str:
    params = [GenerationParams(p, _CHECK_TOKENS, SamplingParams(), (), "batch-check") for p in _CHECK_PROMPTS]
    alone = [engine.generate(engine.prepare(p), p, emit=lambda _: None).text for p in params]
    tickets = [
        batch.submit(engine.prepare(p), p, lambda _: None, lambda: False, deadline=time.perf_counter())
        for p in params
    ]
    together = [t.future.result(timeout=600).text for t in tickets]
    for prompt, one, many in zip(_CHECK_PROMPTS, alone, together, strict=True):
        if one != many:
            return f"greedy text in a batch differs from the text alone for {prompt!r}: {one!r} vs {many!r}"
    return ""
