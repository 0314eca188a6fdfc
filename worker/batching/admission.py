"""Whether a waiting request may join the batch without breaking a per-token budget.

Every row of a batch waits for the whole step, and a step costs more with more rows (on the Zen 3
a step of 8 rows cost 3.3x a step of 1: docs/benchmarks/batched-step-2026-12-02-epyc-zen3-avx2.md).
A request that joins therefore slows every stream in the batch. While requests joined whenever a
slot was free, the routing benchmark served fewer requests at their full service level with
batching on than off, at every load, with TPOT p50 of 106-747 ms against 58-73 ms
(docs/benchmarks/routing-batching-on-2026-12-02-epyc-zen3-avx2.md). So a request joins only if the
step predicted with it stays within the tightest per-token budget of the batch, itself included;
otherwise it waits, as it would on a worker that serves one request at a time. A request alone
always starts.

A request's per-token latency is its mean gap, and a running request also pays for every prompt
prefilled while it runs: with batching on, `bench routing` lost tight-budget requests at 18.3-19.5
ms against an 18.29 ms budget where only the step was predicted
(docs/benchmarks/routing-batching-on-2026-12-03-epyc-zen4.md). So a newcomer also joins only if
every running row with a budget can absorb its predicted prefill and the bigger batch's steps
over the row's remaining tokens (`keeps_running_budgets`).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from tierserve.domain.budgets import (
    attainable,
    breaks_token_budget,
    step_for_rows,
    tightest_attainable_budget,
)
from tierserve.domain.prefill import PrefillFit, fit_prefill

# Weight of the newest step in a row count's running mean: steps change slowly as the cache grows.
STEP_WEIGHT = 0.2
# Prefill forwards the line is fitted to: enough to span the prompt lengths in use, few enough to
# follow a change (the cache growing, another process on the cores).
PREFILL_SAMPLES = 32


class StepTimes:
    """Decode step seconds by the number of rows, a running mean per row count; thread-safe."""

    def __init__(self) -> None:
        self._by_rows: dict[int, float] = {}
        self._lock = threading.Lock()

    def record(self, rows: int, seconds: float) -> None:
        with self._lock:
            old = self._by_rows.get(rows)
            self._by_rows[rows] = seconds if old is None else old + STEP_WEIGHT * (seconds - old)

    def predict(self, rows: int) -> float | None:
        """The step with `rows` rows (`domain.budgets.step_for_rows`); None before any step."""
        with self._lock:
            return step_for_rows(self._by_rows, rows)

    def snapshot(self) -> dict[int, float]:
        with self._lock:
            return dict(sorted(self._by_rows.items()))


def within_budgets(steps: StepTimes, rows_after: int, budgets_s: list[float]) -> bool:
    """Whether a batch of `rows_after` rows keeps its step within every per-token budget of
    `budgets_s` (seconds; 0 = no budget) that one row's step meets (`tightest_attainable_budget`).
    True for one row, and before any step is measured."""
    tightest = tightest_attainable_budget(budgets_s, steps.predict(1))
    if not tightest or rows_after <= 1:
        return True
    predicted = steps.predict(rows_after)
    return predicted is None or predicted <= tightest


class PrefillTimes:
    """The recent prefill forwards' seconds by their prompt tokens (a chunk packed with the rows'
    step: its share beyond their decode step), and a line through them (`domain.prefill`): a fixed
    part per forward and a part per token. A running rate per token had a short prompt's fixed
    part inflate the next long prompt's predicted stall; thread-safe."""

    def __init__(self) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=PREFILL_SAMPLES)
        # Refitted once a forward, not at each admission check (every step while a request waits).
        self._fit: PrefillFit | None = None
        self._lock = threading.Lock()

    def record(self, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        with self._lock:
            self._samples.append((tokens, seconds * 1e6))
            self._fit = fit_prefill(list(self._samples))

    def predict(self, tokens: int, chunk_tokens: int | None = None) -> float:
        """Seconds to prefill `tokens` in forwards of at most `chunk_tokens` (None: one forward);
        0 before any prefill was measured."""
        with self._lock:
            fit = self._fit
        if fit is None or tokens <= 0:
            return 0.0
        forwards = -(-tokens // chunk_tokens) if chunk_tokens else 1
        return (fit.base_us * forwards + fit.per_token_us * tokens) / 1e6


@dataclass(frozen=True)
class RunningRow:
    """What admission needs of a row already making tokens."""

    budget_s: float  # its per-token budget (0: none)
    made: int  # tokens made so far (1 once its first token is out)
    max_new_tokens: int
    elapsed_s: float  # since its first token


def keeps_running_budgets(
    rows: list[RunningRow], step_after_s: float | None, stall_s: float, one_row_step_s: float | None = None
) -> bool:
    """Whether every row with an `attainable` budget (one row's step, `one_row_step_s`, meets it)
    stays within it on average if a newcomer's prefill (`stall_s`) holds it now and every remaining
    step takes `step_after_s`: the row's time so far, the stall and its remaining gaps must fit in
    its budget times all its gaps (taking max_new_tokens as its length). True before any step is
    measured."""
    if step_after_s is None:
        return True
    return not any(
        attainable(row.budget_s, one_row_step_s)
        and breaks_token_budget(
            row.budget_s, row.made, row.max_new_tokens, row.elapsed_s, stall_s, step_after_s
        )
        for row in rows
    )
