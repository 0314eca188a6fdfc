"""Batch admission by per-token budgets: the step predicted for a bigger batch, and the rule."""

from __future__ import annotations

import pytest

from tierserve.worker.batching.admission import (
    PREFILL_SAMPLES,
    STEP_WEIGHT,
    PrefillTimes,
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
        (2, [0.005, 0.0], True),  # a 5 ms budget even one row's 10 ms misses holds nobody back
        (2, [0.005, 0.020], False),  # but the attainable 20 ms budget beside it does
    ],
)
def test_a_request_joins_only_within_the_tightest_budget(
    rows_after: int, budgets_s: list[float], joins: bool
) -> None:
    steps = StepTimes()
    steps.record(1, 0.010)
    steps.record(2, 0.030)
    assert within_budgets(steps, rows_after, budgets_s) is joins


def test_prefill_times_predict_from_measured_forwards() -> None:
    times = PrefillTimes()
    assert times.predict(300) == 0.0  # nothing measured: no stall assumed
    times.record(256, 0.512)  # one length: 2 ms per token, through the origin
    assert times.predict(100) == pytest.approx(0.200)
    times.record(0, 5.0)  # an empty forward tells nothing
    assert times.predict(100) == pytest.approx(0.200)


def test_a_short_prompt_s_fixed_cost_does_not_inflate_a_long_prompt_s_prediction() -> None:
    """int4-woq on an AMX Xeon: 35 ms for 12 tokens, 145 ms for 210; a rate per token taken from
    the short one would predict 612 ms for the long one."""
    times = PrefillTimes()
    for _ in range(3):
        times.record(210, 0.145)
        times.record(12, 0.035)
    assert times.predict(210) == pytest.approx(0.145)
    assert times.predict(12) == pytest.approx(0.035)
    # In chunks of 100 tokens the fixed part is paid per forward.
    per_token = (0.145 - 0.035) / (210 - 12)
    base = 0.035 - 12 * per_token
    assert times.predict(210, chunk_tokens=100) == pytest.approx(3 * base + 210 * per_token)


def test_prefill_times_follow_the_recent_forwards() -> None:
    times = PrefillTimes()
    for _ in range(PREFILL_SAMPLES):
        times.record(100, 1.0)
    for _ in range(PREFILL_SAMPLES):
        times.record(100, 0.1)  # the machine got faster: the old forwards are forgotten
    assert times.predict(100) == pytest.approx(0.1)


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
