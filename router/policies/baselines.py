"""What the accuracy-blind baselines share: the workers they may pick from.

The baselines (round_robin, least_loaded, power_of_two) exist to be compared against `slo`.
Like the load balancers they stand for, they know nothing of accuracy or budgets: they honour
a pinned tier, health and admission only, so a benchmark can count the requests they send
to a tier beyond the caller's tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.router.policies.base import RouteRequest, WorkerView, admitting, healthy, pinned


def candidates(request: RouteRequest, workers: Sequence[WorkerView]) -> list[WorkerView]:
    return admitting(healthy(request, pinned(request, workers)))


def pin_note(request: RouteRequest) -> str:
    return f", tier {request.tier} pinned" if request.tier else ""
