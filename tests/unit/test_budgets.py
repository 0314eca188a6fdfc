"""The per-token budget rule shared by the worker's batch admission and the router's prediction."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from tierserve.domain.budgets import attainable, breaks_token_budget
from tierserve.router.live import LiveStats
from tierserve.router.prediction import Ticket, budget_slots, stalled_budgets
from tierserve.worker.batching.admission import RunningRow, StepTimes, keeps_running_budgets, within_budgets


def test_a_stall_breaks_a_budget_only_past_its_slack() -> None:
    # 10 tokens within 20 ms each: 9 gaps, 180 ms. 4 made in 60 ms leave 6 steps of 10 ms = 120 ms of
    # room, 60 ms of it spare.
    assert not breaks_token_budget(20, made=4, max_new_tokens=10, elapsed=60, stall=60, step=10)
    assert breaks_token_budget(20, made=4, max_new_tokens=10, elapsed=60, stall=61, step=10)


def test_no_budget_no_first_token_or_one_token_is_never_broken() -> None:
    assert not breaks_token_budget(0, made=4, max_new_tokens=10, elapsed=1e9, stall=1e9, step=1e9)
    assert not breaks_token_budget(20, made=0, max_new_tokens=10, elapsed=1e9, stall=1e9, step=1e9)
    assert not breaks_token_budget(20, made=1, max_new_tokens=1, elapsed=1e9, stall=1e9, step=1e9)


@given(
    budget_ms=st.integers(0, 200),
    made=st.integers(0, 64),
    max_new_tokens=st.integers(1, 64),
    elapsed_ms=st.integers(0, 5000),
    stall_ms=st.integers(0, 5000),
    step_ms=st.integers(1, 200),
    one_row_ms=st.one_of(st.none(), st.integers(1, 200)),
)
def test_the_router_predicts_the_wait_exactly_when_the_worker_would_hold_the_newcomer(
    budget_ms: int,
    made: int,
    max_new_tokens: int,
    elapsed_ms: int,
    stall_ms: int,
    step_ms: int,
    one_row_ms: int | None,
) -> None:
    # Not on the boundary itself, where seconds and microseconds may round apart.
    assume(
        elapsed_ms + stall_ms + max(0, max_new_tokens - made) * step_ms != budget_ms * (max_new_tokens - 1)
    )
    row = RunningRow(budget_ms / 1e3, made, max_new_tokens, elapsed_ms / 1e3)
    one_row_s = None if one_row_ms is None else one_row_ms / 1e3
    worker_admits = keeps_running_budgets([row], step_ms / 1e3, stall_ms / 1e3, one_row_s)
    ticket = Ticket(
        prompt_tokens=8,
        new_tokens=max_new_tokens,
        deadline=0.0,
        tokens=made,
        token_budget_us=budget_ms * 1e3,
        first_token_at=100.0 - elapsed_ms / 1e3,
    )
    one_row_us = None if one_row_ms is None else one_row_ms * 1e3
    router_predicts_wait = bool(stalled_budgets([ticket], stall_ms * 1e3, step_ms * 1e3, 100.0, one_row_us))
    assert worker_admits != router_predicts_wait


def test_a_row_whose_budget_one_rows_step_misses_holds_no_newcomer_for_its_prefill() -> None:
    # 20 ms a token over 9 gaps; 4 made in 60 ms: a 61 ms stall at 10 ms steps breaks it.
    row = RunningRow(0.020, made=4, max_new_tokens=10, elapsed_s=0.060)
    assert not keeps_running_budgets([row], 0.010, 0.061, one_row_step_s=0.010)
    # On a worker whose one-row step is 40 ms that budget is lost already: it holds nobody.
    assert keeps_running_budgets([row], 0.045, 0.061, one_row_step_s=0.040)
    assert not attainable(20, 40) and attainable(20, 20) and attainable(20, None) and not attainable(0, None)


@given(
    steps_ms=st.lists(st.integers(1, 120), min_size=1, max_size=4),
    newcomer_ms=st.integers(0, 150),
    running_ms=st.integers(0, 150),
)
def test_the_router_predicts_the_workers_step_hold_from_its_step_figures(
    steps_ms: list[int], newcomer_ms: int, running_ms: int
) -> None:
    """With one request running, the worker lets a newcomer join exactly when the router, given
    the worker's published steps, counts a second slot (budgets no row count meets hold nobody)."""
    steps = StepTimes()
    for rows, ms in enumerate(steps_ms, start=1):
        steps.record(rows, ms / 1e3)
    joins = within_budgets(steps, 2, [newcomer_ms / 1e3, running_ms / 1e3])
    published = {rows: s * 1e6 for rows, s in steps.snapshot().items()}
    slots = budget_slots(LiveStats(), 8, 0, newcomer_ms * 1e3, published, [running_ms * 1e3])
    assert joins == (slots >= 2)
