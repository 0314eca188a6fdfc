"""The per-token budget rule that the worker's batch admission and the router's prediction share.

A request's per-token latency is its mean gap between tokens. A request already making tokens also
pays for every prompt prefilled while it runs, so the worker admits a newcomer only if every running
request with a budget can absorb the newcomer's prefill (worker/batching/admission.py), and the
router predicts the newcomer waits for the requests that cannot (router/prediction.py). One function,
so that the router's mirror of the rule cannot drift from the rule.
"""

from __future__ import annotations


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
