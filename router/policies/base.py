"""What every routing policy shares: the request and worker views, the decision, and the
filters (pinned tier, accuracy tolerance, health, admission) that each raises a clear error.

Policies see workers only through the small `WorkerView` protocol, so tests can use fakes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tierserve.domain import quality
from tierserve.domain.errors import InvalidRequest, NoWorkerAvailable, Overloaded, Unsatisfiable
from tierserve.domain.tiers import REFERENCE_TIER
from tierserve.router.prediction import Prediction

# Bounds of the retry hint sent with RESOURCE_EXHAUSTED.
MIN_RETRY_MS = 50
MAX_RETRY_MS = 60_000
UNKNOWN_RETRY_MS = 1_000


class WorkerView(Protocol):
    @property
    def worker_id(self) -> str: ...

    @property
    def tier(self) -> str: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def quality_loss_pct(self) -> float | None:
        """Perplexity change against fp32 from the worker's accuracy card; None until known."""
        ...

    @property
    def outstanding(self) -> int:
        """Requests the router has on this worker: the one generating and those waiting."""
        ...

    @property
    def has_room(self) -> bool:
        """Whether the worker's bounded queue takes one more request."""
        ...

    @property
    def next_free_ms(self) -> float:
        """Predicted time until the request generating there finishes."""
        ...

    def predict(
        self,
        prompt_tokens: int,
        first_token_budget_ms: float = 0.0,
        new_tokens: int = 0,
        token_budget_ms: float = 0.0,
    ) -> Prediction:
        """Wait, TTFT and TPOT for a request with this many prompt tokens and this TTFT budget
        (0: none) arriving now; the budget sets where it queues (earliest deadline first). Given
        its new tokens, also how many waiting requests it would make late (`displaces`); given its
        per-token budget, whether a batching worker makes it wait for a smaller batch."""
        ...


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at in a request (service-level defaults already applied)."""

    tier: str = ""
    # Largest accepted perplexity change against fp32, in percent; None accepts any tier.
    max_quality_loss_pct: float | None = None
    # Budgets in milliseconds; 0 means none.
    max_first_token_latency_ms: float = 0.0
    max_token_latency_ms: float = 0.0
    strict: bool = False
    # Estimated prompt tokens and the tokens asked for.
    prompt_tokens: int = 1
    new_tokens: int = 16


@dataclass(frozen=True)
class RoutingDecision:
    worker_id: str
    reason: str
    prediction: Prediction | None = None
    # No worker was predicted to meet the budgets; served anyway (not strict).
    best_effort: bool = False


class RoutingPolicy(Protocol):
    name: str

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        """Pick a worker, or raise a TierserveError saying why none can serve."""
        ...


def effective_loss(worker: WorkerView) -> float:
    """The loss a tolerance is compared with, and accuracy is ranked by (`tierserve.domain.quality`);
    a tier that ties the reference never outranks it (see `accuracy_rank`)."""
    return quality.effective_loss(worker.tier, worker.quality_loss_pct)


def accuracy_rank(worker: WorkerView) -> tuple[float, bool]:
    """Most accurate first: by loss, then the reference before tiers that tie it."""
    return effective_loss(worker), worker.tier != REFERENCE_TIER


def within_tolerance(request: RouteRequest, worker: WorkerView) -> bool:
    return quality.within_tolerance(worker.tier, worker.quality_loss_pct, request.max_quality_loss_pct)


def pinned(request: RouteRequest, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """The pinned tier's workers, or all; INVALID_ARGUMENT when the pool does not serve that tier."""
    if not request.tier:
        return list(workers)
    chosen = [w for w in workers if w.tier == request.tier]
    if not chosen:
        served = sorted({w.tier for w in workers})
        raise InvalidRequest(
            "tier", f"tier {request.tier!r} is not served by this pool; served tiers: {', '.join(served)}"
        )
    return chosen


def tolerable(request: RouteRequest, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """Workers within the accuracy tolerance; FAILED_PRECONDITION naming the losses when none is,
    or UNAVAILABLE when a worker whose loss is not known yet is down (it may be within once back)."""
    kept = [w for w in workers if within_tolerance(request, w)]
    if not kept:
        unknown = [w.worker_id for w in workers if w.quality_loss_pct is None and not w.healthy]
        if unknown:
            raise NoWorkerAvailable(
                f"no worker known to be within max_quality_loss_pct={request.max_quality_loss_pct:g}%; "
                f"the accuracy of {', '.join(unknown)} is not known until it is up; retry shortly"
            )
        losses = ", ".join(
            f"{w.worker_id} {w.quality_loss_pct:+.2f}%"
            if w.quality_loss_pct is not None
            else f"{w.worker_id} unknown"
            for w in workers
        )
        raise Unsatisfiable(
            f"no worker is within max_quality_loss_pct={request.max_quality_loss_pct:g}% "
            f"(measured perplexity change: {losses})"
        )
    return kept


def healthy(request: RouteRequest, workers: Sequence[WorkerView]) -> list[WorkerView]:
    kept = [w for w in workers if w.healthy]
    if not kept:
        scope = f"of tier {request.tier!r} " if request.tier else ""
        raise NoWorkerAvailable(f"no healthy worker {scope}within the request's constraints; retry shortly")
    return kept


def retry_hint_ms(workers: Sequence[WorkerView]) -> int:
    """When a place should free up: the soonest any of these workers finishes its current request."""
    soonest = min((w.next_free_ms for w in workers), default=math.inf)
    if not math.isfinite(soonest):
        return UNKNOWN_RETRY_MS
    return int(min(max(math.ceil(soonest), MIN_RETRY_MS), MAX_RETRY_MS))


def admitting(workers: Sequence[WorkerView]) -> list[WorkerView]:
    """Workers whose bounded queue has room; RESOURCE_EXHAUSTED with a retry hint when none has."""
    kept = [w for w in workers if w.has_room]
    if not kept:
        names = ", ".join(w.worker_id for w in workers)
        raise Overloaded(
            f"every eligible worker's queue is full ({names}); retry later", retry_hint_ms(workers)
        )
    return kept


def eligible_workers(request: RouteRequest, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """Pinned tier (or all), within the accuracy tolerance, healthy, with room in the queue."""
    return admitting(healthy(request, tolerable(request, pinned(request, workers))))


def ms(microseconds: float) -> str:
    return f"{microseconds / 1e3:.0f}ms" if microseconds >= 10e3 else f"{microseconds / 1e3:.1f}ms"
