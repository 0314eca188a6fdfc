"""power_of_two: two workers at random, the less loaded of them (accuracy-blind baseline)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from tierserve.router.policies.base import RouteRequest, RoutingDecision, WorkerView
from tierserve.router.policies.baselines import candidates, pin_note


class PowerOfTwoPolicy:
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        pool = candidates(request, workers)
        sampled = self._rng.sample(pool, k=min(2, len(pool)))
        worker = min(sampled, key=lambda w: w.outstanding)
        names = " vs ".join(f"{w.worker_id} ({w.outstanding})" for w in sampled)
        reason = f"power_of_two: {names} in flight; less loaded (accuracy-blind{pin_note(request)})"
        return RoutingDecision(
            worker.worker_id,
            reason,
            worker.predict(request.prompt_tokens, request.max_first_token_latency_ms),
        )
