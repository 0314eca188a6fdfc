"""round_robin: each worker in turn (accuracy-blind baseline)."""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.router.policies.base import RouteRequest, RoutingDecision, WorkerView
from tierserve.router.policies.baselines import candidates, pin_note


class RoundRobinPolicy:
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        allowed = {w.worker_id for w in candidates(request, workers)}
        # Turn over the whole pool, so a worker skipped (full, unhealthy) keeps its place in the cycle.
        for step in range(len(workers)):
            worker = workers[(self._turn + step) % len(workers)]
            if worker.worker_id in allowed:
                self._turn = (self._turn + step + 1) % len(workers)
                reason = f"round_robin: {worker.worker_id}'s turn (accuracy-blind{pin_note(request)})"
                return RoutingDecision(
                    worker.worker_id,
                    reason,
                    worker.predict(request.prompt_tokens, request.max_first_token_latency_ms),
                )
        raise AssertionError("candidates() returned a worker outside the pool")
