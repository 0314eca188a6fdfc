"""Batch admission by per-token budgets: the step predicted for a bigger batch, and the rule."""

from __future__ import annotations

import pytest

from tierserve.worker.batching.admission import STEP_WEIGHT, StepTimes, within_budgets


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
