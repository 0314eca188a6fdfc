"""The per-token budget rule that the worker's batch admission and the router's prediction share.

A request's per-token latency is its mean gap between tokens. A request already making tokens also
pays for every prompt prefilled while it runs, so the worker admits a newcomer only if every running
request with a budget can absorb the newcomer's prefill (worker/batching/admission.py), and the
router predicts the newcomer waits for the requests that cannot (router/prediction.py). One function,
so that the router's mirror of the rule cannot drift from the rule.

Likewise the step a batch of some rows takes: the worker admits a newcomer only if the bigger batch's
step stays within the tightest per-token budget in it, predicting the step from its measured steps by
rows (`step_for_rows`); it publishes those figures (`BatchState.step_us_by_rows`), and the router
predicts the same hold from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def breaks_token_budget(
    budget: float, made: int, max_new_tokens: int, elapsed: float, stall: float, step: float
) -> bool:
    """Whether a running request misses its per-token `budget` on average if a stall of `stall`
    holds it now and each of its remaining steps takes `step`: its time since its first token
    (`elapsed`), the stall and its remaining gaps against the budget times all its gaps, taking
    `max_new_tokens` as its length. Any one unit of time. Never for no budget (0), before its
    first token, or for a request of one token (it has no gaps)."""
    if budget <= 0 or made < 1 or max_new_tokens <= 1:
        return False
    remaining = max(0, max_new_tokens - made)
    return elapsed + stall + remaining * step > budget * (max_new_tokens - 1)


def step_for_rows(steps_by_rows: Mapping[int, float], rows: int) -> float | None:
    """A decode step of `rows` rows from the measured steps by rows: measured, else the most rows
    measured below scaled by the ratio (no batching gain assumed until measured), else the fewest
    measured above (a step with fewer rows is no slower). None before any step."""
    if rows in steps_by_rows:
        return steps_by_rows[rows]
    below = [r for r in steps_by_rows if r < rows]
    if below:
        known = max(below)
        return steps_by_rows[known] * rows / known
    above = [r for r in steps_by_rows if r > rows]
    return steps_by_rows[min(above)] if above else None


def attainable(budget: float, one_row_step: float | None) -> bool:
    """Whether a per-token budget can be met at all: positive and no less than a step of one row
    (unknown before any step: then every budget counts)."""
    return budget > 0 and (one_row_step is None or budget >= one_row_step)


def tightest_attainable_budget(budgets: Iterable[float], one_row_step: float | None) -> float:
    """The per-token budget a batch's step must stay within: the tightest `attainable` budget (0:
    none). A budget that even one row's step exceeds is lost whatever the batch, so it holds nobody
    back, neither by the bigger batch's step nor by a newcomer's prefill stall (in a Zen 4 routing
    run a tight request sent best-effort to fp32, running alone, held a loose request that a batch
    of 5 would have met for 3.3 s, and every request queued behind that)."""
    return min((budget for budget in budgets if attainable(budget, one_row_step)), default=0.0)
