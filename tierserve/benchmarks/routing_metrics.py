"""The routing benchmark's figures, computed from what the client observed (pure functions).

- SLO attainment: share of the offered requests that completed and met both budgets, by the client's
  own clock: TTFT from send to first token, TPOT the mean gap between arriving tokens. A budget of 0
  is no budget. Rejected and failed requests count as not met. The Summary's own budget_met is
  recorded beside it.
- goodput: SLO-meeting requests per second of the level's wall time (from the first arrival to the
  last completion or arrival, whichever is later).
- accuracy violations: completed requests served by a tier whose card's perplexity change exceeds
  the request's max_quality_loss_pct (a tier without a card counts as a violation: it cannot be
  shown to be within).
- full service level: requests that met both budgets *and* were served within their tolerance, as
  a share and per second. The issue's attainment and goodput count latency alone (accuracy
  violations are reported apart); this one is what the caller asked for as a whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tierserve.domain.latency import percentile

ATTAINMENT_GOAL = 0.90
GOODPUT_TARGET = 1.3
# Goodput as serving papers define it (e.g. DistServe): the most SLO-meeting work a policy sustains
# while still attaining 90%. Comparing two policies at one load cannot show 1.3x: at a load where the
# other attains 90%, slo's goodput is at most 1/0.9 of it.
TARGET_RULE = (
    "each policy's goodput is its SLO-meeting requests per second at the offered load where its "
    "attainment crosses 90%, interpolated linearly between the highest load attaining >= 90% and the "
    "next load run (that highest load itself when no higher load was run); slo's must be >= 1.3x the "
    "best other policy's, with zero accuracy violations by slo at every load"
)


@dataclass(frozen=True)
class Observed:
    """One offered request and what became of it; times in seconds, latencies in milliseconds."""

    ttft_budget_ms: float
    tpot_budget_ms: float
    tolerance_pct: float
    status: str
    sent_s: float
    done_s: float
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    tier: str = ""
    summary_budget_met: bool | None = None

    @property
    def completed(self) -> bool:
        return self.status == "OK"


def met_slo(o: Observed) -> bool:
    if not o.completed or o.ttft_ms is None:
        return False
    if o.ttft_budget_ms > 0 and o.ttft_ms > o.ttft_budget_ms:
        return False
    # One token has no gaps: nothing to hold against a TPOT budget.
    return not (o.tpot_budget_ms > 0 and o.tpot_ms is not None and o.tpot_ms > o.tpot_budget_ms)


def violates_accuracy(o: Observed, cards: Mapping[str, float | None]) -> bool:
    if not o.completed:
        return False
    loss = cards.get(o.tier)
    return loss is None or loss > o.tolerance_pct


def _pct(values: Sequence[float], fraction: float) -> float | None:
    return round(percentile(values, fraction), 3) if values else None


def summarize_level(
    observed: Sequence[Observed], cards: Mapping[str, float | None], start_s: float
) -> dict[str, Any]:
    """The figures of one policy at one offered load."""
    offered = len(observed)
    completed = [o for o in observed if o.completed]
    met = sum(met_slo(o) for o in observed)
    served_as_asked = sum(met_slo(o) and not violates_accuracy(o, cards) for o in observed)
    ends = [o.done_s for o in observed] + [o.sent_s for o in observed]
    wall_s = max(ends) - start_s if ends else 0.0
    ttft = [o.ttft_ms for o in completed if o.ttft_ms is not None]
    tpot = [o.tpot_ms for o in completed if o.tpot_ms is not None]
    tiers = Counter(o.tier for o in completed)
    rejected = Counter(o.status for o in observed if not o.completed)
    return {
        "offered": offered,
        "completed": len(completed),
        "slo_met": met,
        "attainment": met / offered if offered else 0.0,
        "summary_budget_met": sum(bool(o.summary_budget_met) for o in completed),
        "summary_attainment": (
            sum(bool(o.summary_budget_met) for o in completed) / offered if offered else 0.0
        ),
        "wall_s": round(wall_s, 3),
        "goodput_rps": met / wall_s if wall_s > 0 else 0.0,
        "throughput_rps": len(completed) / wall_s if wall_s > 0 else 0.0,
        "accuracy_violations": sum(violates_accuracy(o, cards) for o in observed),
        "service_level_met": served_as_asked,
        "service_level_attainment": served_as_asked / offered if offered else 0.0,
        "service_level_goodput_rps": served_as_asked / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_ms": _pct(ttft, 0.50),
        "ttft_p99_ms": _pct(ttft, 0.99),
        "tpot_p50_ms": _pct(tpot, 0.50),
        "tpot_p99_ms": _pct(tpot, 0.99),
        "tier_share": {tier: n / len(completed) for tier, n in sorted(tiers.items())},
        "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
    }


@dataclass(frozen=True)
class GoalPoint:
    """Where a policy's attainment crosses 90%: the offered load and the goodput there. `bounded`:
    the policy still attained 90% at the highest load run, so the true crossing lies beyond."""

    load: float
    goodput_rps: float
    bounded: bool


def goal_point(rows: Sequence[Mapping[str, Any]], policy: str) -> GoalPoint | None:
    """`policy`'s 90% crossing by TARGET_RULE; None if it attains 90% at no load."""
    mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: float(r["load"]))
    attaining = [i for i, r in enumerate(mine) if r["attainment"] >= ATTAINMENT_GOAL]
    if not attaining:
        return None
    last = attaining[-1]
    low = mine[last]
    if last + 1 == len(mine):
        return GoalPoint(float(low["load"]), float(low["goodput_rps"]), bounded=True)
    high = mine[last + 1]
    share = (low["attainment"] - ATTAINMENT_GOAL) / (low["attainment"] - high["attainment"])

    def between(key: str) -> float:
        return float(low[key] + share * (high[key] - low[key]))

    return GoalPoint(between("load"), between("goodput_rps"), bounded=False)


def ninety_percent_load(rows: Sequence[Mapping[str, Any]], policy: str) -> float | None:
    """The offered load at which `policy`'s attainment crosses 90%; None if it never attains it."""
    point = goal_point(rows, policy)
    return None if point is None else point.load


def goodput_target(rows: Sequence[Mapping[str, Any]], reference: str = "slo") -> dict[str, Any]:
    """The issue's target, by TARGET_RULE. Rows carry policy, load, attainment, goodput_rps and
    accuracy_violations."""
    result: dict[str, Any] = {"rule": TARGET_RULE, "goal_ratio": GOODPUT_TARGET, "met": None}
    policies = sorted({str(r["policy"]) for r in rows})
    if reference not in policies:
        return {**result, "note": f"policy {reference!r} did not run; no target to compute"}
    violations = sum(int(r["accuracy_violations"]) for r in rows if r["policy"] == reference)
    result["reference_accuracy_violations"] = violations
    result["ninety_percent_loads"] = {policy: ninety_percent_load(rows, policy) for policy in policies}
    others = [
        (policy, found)
        for policy in policies
        if policy != reference and (found := goal_point(rows, policy)) is not None
    ]
    if not others:
        return {**result, "note": "no other policy attains 90% at any offered load; no comparison point"}
    best, other = max(others, key=lambda o: o[1].goodput_rps)
    other_goodput = other.goodput_rps
    mine = goal_point(rows, reference)
    if mine is None:
        return {
            **result,
            "best_other_policy": best,
            "other_goodput_rps": other_goodput,
            "other_load": other.load,
            "met": False,
            "note": f"{reference} attains 90% at no offered load",
        }
    ratio = mine.goodput_rps / other_goodput if other_goodput > 0 else None
    notes = [
        f"{name} attained 90% at the highest load run: its crossing lies beyond"
        for name, point in ((reference, mine), (best, other))
        if point.bounded
    ]
    return {
        **result,
        "best_other_policy": best,
        "load": mine.load,
        "other_load": other.load,
        "reference_goodput_rps": mine.goodput_rps,
        "other_goodput_rps": other_goodput,
        "ratio": ratio,
        "met": ratio is not None and ratio >= GOODPUT_TARGET and violations == 0,
        **({"note": "; ".join(notes)} if notes else {}),
    }
