"""Routing policies by name: the config's `router.policy` names one of POLICIES.

A policy is one class with one method (`choose`) in its own module under
`router/policies/`; adding one is a new module and a line here.
"""

from __future__ import annotations

from collections.abc import Callable

from tierserve.domain.config import ConfigError
from tierserve.router.policies.base import RouteRequest, RoutingDecision, RoutingPolicy
from tierserve.router.policies.first_healthy import FirstHealthyPolicy
from tierserve.router.policies.least_loaded import LeastLoadedPolicy
from tierserve.router.policies.power_of_two import PowerOfTwoPolicy
from tierserve.router.policies.round_robin import RoundRobinPolicy
from tierserve.router.policies.slo import SloPolicy

__all__ = [
    "POLICIES",
    "FirstHealthyPolicy",
    "LeastLoadedPolicy",
    "PowerOfTwoPolicy",
    "RoundRobinPolicy",
    "RouteRequest",
    "RoutingDecision",
    "RoutingPolicy",
    "SloPolicy",
    "make_policy",
]

POLICIES: dict[str, Callable[[], RoutingPolicy]] = {
    SloPolicy.name: SloPolicy,
    RoundRobinPolicy.name: RoundRobinPolicy,
    LeastLoadedPolicy.name: LeastLoadedPolicy,
    PowerOfTwoPolicy.name: PowerOfTwoPolicy,
    FirstHealthyPolicy.name: FirstHealthyPolicy,
}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
