"""An open-loop load generator: a seeded Poisson arrival trace with a mix of requests, and a sender
that fires each request at its arrival time whatever the earlier ones are doing.

The trace is drawn once at a rate of one request per second; `arrival_s(rate)` scales the same gaps
to any offered rate, so every load level and every policy sees the very same requests in the very
same order, only closer together or further apart.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tierserve_client.v1 import generate_pb2

from tierserve.benchmarks.streamcall import CallResult, GenerateStub, timed_generate

TIGHT, LOOSE = "tight", "loose"


@dataclass(frozen=True)
class RequestMix:
    """What requests are drawn from; each field independently, uniformly unless weighted."""

    # Share of requests with the tight budgets (the rest get the loose ones).
    tight_share: float = 0.5
    tolerances_pct: tuple[float, ...] = (0.0, 1.0, 10.0)
    # Tolerances of the tight-budget requests, when they differ (None: `tolerances_pct`). A
    # latency-critical caller (autocomplete, chat) often accepts some loss; one that wants
    # zero loss can usually wait.
    tight_tolerances_pct: tuple[float, ...] | None = None
    prompt_words: tuple[int, ...] = (8, 48, 160)
    new_tokens: tuple[int, ...] = (16, 32, 64)
    # Share of requests sent with `strict`: refused rather than served late when the router
    # predicts no worker meets their budgets (clients with a fallback of their own).
    strict_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tight_share", "strict_share"):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        for name in ("tolerances_pct", "prompt_words", "new_tokens"):
            if not getattr(self, name):
                raise ValueError(f"the request mix needs at least one value of {name}")
        if self.tight_tolerances_pct is not None and not self.tight_tolerances_pct:
            raise ValueError("tight_tolerances_pct, when set, needs at least one value")
        if min(self.prompt_words) < 1 or min(self.new_tokens) < 1:
            raise ValueError("prompt_words and new_tokens must be at least 1")


@dataclass(frozen=True)
class TraceItem:
    index: int
    # Arrival time at one request per second; divide by the offered rate for real seconds.
    unit_arrival_s: float
    budget_class: str
    tolerance_pct: float
    prompt_words: int
    new_tokens: int
    # Where in the prompt text this request's prompt starts, as a fraction of the usable range.
    prompt_start: float
    strict: bool = False

    def arrival_s(self, rate: float) -> float:
        return self.unit_arrival_s / rate


def make_trace(count: int, mix: RequestMix, seed: int) -> list[TraceItem]:
    """`count` requests with exponential gaps of mean one second, drawn from `mix`; the same seed
    always gives the same trace."""
    if count < 1:
        raise ValueError(f"a trace needs at least one request, got {count}")
    rng = random.Random(seed)
    # Strictness from its own stream, so a trace without strict requests stays the same.
    strict_rng = random.Random(f"strict-{seed}")
    items, clock = [], 0.0
    for index in range(count):
        clock += rng.expovariate(1.0)
        budget_class = TIGHT if rng.random() < mix.tight_share else LOOSE
        tolerances = mix.tolerances_pct
        if budget_class == TIGHT and mix.tight_tolerances_pct is not None:
            tolerances = mix.tight_tolerances_pct
        items.append(
            TraceItem(
                index=index,
                unit_arrival_s=clock,
                budget_class=budget_class,
                tolerance_pct=rng.choice(tolerances),
                prompt_words=rng.choice(mix.prompt_words),
                new_tokens=rng.choice(mix.new_tokens),
                prompt_start=rng.random(),
                strict=strict_rng.random() < mix.strict_share,
            )
        )
    return items


@dataclass(frozen=True)
class Budgets:
    """Latency budgets in milliseconds for each budget class."""

    tight_ttft_ms: float
    tight_tpot_ms: float
    loose_ttft_ms: float
    loose_tpot_ms: float

    def of(self, budget_class: str) -> tuple[float, float]:
        """(TTFT budget, TPOT budget) of a class."""
        if budget_class == TIGHT:
            return self.tight_ttft_ms, self.tight_tpot_ms
        return self.loose_ttft_ms, self.loose_tpot_ms


def prompt_for(item: TraceItem, words: Sequence[str]) -> str:
    """A window of `item.prompt_words` words of the text (repeated when the text is shorter)."""
    if not words:
        raise ValueError("the prompt text is empty")
    span = max(0, len(words) - item.prompt_words)
    start = int(item.prompt_start * span)
    return " ".join(words[(start + i) % len(words)] for i in range(item.prompt_words))


def to_request(
    item: TraceItem, budgets: Budgets, words: Sequence[str], label: str
) -> generate_pb2.GenerateRequest:
    ttft_ms, tpot_ms = budgets.of(item.budget_class)
    return generate_pb2.GenerateRequest(
        request_id=f"{label}-{item.index}",
        prompt=prompt_for(item, words),
        max_new_tokens=item.new_tokens,
        temperature=0.0,
        max_first_token_latency_ms=ttft_ms,
        max_token_latency_ms=tpot_ms,
        max_quality_loss_pct=item.tolerance_pct,
        strict=item.strict,
    )


@dataclass
class SentCall:
    item: TraceItem
    # Scheduled arrival on the caller's perf_counter clock; result.sent_s - scheduled_s is the sender's lag.
    scheduled_s: float
    result: CallResult


async def run_open_loop(
    stub: GenerateStub,
    trace: Sequence[TraceItem],
    rate: float,
    make_request: Callable[[TraceItem], generate_pb2.GenerateRequest],
    timeout_s: float,
    on_done: Callable[[SentCall], None] | None = None,
) -> tuple[float, list[SentCall]]:
    """Send every request of the trace at its arrival time at `rate` requests per second, without
    waiting for earlier ones; returns the start time and the calls in trace order."""
    if rate <= 0:
        raise ValueError(f"the offered rate must be positive, got {rate}")
    requests = [make_request(item) for item in trace]  # built up front: no work between arrivals
    start = time.perf_counter()

    async def send(item: TraceItem, request: generate_pb2.GenerateRequest) -> SentCall:
        call = SentCall(item, start + item.arrival_s(rate), await timed_generate(stub, request, timeout_s))
        if on_done is not None:
            on_done(call)
        return call

    tasks = []
    for item, request in zip(trace, requests, strict=True):
        delay = start + item.arrival_s(rate) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(item, request)))
    return start, list(await asyncio.gather(*tasks))
