"""The slo policy on synthetic worker states: every branch of filter → predict → pick."""

import pytest

from tests.unit.fake_workers import FakeWorker, tiered_pool
from tierserve.domain.errors import NoWorkerAvailable, Overloaded, Unsatisfiable
from tierserve.router.policies.base import MIN_RETRY_MS
from tierserve.router.policies.registry import RouteRequest, SloPolicy


def choose(request: RouteRequest, workers: list[FakeWorker] | None = None) -> tuple[str, str, bool]:
    decision = SloPolicy().choose(request, workers if workers is not None else tiered_pool())
    return decision.worker_id, decision.reason, decision.best_effort


def test_without_budgets_the_most_accurate_tier_serves() -> None:
    worker, reason, best_effort = choose(RouteRequest(max_quality_loss_pct=1.0))
    assert worker == "fp32-0" and not best_effort
    assert reason.startswith("slo: fp32 (fp32-0) predicted TTFT 70ms, TPOT 29ms, loss 0 (reference) ≤ 1%")
    assert "most accurate eligible" in reason


def test_tight_budget_goes_to_the_most_accurate_tier_predicted_to_meet_it() -> None:
    worker, reason, best_effort = choose(RouteRequest(max_quality_loss_pct=1.0, max_token_latency_ms=20))
    # fp32 (29 ms) misses the budget; bf16's -0.00% counts as 0 and beats int4's +0.25%.
    assert worker == "bf16-0" and not best_effort
    assert "TPOT 13ms ≤ 20ms" in reason and "loss -0.00% ≤ 1%" in reason
    worker, reason, _ = choose(RouteRequest(max_quality_loss_pct=1.0, max_token_latency_ms=10))
    assert worker == "int4-woq-0"
    assert "TPOT 9.4ms ≤ 10ms" in reason and "loss +0.25% ≤ 1%" in reason


def test_zero_tolerance_goes_to_the_reference_not_a_tier_measured_at_minus_zero() -> None:
    assert choose(RouteRequest(max_quality_loss_pct=0.0))[0] == "fp32-0"
    # Measured no loss: bf16 meets a zero tolerance when fp32 cannot meet the budget...
    assert choose(RouteRequest(max_quality_loss_pct=0.0, max_token_latency_ms=20))[0] == "bf16-0"
    # ... but a tier with any measured loss never does.
    with pytest.raises(Unsatisfiable):
        choose(RouteRequest(max_quality_loss_pct=0.0), [w for w in tiered_pool() if w.tier.startswith("int")])


def test_ties_on_loss_go_to_the_lowest_predicted_latency() -> None:
    pool = [
        FakeWorker("bf16-0", "bf16", quality_loss_pct=0.1, ttft_ms=90, tpot_ms=12),
        FakeWorker("bf16-1", "bf16", quality_loss_pct=0.1, ttft_ms=30, tpot_ms=12),
        FakeWorker("int4-0", "int4-woq", quality_loss_pct=0.3, ttft_ms=5, tpot_ms=5),
    ]
    worker, reason, _ = choose(RouteRequest(max_quality_loss_pct=1.0, new_tokens=32), pool)
    assert worker == "bf16-1"
    assert "tied on loss with bf16-0, lowest predicted latency" in reason


def test_a_saturated_worker_loses_to_one_that_meets_the_ttft_budget() -> None:
    pool = tiered_pool()
    request = RouteRequest(max_quality_loss_pct=1.0, max_first_token_latency_ms=500)
    assert choose(request, pool)[0] == "fp32-0"
    pool[0].wait_ms, pool[0].ttft_ms, pool[0].outstanding = 4000, 4070, 3
    worker, reason, _ = choose(request, pool)
    assert worker == "bf16-0"
    assert "TTFT 38ms ≤ 500ms" in reason


def test_nothing_meets_the_budget_best_effort_on_the_fastest_worker_within_tolerance() -> None:
    worker, reason, best_effort = choose(RouteRequest(max_quality_loss_pct=1.0, max_token_latency_ms=5))
    # int8-sq would be faster at TTFT but is beyond the tolerance; int4 has the lowest total latency.
    assert worker == "int4-woq-0" and best_effort
    assert reason.startswith("slo best effort: no worker within max_quality_loss_pct=1% is predicted to meet")
    # Every worker within the tolerance, nearest to the budget first, with what it misses.
    assert "TPOT ≤ 5ms (int4-woq-0: TPOT 9.4ms; bf16-0: TPOT" in reason
    assert "fastest within tolerance: int4-woq (int4-woq-0)" in reason


def test_strict_request_that_nothing_can_meet_is_resource_exhausted_naming_the_budget() -> None:
    request = RouteRequest(max_quality_loss_pct=1.0, max_first_token_latency_ms=10, strict=True)
    with pytest.raises(
        Overloaded, match=r"strict request refused: .*TTFT ≤ 10ms \(bf16-0: TTFT 38ms; "
    ) as caught:
        choose(request)
    assert caught.value.retry_after_ms >= MIN_RETRY_MS


def test_no_tier_within_the_tolerance_is_failed_precondition_even_when_not_strict() -> None:
    pool = [w for w in tiered_pool() if w.tier in ("int8-sq", "int8-woq")]
    with pytest.raises(Unsatisfiable, match=r"max_quality_loss_pct=0.5%.*int8-sq-0 \+24.50%"):
        choose(RouteRequest(max_quality_loss_pct=0.5, max_token_latency_ms=100), pool)


def test_pinned_tier_is_honoured_and_named() -> None:
    worker, reason, best_effort = choose(RouteRequest(tier="fp32", max_token_latency_ms=20))
    assert worker == "fp32-0" and best_effort
    assert reason.startswith("slo (tier fp32 pinned) best effort")


def test_full_queues_are_skipped_and_all_full_is_resource_exhausted_with_a_hint() -> None:
    pool = tiered_pool()
    pool[0].outstanding = 9  # one generating, eight waiting: the limit
    worker, reason, _ = choose(RouteRequest(max_quality_loss_pct=1.0), pool)
    assert worker == "bf16-0" and "queue full: fp32-0" in reason
    for w in pool:
        w.outstanding, w.next_free_ms = 9, 250.0 if w.tier == "int8-sq" else 900.0
    with pytest.raises(Overloaded, match="queue is full") as caught:
        choose(RouteRequest(max_quality_loss_pct=1.0), pool)
    # The soonest a place frees: the worker closest to finishing its request (only those eligible).
    assert caught.value.retry_after_ms == 900
    with pytest.raises(Overloaded) as caught:
        choose(RouteRequest(max_quality_loss_pct=100.0), pool)
    assert caught.value.retry_after_ms == 250


def test_workers_without_figures_never_meet_a_budget_and_unhealthy_ones_never_serve() -> None:
    pool = tiered_pool()
    pool[1].ttft_ms = pool[1].tpot_ms = float("inf")
    assert choose(RouteRequest(max_quality_loss_pct=0.0, max_token_latency_ms=20), pool)[2]
    for w in pool:
        w.healthy = False
    with pytest.raises(NoWorkerAvailable):
        choose(RouteRequest(), pool)


def test_a_worker_where_going_first_makes_waiting_requests_late_comes_after_one_where_it_does_not() -> None:
    pool = tiered_pool()
    request = RouteRequest(max_quality_loss_pct=1.0, max_first_token_latency_ms=500)
    pool[0].displaces = 2  # fp32 meets this budget only by making two waiting requests late
    worker, reason, best_effort = choose(request, pool)
    assert worker == "bf16-0" and not best_effort
    assert "passed over, as going first there makes waiting requests late: fp32-0 (2)" in reason
    for worker_state in pool:
        worker_state.displaces = 1  # no harmless choice: back to the most accurate
    worker, reason, _ = choose(request, pool)
    assert worker == "fp32-0" and "makes 1 waiting request(s) late" in reason


def test_a_worker_crowded_past_a_quarter_of_the_ttft_budget_comes_after_one_with_room() -> None:
    pool = tiered_pool()
    request = RouteRequest(max_quality_loss_pct=1.0, max_first_token_latency_ms=1000)
    pool[0].wait_ms, pool[0].ttft_ms, pool[0].outstanding = 300, 370, 1  # fits, but past 25%
    worker, reason, best_effort = choose(request, pool)
    assert worker == "bf16-0" and not best_effort
    assert "passed over, predicted past 25% of the TTFT budget: fp32-0" in reason
    # A request only the crowded worker may serve still goes there.
    assert (
        choose(RouteRequest(max_quality_loss_pct=0.0, max_first_token_latency_ms=1000), pool[:1])[0]
        == "fp32-0"
    )
    # Every eligible worker crowded: back to the most accurate.
    for state in pool:
        state.ttft_ms = 700
    assert choose(request, pool)[0] == "fp32-0"
    # No TTFT budget: no worker is ever crowded.
    assert choose(RouteRequest(max_quality_loss_pct=1.0), pool)[0] == "fp32-0"


def test_a_refusal_names_what_each_worker_misses_when_none_meets_both_budgets() -> None:
    # fp32 has the TTFT, int8-sq the TPOT: each meets one budget, no worker meets both.
    pool = [
        FakeWorker("fp32-0", "fp32", quality_loss_pct=0.0, ttft_ms=540, tpot_ms=47),
        FakeWorker("int8-sq-0", "int8-sq", quality_loss_pct=0.6, ttft_ms=1010, tpot_ms=21),
    ]
    request = RouteRequest(
        max_quality_loss_pct=10.0, max_first_token_latency_ms=1000, max_token_latency_ms=25, strict=True
    )
    with pytest.raises(Overloaded) as caught:
        choose(request, pool)
    assert str(caught.value).startswith(
        "strict request refused: no worker within max_quality_loss_pct=10% is predicted to meet "
        "TTFT ≤ 1000ms and TPOT ≤ 25ms together (int8-sq-0: TTFT 1010ms; fp32-0: TPOT 47ms)"
    )
