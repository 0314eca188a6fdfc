"""least_loaded: the worker with the fewest requests in flight or waiting (accuracy-blind baseline)."""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.router.policies.base import RouteRequest, RoutingDecision, WorkerView
from tierserve.router.policies.baselines import candidates, pin_note


class LeastLoadedPolicy:
    name = "least_loaded"

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        # min() keeps configuration order among equally loaded workers.
        worker = min(candidates(request, workers), key=lambda w: w.outstanding)
        reason = (
            f"least_loaded: {worker.worker_id} has {worker.outstanding} request(s) in flight, the fewest "
            f"(accuracy-blind{pin_note(request)})"
        )
        return RoutingDecision(
            worker.worker_id,
            reason,
            worker.predict(request.prompt_tokens, request.max_first_token_latency_ms),
        )
