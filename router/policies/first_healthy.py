"""first_healthy: the pinned tier if any, else the first eligible worker in configuration order."""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.router.policies.base import RouteRequest, RoutingDecision, WorkerView, eligible_workers


class FirstHealthyPolicy:
    """Honours the pinned tier and the accuracy tolerance; ignores latency budgets."""

    name = "first_healthy"

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        chosen = eligible_workers(request, workers)[0]
        prediction = chosen.predict(request.prompt_tokens, request.max_first_token_latency_ms)
        if request.tier:
            return RoutingDecision(chosen.worker_id, f"tier {request.tier} pinned by the request", prediction)
        return RoutingDecision(chosen.worker_id, "first healthy worker (policy first_healthy)", prediction)
