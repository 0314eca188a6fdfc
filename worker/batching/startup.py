"""Whether this worker's model can be batched, checked on the model itself before it serves: a
greedy text made in a batch must match the text made alone, or the worker serves one request at
a time and says why in Describe (never silently wrong).

Float tiers must match exactly. Quantized tiers whose kernels quantize activations per batch
(int8-sq's dynamic activation scales, for one) let a row's numbers depend on its neighbours, so a
greedy text may part from the text alone where two tokens are nearly tied; for them the first
tokens must match (a broken cache parts at once) and the agreement is reported."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tierserve.domain.config import BatchingConfig
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.batching.engine import BatchEngine, BatchLimits
from tierserve.worker.engine import Engine, TokenEvent

log = logging.getLogger(__name__)

# Different lengths, so the check covers left padding and a row joining a running batch.
_CHECK_PROMPTS = (
    "The three primary colours are",
    "Write one sentence about the sea, the wind and the boats that sail between the islands:",
)
_CHECK_TOKENS = 12
# Leading tokens a quantized tier's batched text must share with its text alone.
_QUANTIZED_PREFIX_TOKENS = 4
EXACT_TIERS = ("fp32", "bf16")


def start_batching(
    engine: Engine, config: BatchingConfig, tier: str = "fp32"
) -> tuple[BatchEngine | None, str]:
    """A running batch engine for `engine` (of `tier`), or None and the reason requests go one at
    a time; the message says how far batched greedy tokens agreed with those made alone."""
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
    needed = _CHECK_TOKENS if tier in EXACT_TIERS else _QUANTIZED_PREFIX_TOKENS
    try:
        problem, agreed, total = _compare(engine, batch, needed)
    except Exception as error:  # any failure of the batched path means: do not use it
        log.exception("batched self-check failed")
        problem, agreed, total = f"the batched forward failed ({type(error).__name__}: {error})", 0, 0
    if problem:
        batch.stop()
        return None, f"continuous batching unavailable: {problem}; one request at a time"
    return batch, (
        f"continuous batching: up to {config.max_batch} streams, KV cache {config.kv_cache_tokens} tokens "
        f"(self-check: {agreed} of {total} greedy tokens made in a batch equal to those made alone)"
    )


def _compare(engine: Engine, batch: BatchEngine, needed: int) -> tuple[str, int, int]:
    """(a problem if a batched greedy text parts from the text alone too early, tokens that
    agree, tokens compared)."""
    params = [GenerationParams(p, _CHECK_TOKENS, SamplingParams(), (), "batch-check") for p in _CHECK_PROMPTS]
    alone = [_alone(engine, p) for p in params]
    together: list[list[int]] = [[] for _ in params]
    tickets = [
        batch.submit(engine.prepare(p), p, _appender(ids), lambda: False, time.perf_counter())
        for p, ids in zip(params, together, strict=True)
    ]
    for ticket in tickets:
        ticket.future.result(timeout=600)
    agreed = total = 0
    for prompt, one, many in zip(_CHECK_PROMPTS, alone, together, strict=True):
        common = _common_prefix(one, many)
        agreed, total = agreed + common, total + max(len(one), len(many))
        exact_needed = needed >= _CHECK_TOKENS and one != many
        if exact_needed or common < min(needed, len(one), len(many)):
            problem = (
                f"greedy tokens made in a batch part from those made alone after {common} for {prompt!r} "
                f"({engine.tokenizer.decode(one)!r} vs {engine.tokenizer.decode(many)!r})"
            )
            return problem, agreed, total
    return "", agreed, total


Emit = Callable[[TokenEvent], None]


def _appender(ids: list[int]) -> Emit:
    def emit(event: TokenEvent) -> None:
        ids.append(event.token_id)

    return emit


def _alone(engine: Engine, params: GenerationParams) -> list[int]:
    ids: list[int] = []
    engine.generate(engine.prepare(params), params, emit=_appender(ids))
    return ids


def _common_prefix(one: list[int], other: list[int]) -> int:
    for index, (a, b) in enumerate(zip(one, other, strict=False)):
        if a != b:
            return index
    return min(len(one), len(other))
