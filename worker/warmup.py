"""The warm-up recipe: what a worker runs before its first client, and `bench tiers` before it
measures a path, so both time a model in the same state.

Greedy and sampled decoding trace different graphs, and a longer prompt's prefill another shape;
running all of them first keeps compilation out of the first request's latency. IPEX's sampled
decoding compiles its sampler with torch.compile on first use (6-8 s on 2 Zen 3 cores), and only
a worker serving one request at a time samples through it (a batching worker samples with its own
sampler, `batching/sampler.py`), so the sampled run is warmed only where it will serve
(`warm_sampling`). This module imports neither torch nor IPEX, so the benchmark's plain-transformers
baseline can use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tierserve.domain.requests import GenerationParams, SamplingParams

if TYPE_CHECKING:
    from tierserve.worker.engine import Engine

WARMUP_PROMPT = (
    "The history of computing is a story of machines that grew smaller and faster every decade, "
    "from rooms full of vacuum tubes to chips that fit in a pocket."
)
WARMUP_NEW_TOKENS = 16
# One greedy and one sampled generation per round (top-p and top-k on, seeded).
WARMUP_SAMPLING = (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=1))
# The long prefill is the warm-up prompt repeated this many times: with the prompt itself, two
# prompt lengths give the router a prefill line (fixed cost + per token) before any traffic.
WARMUP_PREFILL_REPEAT = 4


def long_prefill_params(engine: Engine) -> GenerationParams | None:
    """The warm-up prompt repeated, within half the context window; None when not even twice fits."""
    short = GenerationParams(WARMUP_PROMPT, 1, SamplingParams(), (), "warmup-length")
    repeat = min(WARMUP_PREFILL_REPEAT, engine.context_tokens // (2 * engine.prepare(short).prompt_tokens))
    if repeat < 2:
        return None
    return GenerationParams(" ".join([WARMUP_PROMPT] * repeat), 2, SamplingParams(), (), "warmup-prefill")


def warm_up(engine: Engine, runs: int, long_prefill: GenerationParams | None, sampled: bool = True) -> None:
    """`runs` rounds of a greedy and (`sampled`) a sampled generation of the warm-up prompt, then
    the long prefill (when there is one); every output is discarded."""
    for run in range(runs):
        for sampling in WARMUP_SAMPLING if sampled else WARMUP_SAMPLING[:1]:
            params = GenerationParams(WARMUP_PROMPT, WARMUP_NEW_TOKENS, sampling, (), f"warmup-{run}")
            engine.generate(engine.prepare(params), params, emit=lambda _: None)
        if long_prefill is not None:
            engine.generate(engine.prepare(long_prefill), long_prefill, emit=lambda _: None)


def warm_sampling(engine: Engine, runs: int) -> None:
    """`runs` sampled generations of the warm-up prompt through the one-request path."""
    for run in range(runs):
        params = GenerationParams(WARMUP_PROMPT, WARMUP_NEW_TOKENS, WARMUP_SAMPLING[1], (), f"warmup-{run}")
        engine.generate(engine.prepare(params), params, emit=lambda _: None)
