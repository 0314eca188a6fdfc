"""Measured service figures for the routing benchmark's offered loads and budgets.

Each tier serves the trace's first requests (its mix of prompt and output lengths), pinned to it and
sent one at a time through the router, so nothing queues. From what the client saw, per tier:

- service rate: requests completed per second of busy time (n / the sum of their durations), which
  is what one worker of the tier completes back to back on this mix;
- TTFT and TPOT: medians over those requests, for the derived budgets.

A pool's capacity is the sum of its workers' service rates. It rests on several whole requests of
the real mix rather than on one short warm-up request per tier, which is why it moves little from
run to run on the same machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import grpc
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

from tierserve.benchmarks.livepool import WorkerFacts
from tierserve.benchmarks.loadgen import TraceItem, prompt_for
from tierserve.benchmarks.streamcall import CallResult, timed_generate

CALIBRATION_REQUESTS = 8


@dataclass(frozen=True)
class TierService:
    tier: str
    requests: int
    service_rate_rps: float
    ttft_ms: float
    tpot_ms: float
    # The slowest TTFT alone per prompt length in words (what the trace's requests of that length
    # can count on at best), when the calls' items are known.
    ttft_ms_by_prompt_words: dict[int, float] = field(default_factory=dict)


def service_of(tier: str, results: Sequence[CallResult], items: Sequence[TraceItem] = ()) -> TierService:
    """One tier's figures from its calibration calls (of `items`, when given, in the same order);
    failed calls are refused, not averaged."""
    failed = [r for r in results if not r.ok]
    if failed or not results:
        detail = f"{failed[0].status}: {failed[0].error}" if failed else "no requests"
        raise RuntimeError(f"calibrating tier {tier}: {detail}")
    busy_s = sum(r.done_s - r.sent_s for r in results)
    ttfts = [t for r in results if (t := r.ttft_ms()) is not None]
    tpots = [t for r in results if (t := r.tpot_mean_ms()) is not None]
    by_words: dict[int, float] = {}
    for item, result in zip(items, results, strict=False):
        if (ttft := result.ttft_ms()) is not None:
            by_words[item.prompt_words] = max(ttft, by_words.get(item.prompt_words, 0.0))
    return TierService(
        tier=tier,
        requests=len(results),
        service_rate_rps=len(results) / busy_s,
        ttft_ms=statistics.median(ttfts),
        tpot_ms=statistics.median(tpots) if tpots else 0.0,
        ttft_ms_by_prompt_words=dict(sorted(by_words.items())),
    )


def pool_capacity(facts: Sequence[WorkerFacts], services: Sequence[TierService]) -> float:
    """Requests per second the pool completes with every worker busy, one stream each."""
    by_tier = {s.tier: s for s in services}
    return sum(by_tier[f.tier].service_rate_rps for f in facts if f.tier in by_tier)


def calibrated_facts(facts: Sequence[WorkerFacts], services: Sequence[TierService]) -> list[WorkerFacts]:
    """The workers with their tier's measured TTFT and TPOT in place of their self-reported ones."""
    by_tier = {s.tier: s for s in services}
    return [
        replace(f, ttft_ms=by_tier[f.tier].ttft_ms, tpot_ms=by_tier[f.tier].tpot_ms)
        if f.tier in by_tier
        else f
        for f in facts
    ]


async def calibrate(
    router_address: str,
    tiers: Sequence[str],
    trace: Sequence[TraceItem],
    words: Sequence[str],
    timeout_s: float,
    requests: int = CALIBRATION_REQUESTS,
) -> list[TierService]:
    """Serve the trace's first `requests` items on each tier in turn, one at a time."""
    sample = list(trace[:requests])
    services = []
    async with grpc.aio.insecure_channel(router_address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for tier in tiers:
            results = []
            for item in sample:
                request = generate_pb2.GenerateRequest(
                    request_id=f"calibrate-{tier}-{item.index}",
                    prompt=prompt_for(item, words),
                    max_new_tokens=item.new_tokens,
                    temperature=0.0,
                    tier=tier,
                )
                results.append(await timed_generate(stub, request, timeout_s))
            services.append(service_of(tier, results, sample))
    return services
