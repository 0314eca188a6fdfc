"""The one definition of a tier's accuracy loss, as tolerances are judged and tiers are ranked.

Router policies, capacity planning and the benchmarks all compare `max_quality_loss_pct` with
this figure, so a tier counts as within a tolerance in exactly the same cases everywhere.
"""

from __future__ import annotations

import math

from tierserve.domain.tiers import REFERENCE_TIER


def effective_loss(tier: str, ppl_delta_pct: float | None) -> float:
    """The perplexity change against the reference, as a loss.

    The reference tier is full precision: its loss is exactly 0. Another tier may measure a change
    at or below 0 (bf16 shows -0.00%: noise at the card's resolution, or luck, not better fidelity);
    it counts as 0, so it meets a zero tolerance. A tier without a measured card is never within a
    tolerance (infinite loss)."""
    if tier == REFERENCE_TIER:
        return 0.0
    return math.inf if ppl_delta_pct is None else max(ppl_delta_pct, 0.0)


def within_tolerance(tier: str, ppl_delta_pct: float | None, max_loss_pct: float | None) -> bool:
    """Whether a tier's loss is acceptable to a caller; no tolerance accepts every tier."""
    return max_loss_pct is None or effective_loss(tier, ppl_delta_pct) <= max_loss_pct
