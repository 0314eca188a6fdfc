"""Capacity planning with the seed article's arithmetic: from application requirements to a per-token
latency budget, the measured tiers that meet it, and how many workers of each the load needs.

The per-token budget: a session of `requests` requests must fit in `session_length_s`, after the
per-session overhead and the user's think time between requests; what is left is shared by every
output token of the session:

    budget_per_token = (session_length - overhead - requests x think_time) / (requests x tokens_per_request)

A tier meets the budget when a whole request fits in its share of the session, first token included:

    busy_s = TTFT + tokens_per_request x TPOT  <=  tokens_per_request x budget_per_token

Workers: one worker serves one stream at a time, so the offered load in Erlangs (busy workers on
average) is

    load = sessions_per_hour x requests_per_session x busy_s / 3600

and the pool needs workers = ceil(load / target_utilization) of that tier; the utilization headroom
is what keeps queueing delay (which the budget does not include) small.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tierserve_client.v1 import router_pb2, worker_pb2

from tierserve.domain.quality import effective_loss, within_tolerance
from tierserve.domain.tiers import REFERENCE_TIER

BUDGET_FORMULA = (
    "budget_per_token = (session_length - overhead - requests x think_time) / (requests x tokens_per_request)"
)
MEETS_RULE = "a tier meets the budget when TTFT + tokens x TPOT <= tokens x budget_per_token"
WORKERS_FORMULA = (
    "load (Erlangs) = sessions/h x requests/session x (TTFT + tokens x TPOT) / 3600; "
    "workers = ceil(load / target utilization)"
)
DEFAULT_UTILIZATION = 0.7


class PlanningError(ValueError):
    """Inputs that cannot describe an application, or measurements that cannot be read."""


@dataclass(frozen=True)
class Requirements:
    """What the application needs; times in seconds."""

    sessions_per_hour: float = 1000.0
    requests_per_session: float = 5.0
    tokens_per_request: float = 128.0
    session_overhead_s: float = 10.0
    think_time_s: float = 20.0
    session_length_s: float = 150.0
    # Informational: the prompt size the TTFT figures should have been measured at.
    prompt_tokens: float | None = None
    target_utilization: float = DEFAULT_UTILIZATION
    # Largest accepted perplexity change against fp32 (percent); None accepts every tier.
    max_quality_loss_pct: float | None = None

    def __post_init__(self) -> None:
        positive = {
            "sessions per hour": self.sessions_per_hour,
            "requests per session": self.requests_per_session,
            "tokens per request": self.tokens_per_request,
            "session length": self.session_length_s,
        }
        for name, value in positive.items():
            if not math.isfinite(value) or value <= 0:
                raise PlanningError(f"{name} must be a positive number, got {value:g}")
        non_negative = {
            "per-session overhead": self.session_overhead_s,
            "think time": self.think_time_s,
            "prompt tokens": self.prompt_tokens or 0.0,
            "max quality loss": self.max_quality_loss_pct or 0.0,
        }
        for name, value in non_negative.items():
            if not math.isfinite(value) or value < 0:
                raise PlanningError(f"{name} must not be negative, got {value:g}")
        if not 0 < self.target_utilization <= 1:
            raise PlanningError(f"target utilization must be in (0, 1], got {self.target_utilization:g}")


@dataclass(frozen=True)
class Budget:
    per_token_s: float
    # Seconds of the session left for generating tokens (may be <= 0).
    generation_s: float
    feasible: bool
    reason: str


def token_budget(req: Requirements) -> Budget:
    """The per-token latency budget the requirements imply (BUDGET_FORMULA)."""
    thinking = req.requests_per_session * req.think_time_s
    generation_s = req.session_length_s - req.session_overhead_s - thinking
    per_token = generation_s / (req.requests_per_session * req.tokens_per_request)
    if generation_s <= 0:
        reason = (
            f"infeasible: overhead {req.session_overhead_s:g} s + {req.requests_per_session:g} requests x "
            f"{req.think_time_s:g} s think time = {req.session_overhead_s + thinking:g} s already fills "
            f"the {req.session_length_s:g} s session, leaving no time to generate tokens"
        )
        return Budget(per_token, generation_s, False, reason)
    reason = (
        f"{generation_s:g} s of the session for {req.requests_per_session * req.tokens_per_request:g} "
        f"tokens: {per_token * 1e3:.2f} ms per token"
    )
    return Budget(per_token, generation_s, True, reason)


@dataclass(frozen=True)
class TierFigures:
    """Measured figures of one tier (or benchmark path); latencies in milliseconds."""

    tier: str
    tpot_ms: float
    ttft_ms: float = 0.0
    ppl_delta_pct: float | None = None
    source: str = ""


def busy_seconds(ttft_ms: float, tpot_ms: float, tokens: float) -> float:
    """How long one request occupies a worker: its first token, then every further token."""
    return (ttft_ms + tokens * tpot_ms) / 1e3


def offered_load(req: Requirements, busy_s: float) -> float:
    """Average number of busy workers (Erlangs) the application's requests need."""
    return req.sessions_per_hour * req.requests_per_session * busy_s / 3600.0


def workers_needed(load: float, utilization: float) -> int:
    if load <= 0:
        return 0
    # A hair below the next integer is float noise, not a need for another worker.
    return max(1, math.ceil(load / utilization - 1e-9))


@dataclass(frozen=True)
class TierPlan:
    tier: str
    tpot_ms: float
    ttft_ms: float
    ppl_delta_pct: float | None
    # (TTFT + tokens x TPOT) / tokens: the tier's per-token time with its first token spread out.
    effective_ms_per_token: float
    busy_s: float
    load_erlangs: float
    workers: int
    meets_budget: bool
    within_tolerance: bool
    source: str


@dataclass(frozen=True)
class Plan:
    requirements: Requirements
    budget: Budget
    requests_per_s: float
    # Little's law: sessions open at once.
    concurrent_sessions: float
    tiers: list[TierPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def recommended(self) -> TierPlan | None:
        """Among the tiers that meet the budget and tolerance: the most accurate, then the fewest workers."""
        fit = [t for t in self.tiers if t.meets_budget and t.within_tolerance]
        if not fit:
            return None
        return min(
            fit, key=lambda t: (effective_loss(t.tier, t.ppl_delta_pct), t.tier != REFERENCE_TIER, t.workers)
        )

    def to_json(self) -> dict[str, Any]:
        best = self.recommended()
        return {
            "requirements": asdict(self.requirements),
            "formulas": {"budget": BUDGET_FORMULA, "meets": MEETS_RULE, "workers": WORKERS_FORMULA},
            "budget_per_token_ms": self.budget.per_token_s * 1e3,
            "generation_s_per_session": self.budget.generation_s,
            "feasible": self.budget.feasible,
            "budget_reason": self.budget.reason,
            "requests_per_s": self.requests_per_s,
            "concurrent_sessions": self.concurrent_sessions,
            "tiers": [asdict(t) for t in self.tiers],
            "recommended_tier": best.tier if best else None,
            "notes": self.notes,
        }


def plan_tier(req: Requirements, budget: Budget, figures: TierFigures) -> TierPlan:
    busy = busy_seconds(figures.ttft_ms, figures.tpot_ms, req.tokens_per_request)
    load = offered_load(req, busy)
    effective_ms = busy * 1e3 / req.tokens_per_request
    tolerance = req.max_quality_loss_pct
    within = within_tolerance(figures.tier, figures.ppl_delta_pct, tolerance)
    return TierPlan(
        tier=figures.tier,
        tpot_ms=figures.tpot_ms,
        ttft_ms=figures.ttft_ms,
        ppl_delta_pct=figures.ppl_delta_pct,
        effective_ms_per_token=effective_ms,
        busy_s=busy,
        load_erlangs=load,
        workers=workers_needed(load, req.target_utilization),
        meets_budget=budget.feasible and effective_ms <= budget.per_token_s * 1e3,
        within_tolerance=within,
        source=figures.source,
    )


def make_plan(req: Requirements, measured: Iterable[TierFigures] = ()) -> Plan:
    budget = token_budget(req)
    plan = Plan(
        requirements=req,
        budget=budget,
        requests_per_s=req.sessions_per_hour * req.requests_per_session / 3600.0,
        concurrent_sessions=req.sessions_per_hour * req.session_length_s / 3600.0,
        tiers=[plan_tier(req, budget, figures) for figures in measured],
    )
    if req.prompt_tokens is not None:
        plan.notes.append(
            f"TTFT should be measured at about {req.prompt_tokens:g} prompt tokens; the figures used were "
            "measured at their source's prompt length"
        )
    plan.notes.append("queueing delay is not in the budget; the utilization target leaves room for it")
    return plan


# --- measured figures ---------------------------------------------------------------------------------


def freshest_latency(worker: router_pb2.WorkerStatus) -> tuple[worker_pb2.LatencyStats, str]:
    """The freshest figures a worker has: relayed by the router, else its own live, else warm-up."""
    if worker.relayed_latency.samples and worker.relayed_latency.tpot_p50_us:
        return worker.relayed_latency, "relayed"
    if worker.info.live_latency.samples and worker.info.live_latency.tpot_p50_us:
        return worker.info.live_latency, "live"
    return worker.info.warmup_latency, "warm-up"


def figures_from_workers(workers: Sequence[router_pb2.WorkerStatus]) -> tuple[list[TierFigures], list[str]]:
    """One entry per tier, from ListWorkers: with several workers of a tier, the slowest one's figures
    (a plan should hold for every worker it counts). Returns the figures and notes on what was skipped."""
    by_tier: dict[str, TierFigures] = {}
    notes: list[str] = []
    for worker in workers:
        stats, kind = freshest_latency(worker)
        tier = worker.info.tier
        if not tier or not stats.tpot_p50_us:
            notes.append(f"worker {worker.worker_id}: no latency measured yet; left out")
            continue
        card = worker.info.accuracy
        figures = TierFigures(
            tier=tier,
            tpot_ms=stats.tpot_p50_us / 1e3,
            ttft_ms=stats.ttft_p50_us / 1e3,
            ppl_delta_pct=float(card.perplexity_delta_pct) if card.measured else None,
            source=f"{worker.worker_id} ({kind} p50)",
        )
        known = by_tier.get(tier)
        if known is None or figures.tpot_ms > known.tpot_ms:
            by_tier[tier] = figures
    return list(by_tier.values()), notes


def figures_from_bench(rows: Sequence[Mapping[str, Any]], source: str) -> tuple[list[TierFigures], list[str]]:
    """From a `tierserve bench tiers` JSON list (keys tier, tpot_ms, ttft_ms, ppl_delta_pct)."""
    figures: list[TierFigures] = []
    notes: list[str] = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping) or "tier" not in row:
            raise PlanningError(f"{source}: entry {index} is not an object with a 'tier' key")
        tpot = row.get("tpot_ms")
        if tpot is None:
            notes.append(f"{row['tier']}: no tpot_ms in {source}; left out")
            continue
        delta = row.get("ppl_delta_pct")
        figures.append(
            TierFigures(
                tier=str(row["tier"]),
                tpot_ms=float(tpot),
                ttft_ms=float(row.get("ttft_ms") or 0.0),
                ppl_delta_pct=None if delta is None else float(delta),
                source=source,
            )
        )
    return figures, notes


def load_bench_file(path: Path) -> list[Mapping[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanningError(f"bench file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise PlanningError(f"{path}: not valid JSON: {error}") from None
    # `bench tiers` writes a list; accept {"results": [...]} too.
    if isinstance(data, Mapping):
        data = data.get("results")
    if not isinstance(data, list):
        raise PlanningError(f"{path}: expected a JSON list of tier results (from `tierserve bench tiers`)")
    return data
