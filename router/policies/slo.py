"""slo: the most accurate worker predicted to meet the request's latency budgets.

Filter (pinned tier, accuracy tolerance, health, room in the queue) → predict each
worker's wait, TTFT and TPOT now → keep those that fit the budgets → pick the most
accurate, ties by lowest predicted latency. A worker where the request would go
ahead of waiting ones (earliest deadline first) and make some of them late comes
after every worker where it would not: meeting this budget by breaking another's
gains nothing. Likewise a worker predicted to use more than HEADROOM of the TTFT
budget comes after the workers with room to spare: the most accurate worker is the
only one for requests with no tolerance, and filling its queue to the budget's edge
with requests that any tier would serve leaves them none (and any prediction error
there is a miss). When none fits: strict requests are refused with
RESOURCE_EXHAUSTED naming the budget that failed; others are served best effort by
the fastest worker within the tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.domain.errors import Overloaded
from tierserve.domain.tiers import REFERENCE_TIER
from tierserve.router.policies.base import (
    RouteRequest,
    RoutingDecision,
    WorkerView,
    accuracy_rank,
    admitting,
    effective_loss,
    healthy,
    ms,
    pinned,
    retry_hint_ms,
    tolerable,
)
from tierserve.router.prediction import Prediction

# Share of the TTFT budget a prediction may use before the worker counts as crowded. At a half,
# slo kept ~43% of a routing run's requests on fp32 where only ~28% (the zero-tolerance ones) had
# nowhere else to go, and refused those when load rose; a quarter leaves the reference tier to
# tolerant requests only when it would start them soon.
HEADROOM = 0.25


def crowded(request: RouteRequest, prediction: Prediction) -> bool:
    """Predicted to use more than HEADROOM of the request's TTFT budget (no budget: never)."""
    budget_us = request.max_first_token_latency_ms * 1e3
    return bool(budget_us) and prediction.ttft_us > HEADROOM * budget_us


def fits(request: RouteRequest, prediction: Prediction) -> bool:
    ttft_ok = not request.max_first_token_latency_ms or (
        prediction.ttft_us <= request.max_first_token_latency_ms * 1e3
    )
    tpot_ok = not request.max_token_latency_ms or prediction.tpot_us <= request.max_token_latency_ms * 1e3
    return ttft_ok and tpot_ok


def _budget(value_us: float, budget_ms: float, sign: str = "≤") -> str:
    return f"{ms(value_us)} {sign} {budget_ms:g}ms" if budget_ms else ms(value_us)


def describe(request: RouteRequest, worker: WorkerView, prediction: Prediction) -> str:
    """'int8-sq predicted TTFT 40ms ≤ 200ms, TPOT 12ms ≤ 20ms, loss +0.90% ≤ 1%'."""
    if not prediction.known:
        latency = "no latency figures yet"
    else:
        wait = f" (wait {ms(prediction.wait_us)})" if prediction.wait_us else ""
        ttft_sign = "≤" if prediction.ttft_us <= request.max_first_token_latency_ms * 1e3 else ">"
        tpot_sign = "≤" if prediction.tpot_us <= request.max_token_latency_ms * 1e3 else ">"
        latency = (
            f"TTFT {_budget(prediction.ttft_us, request.max_first_token_latency_ms, ttft_sign)}{wait}, "
            f"TPOT {_budget(prediction.tpot_us, request.max_token_latency_ms, tpot_sign)}"
        )
    if worker.tier == REFERENCE_TIER:
        loss = "loss 0 (reference)"
    else:
        loss = f"loss {worker.quality_loss_pct or 0.0:+.2f}%"
    if request.max_quality_loss_pct is not None:
        loss += f" ≤ {request.max_quality_loss_pct:g}%"
    return f"{worker.tier} ({worker.worker_id}) predicted {latency}, {loss}"


# Workers a refusal or best-effort reason names, nearest to the budgets first.
SHORTFALL_NAMED = 4


def misses(request: RouteRequest, prediction: Prediction) -> list[str]:
    """The budgets `prediction` misses, each with its predicted figure: ['TTFT 1010ms']."""
    if not prediction.known:
        return []
    missed = []
    if request.max_first_token_latency_ms and prediction.ttft_us > request.max_first_token_latency_ms * 1e3:
        missed.append(f"TTFT {ms(prediction.ttft_us)}")
    if request.max_token_latency_ms and prediction.tpot_us > request.max_token_latency_ms * 1e3:
        missed.append(f"TPOT {ms(prediction.tpot_us)}")
    return missed


def shortfall(
    request: RouteRequest, workers: Sequence[WorkerView], predictions: dict[str, Prediction]
) -> str:
    """Which budgets no worker within the tolerance is predicted to meet, and what each worker
    misses, nearest first: 'TTFT ≤ 1000ms and TPOT ≤ 25ms together (int8-sq-0: TTFT 1010ms; fp32-0:
    TPOT 47ms)'."""
    budgets = []
    if request.max_first_token_latency_ms:
        budgets.append(f"TTFT ≤ {request.max_first_token_latency_ms:g}ms")
    if request.max_token_latency_ms:
        budgets.append(f"TPOT ≤ {request.max_token_latency_ms:g}ms")

    def overshoot(worker: WorkerView) -> float:
        p = predictions[worker.worker_id]
        ratios = [
            p.ttft_us / (request.max_first_token_latency_ms * 1e3)
            if request.max_first_token_latency_ms
            else 0.0,
            p.tpot_us / (request.max_token_latency_ms * 1e3) if request.max_token_latency_ms else 0.0,
        ]
        return max(ratios)

    nearest = sorted(workers, key=overshoot)
    named = [
        f"{w.worker_id}: {', '.join(misses(request, predictions[w.worker_id])) or 'no latency figures yet'}"
        for w in nearest[:SHORTFALL_NAMED]
    ]
    if len(nearest) > SHORTFALL_NAMED:
        named.append(f"{len(nearest) - SHORTFALL_NAMED} more further off")
    scope = (
        f"within max_quality_loss_pct={request.max_quality_loss_pct:g}% "
        if request.max_quality_loss_pct is not None
        else ""
    )
    together = " together" if len(budgets) > 1 else ""
    return f"no worker {scope}is predicted to meet {' and '.join(budgets)}{together} ({'; '.join(named)})"


class SloPolicy:
    name = "slo"

    def choose(self, request: RouteRequest, workers: Sequence[WorkerView]) -> RoutingDecision:
        within = healthy(request, tolerable(request, pinned(request, workers)))
        full = [w.worker_id for w in within if not w.has_room]
        open_workers = admitting(within)
        predictions = {
            w.worker_id: w.predict(
                request.prompt_tokens,
                request.max_first_token_latency_ms,
                request.new_tokens,
                request.max_token_latency_ms,
            )
            for w in open_workers
        }

        def latency(worker: WorkerView) -> float:
            return predictions[worker.worker_id].total_us(request.new_tokens)

        prefix = f"slo (tier {request.tier} pinned)" if request.tier else "slo"
        notes = f"; queue full: {', '.join(full)}" if full else ""
        eligible = [w for w in open_workers if fits(request, predictions[w.worker_id])]
        if eligible:

            def harms(worker: WorkerView) -> bool:
                return predictions[worker.worker_id].displaces > 0

            def busy_there(worker: WorkerView) -> bool:
                return crowded(request, predictions[worker.worker_id])

            best = min(eligible, key=lambda w: (harms(w), busy_there(w), accuracy_rank(w), latency(w)))
            ties = [
                w.worker_id
                for w in eligible
                if w is not best
                and not harms(w)
                and busy_there(w) == busy_there(best)
                and accuracy_rank(w) == accuracy_rank(best)
            ]
            why = "most accurate eligible"
            if ties:
                why += f"; tied on loss with {', '.join(ties)}, lowest predicted latency"
            harmed = [
                f"{w.worker_id} ({predictions[w.worker_id].displaces})"
                for w in eligible
                if harms(w) and accuracy_rank(w) < accuracy_rank(best)
            ]
            if harmed:
                why += f"; passed over, as going first there makes waiting requests late: {', '.join(harmed)}"
            busy = [
                w.worker_id
                for w in eligible
                if not harms(w)
                and busy_there(w)
                and not busy_there(best)
                and accuracy_rank(w) < accuracy_rank(best)
            ]
            if busy:
                why += f"; passed over, predicted past {HEADROOM:.0%} of the TTFT budget: {', '.join(busy)}"
            if harms(best):
                why += f"; makes {predictions[best.worker_id].displaces} waiting request(s) late"
            reason = f"{prefix}: {describe(request, best, predictions[best.worker_id])}; {why}{notes}"
            return RoutingDecision(best.worker_id, reason, predictions[best.worker_id])

        missing = shortfall(request, open_workers, predictions)
        if request.strict:
            raise Overloaded(f"strict request refused: {missing}{notes}", retry_hint_ms(open_workers))
        # Fastest first; among equally fast, the more accurate.
        fastest = min(open_workers, key=lambda w: (latency(w), effective_loss(w)))
        reason = (
            f"{prefix} best effort: {missing}; fastest within tolerance: "
            f"{describe(request, fastest, predictions[fastest.worker_id])}{notes}"
        )
        return RoutingDecision(fastest.worker_id, reason, predictions[fastest.worker_id], best_effort=True)
