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
from tierserve.errors import InvalidRequest, NoWorkerAvailable


class WorkerView(Protocol):
    @property
    def worker_id(self) -> str: ...

    @property
    def tier(self) -> str: ...

    @property
    def healthy(self) -> bool: ...


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at in a request."""

    tier: str = ""


@dataclass(frozen=True)
class RoutingDecision:
    worker_id: str
    reason: str


class RoutingPolicy(Protocol):
    name: str

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        """Pick a worker, or raise a TierserveError saying why none can serve."""
        ...


def candidates_for_tier(request: RouteRequest, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """The workers a request may go to: its pinned tier's, or all. Raises when none is healthy."""
    if request.tier:
        served = sorted({w.tier for w in workers})
        pinned = [w for w in workers if w.tier == request.tier]
        if not pinned:
            raise InvalidRequest(
                "tier", f"tier {request.tier!r} is not served by this pool; served tiers: {', '.join(served)}"
            )
        workers = pinned
    healthy = [w for w in workers if w.healthy]
    if not healthy:
        scope = f"of tier {request.tier!r} " if request.tier else ""
        raise NoWorkerAvailable(f"no healthy worker {scope}is available; retry shortly")
    return healthy


class FirstHealthyPolicy:
    """The pinned tier if any, else the first healthy worker in configuration order."""

    name = "first_healthy"

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        chosen = candidates_for_tier(request, workers)[0]
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
