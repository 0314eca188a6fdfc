"""Batch admission by per-token budgets: the step predicted for a bigger batch, and the rule."""

from __future__ import annotations

import pytest

from tierserve.worker.batching.admission import (
    STEP_WEIGHT,
    PrefillRate,
    RunningRow,
    StepTimes,
    keeps_running_budgets,
    within_budgets,
)


def test_step_times_predict_from_what_was_measured() -> None:
    steps = StepTimes()
    assert steps.predict(1) is None
    steps.record(2, 0.040)
    # Fewer rows than measured: no slower than the measured step.
    assert steps.predict(1) == pytest.approx(0.040)
    steps.record(1, 0.020)
    assert steps.predict(1) == pytest.approx(0.020)
    # More rows than measured: scaled by the ratio, no batching gain assumed.
    assert steps.predict(8) == pytest.approx(0.040 * 8 / 2)
    # A running mean per row count.
    steps.record(2, 0.060)
    assert steps.predict(2) == pytest.approx(0.040 + STEP_WEIGHT * 0.020)
    assert steps.snapshot() == {1: pytest.approx(0.020), 2: pytest.approx(0.044)}


@pytest.mark.parametrize(
    ("rows_after", "budgets_s", "joins"),
    [
        (2, [0.0, 0.0], True),  # no budgets: slots and the KV budget decide
        (2, [0.050, 0.0], True),  # two rows: 30 ms, within 50
        (2, [0.0, 0.020], False),  # a member's 20 ms budget would break at 30 ms
        (3, [0.050, 0.050, 0.050], True),  # three rows unmeasured: 30 ms x 3/2 = 45 ms
        (3, [0.040, 0.0, 0.0], False),  # 45 ms > 40
        (1, [0.001], True),  # alone it always starts, whatever its budget
    ],
)
def test_a_request_joins_only_within_the_tightest_budget(
    rows_after: int, budgets_s: list[float], joins: bool
) -> None:
    steps = StepTimes()
    steps.record(1, 0.010)
    steps.record(2, 0.030)
    assert within_budgets(steps, rows_after, budgets_s) is joins


def test_prefill_rate_predicts_from_measured_forwards() -> None:
    rate = PrefillRate()
    assert rate.predict(300) == 0.0  # nothing measured: no stall assumed
    rate.record(256, 0.512)  # 2 ms per token
    assert rate.predict(100) == pytest.approx(0.200)
    rate.record(0, 5.0)  # an empty forward tells nothing
    rate.record(100, 0.400)  # 4 ms per token: a running mean
    assert rate.predict(1) == pytest.approx(0.002 + STEP_WEIGHT * 0.002)


# A tight row: 20 ms per token over 101 tokens, 2.0 s of budget for its 100 gaps.
TIGHT = RunningRow(budget_s=0.020, made=51, max_new_tokens=101, elapsed_s=0.750)


@pytest.mark.parametrize(
    ("rows", "step_after_s", "stall_s", "joins"),
    [
        # 0.75 s so far + 50 steps of 15 ms = 1.5 s: 0.5 s left for the newcomer's prefill.
        ([TIGHT], 0.015, 0.400, True),
        ([TIGHT], 0.015, 0.600, False),
        # Slower steps with the newcomer eat the same slack: 50 x 19 ms = 0.95 s.
        ([TIGHT], 0.019, 0.200, True),
        ([TIGHT], 0.019, 0.400, False),
        # Rows without a budget, or not started yet, take any newcomer.
        ([RunningRow(0.0, 51, 101, 30.0)], 0.050, 10.0, True),
        ([RunningRow(0.020, 0, 101, 0.0)], 0.015, 10.0, True),
        # One tight row is enough to hold the newcomer back.
        ([RunningRow(0.0, 5, 101, 1.0), TIGHT], 0.015, 0.600, False),
        # Before any step was measured there is nothing to predict from.
        ([TIGHT], None, 10.0, True),
    ],
)
def test_a_newcomer_joins_only_if_running_rows_can_absorb_its_prefill(
    rows: list[RunningRow], step_after_s: float | None, stall_s: float, joins: bool
) -> None:
    assert keeps_running_budgets(rows, step_after_s, stall_s) is joins
