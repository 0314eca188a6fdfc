"""Which requests of a routing trace some worker could serve at their full service level even alone.

A request whose budgets no worker within its tolerance meets on an idle pool is missed at every
offered load, by any policy: with 3 of 24 such requests a run can never reach 90% full service, and a
crossing of 90% (the batching comparison of `bench routing`) does not exist. The calibration serves
the trace's first requests alone on every tier; from it, a request is within reach when some tier
within its tolerance had a TTFT for prompts of its length within its TTFT budget and a TPOT within
its TPOT budget. Lengths the calibration did not serve are counted as unknown, not guessed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tierserve.benchmarks.calibration import TierService
from tierserve.benchmarks.loadgen import Budgets, TraceItem


@dataclass(frozen=True)
class Reach:
    within: int = 0
    unknown: int = 0
    # The requests beyond every worker: index, class, tolerance, prompt words and why, per tier.
    beyond: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ceiling(self) -> float:
        """The highest share of the trace any run can serve at full service level (unknowns counted
        as within reach)."""
        total = self.within + self.unknown + len(self.beyond)
        return (total - len(self.beyond)) / total if total else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "within": self.within,
            "unknown": self.unknown,
            "beyond": self.beyond,
            "ceiling": round(self.ceiling, 4),
            "rule": "some tier within the tolerance met both budgets alone in the calibration "
            "(its slowest TTFT at the request's prompt length, its median TPOT)",
        }


def reach_line(reach: Mapping[str, Any]) -> str:
    """One line of a report from `Reach.to_json()`."""
    beyond = reach["beyond"]
    total = reach["within"] + reach["unknown"] + len(beyond)
    line = f"within reach alone: {reach['within']} of {total} requests"
    if reach["unknown"]:
        line += f", {reach['unknown']} more of prompt lengths the calibration did not serve"
    line += f"; beyond every worker even on an idle pool: {len(beyond)}"
    if beyond:
        line += f" (no run can serve more than {reach['ceiling']:.1%} at full service level)"
    return line


def beyond_lines(reach: Mapping[str, Any]) -> list[str]:
    """A markdown bullet per request beyond every worker, with each eligible tier's reason."""
    return [
        f"- request {b['index']} ({b['budget_class']}, tolerance {b['tolerance_pct']:g}%, "
        f"{b['prompt_words']} words): " + "; ".join(f"{tier}: {why}" for tier, why in b["why"].items())
        for b in reach["beyond"]
    ]


def why_beyond(item: TraceItem, budgets: Budgets, service: TierService) -> str | None:
    """Why `service`'s tier misses the item's budgets alone; None when it meets them, or when the
    calibration did not serve the item's prompt length (unknown)."""
    ttft_budget, tpot_budget = budgets.of(item.budget_class)
    ttft = service.ttft_ms_by_prompt_words.get(item.prompt_words)
    misses = []
    if ttft is not None and ttft > ttft_budget:
        misses.append(f"TTFT {ttft:.0f} > {ttft_budget:g} ms")
    if service.tpot_ms > tpot_budget:
        misses.append(f"TPOT {service.tpot_ms:.1f} > {tpot_budget:g} ms")
    return ", ".join(misses) or None


def trace_reach(
    trace: Sequence[TraceItem],
    budgets: Budgets,
    services: Sequence[TierService],
    cards: Mapping[str, float | None],
) -> Reach:
    within, unknown, beyond = 0, 0, []
    for item in trace:
        eligible = [
            s for s in services if (loss := cards.get(s.tier)) is not None and loss <= item.tolerance_pct
        ]
        reasons = {s.tier: why_beyond(item, budgets, s) for s in eligible}
        meeting = [s for s in eligible if reasons[s.tier] is None]
        if any(item.prompt_words in s.ttft_ms_by_prompt_words for s in meeting):
            within += 1
        elif meeting:
            unknown += 1
        else:
            beyond.append(
                {
                    "index": item.index,
                    "budget_class": item.budget_class,
                    "tolerance_pct": item.tolerance_pct,
                    "prompt_words": item.prompt_words,
                    "why": {tier: str(reason) for tier, reason in reasons.items()}
                    or {"-": "no tier within the tolerance"},
                }
            )
    return Reach(within, unknown, beyond)
