"""Routing policies: given a request and the workers, pick one and say why.

A policy is one class with one method, registered by name; the config names it.
Policies see workers only through the small `WorkerView` protocol, so tests can
use fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tierserve.config import ConfigError
from tierserve.errors import InvalidRequest, NoWorkerAvailable, Unsatisfiable


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


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at in a request."""

    tier: str = ""
    # Largest accepted perplexity change against fp32, in percent; None accepts any tier.
    max_quality_loss_pct: float | None = None


@dataclass(frozen=True)
class RoutingDecision:
    worker_id: str
    reason: str


class RoutingPolicy(Protocol):
    name: str

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        """Pick a worker, or raise a TierserveError saying why none can serve."""
        ...


def within_tolerance(request: RouteRequest, worker: WorkerView) -> bool:
    if request.max_quality_loss_pct is None:
        return True
    loss = worker.quality_loss_pct
    return loss is not None and loss <= request.max_quality_loss_pct


def eligible_workers(request: RouteRequest, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """The workers a request may go to: its pinned tier's (or all), within its accuracy tolerance,
    healthy. Raises, naming the constraint that left none."""
    if request.tier:
        served = sorted({w.tier for w in workers})
        pinned = [w for w in workers if w.tier == request.tier]
        if not pinned:
            raise InvalidRequest(
                "tier", f"tier {request.tier!r} is not served by this pool; served tiers: {', '.join(served)}"
            )
        workers = pinned
    tolerable = [w for w in workers if within_tolerance(request, w)]
    if not tolerable:
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
    healthy = [w for w in tolerable if w.healthy]
    if not healthy:
        scope = f"of tier {request.tier!r} " if request.tier else ""
        raise NoWorkerAvailable(f"no healthy worker {scope}within the request's constraints; retry shortly")
    return healthy


class FirstHealthyPolicy:
    """The pinned tier if any, else the first healthy worker in configuration order."""

    name = "first_healthy"

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        chosen = eligible_workers(request, workers)[0]
        if request.tier:
            return RoutingDecision(chosen.worker_id, f"tier {request.tier} pinned by the request")
        return RoutingDecision(chosen.worker_id, "first healthy worker (policy first_healthy)")


POLICIES: dict[str, Callable[[], RoutingPolicy]] = {
    FirstHealthyPolicy.name: FirstHealthyPolicy,
}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
