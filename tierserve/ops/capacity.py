"""Capacity planning with the seed article's arithmetic, extended to workers that batch: from
application requirements to a per-token latency budget, the measured tiers that meet it, how many
concurrent streams one worker of each serves within it, and how many workers the load needs.

The per-token budget: a session of `requests` requests must fit in `session_length_s`, after the
per-session overhead and the user's think time between requests; what is left is shared by every
output token of the session:

    budget_per_token = (session_length - overhead - requests x think_time) / (requests x tokens_per_request)

A tier meets the budget when a whole request fits in its share of the session, first token included:

    busy_s = TTFT + tokens_per_request x TPOT  <=  tokens_per_request x budget_per_token

The seed assumed one stream per worker. A worker that batches continuously decodes up to max_batch
streams together, and its TPOT (and TTFT) grow with the number of streams it serves. Streams per
worker is the largest concurrency c, at most max_batch and at most the highest concurrency measured
(TPOT(c) measured, or interpolated between measured concurrencies, never extrapolated), at which the
same rule still holds, and holds at every concurrency below it (a worker passes through them):

    busy_s(c) = TTFT(c) + tokens_per_request x TPOT(c)  <=  tokens_per_request x budget_per_token

(a smaller c is taken when it needs fewer workers: batching that loses throughput). Without
concurrency figures, or with batching off, c = 1: the seed's arithmetic. The offered load in Erlangs
(streams busy on average, each for busy_s(c)) is

    load = sessions_per_hour x requests_per_session x busy_s(c) / 3600

and the pool needs workers = ceil(load / (c x target_utilization)) of that tier; the utilization
headroom is what keeps queueing delay (which the budget does not include) small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tierserve_client.v1 import router_pb2, worker_pb2

from tierserve.domain.quality import effective_loss, within_tolerance
from tierserve.domain.tiers import REFERENCE_TIER
from tierserve.ops.capacity_streams import Level, points_up_to, stream_cap

BUDGET_FORMULA = (
    "budget_per_token = (session_length - overhead - requests x think_time) / (requests x tokens_per_request)"
)
MEETS_RULE = "a tier meets the budget when TTFT + tokens x TPOT <= tokens x budget_per_token"
STREAMS_RULE = (
    "streams per worker c = the largest concurrency <= max_batch and <= the highest measured at which "
    "TTFT(c) + tokens x TPOT(c) <= tokens x budget_per_token (and at every concurrency below it); "
    "1 without concurrency figures"
)
WORKERS_FORMULA = (
    "load (Erlangs) = sessions/h x requests/session x (TTFT(c) + tokens x TPOT(c)) / 3600; "
    "workers = ceil(load / (c x target utilization))"
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
    """Measured figures of one tier (or benchmark path); latencies in milliseconds. `tpot_ms` and
    `ttft_ms` are one stream's; `levels` the figures by concurrent streams on one worker (empty: not
    measured), `max_batch` the most streams a worker decodes together (None: unknown), `batching`
    whether the worker batches (False: one request at a time; None: unknown)."""

    tier: str
    tpot_ms: float
    ttft_ms: float = 0.0
    ppl_delta_pct: float | None = None
    source: str = ""
    levels: tuple[Level, ...] = ()
    max_batch: int | None = None
    batching: bool | None = None


def _max_optional(a: float | None, b: float | None) -> float | None:
    return a if b is None else b if a is None else max(a, b)


def _merge_levels(a: Sequence[Level], b: Sequence[Level]) -> tuple[Level, ...]:
    """Per stream count, the slower of the two measurements."""
    merged: dict[int, Level] = {}
    for level in (*a, *b):
        known = merged.get(level.streams)
        if known is not None:
            level = Level(
                level.streams, max(known.tpot_ms, level.tpot_ms), _max_optional(known.ttft_ms, level.ttft_ms)
            )
        merged[level.streams] = level
    return tuple(merged[streams] for streams in sorted(merged))


def combine(a: TierFigures, b: TierFigures) -> TierFigures:
    """Two measurements of one tier as one a plan can rely on for both: the slower one-stream figures,
    the slower figure at each concurrency, the smaller batch, batching only when neither is off, and
    the larger measured loss."""
    slow = a if a.tpot_ms >= b.tpot_ms else b
    batches = [m for m in (a.max_batch, b.max_batch) if m is not None]
    flags = {a.batching, b.batching}
    batching = False if False in flags else True if True in flags else None
    sources = [s for s in dict.fromkeys((a.source, b.source)) if s]
    return TierFigures(
        tier=a.tier,
        tpot_ms=slow.tpot_ms,
        ttft_ms=slow.ttft_ms,
        ppl_delta_pct=_max_optional(a.ppl_delta_pct, b.ppl_delta_pct),
        source=", ".join(sources),
        levels=_merge_levels(a.levels, b.levels),
        max_batch=min(batches) if batches else None,
        batching=batching,
    )


def combine_by_tier(figures: Iterable[TierFigures]) -> list[TierFigures]:
    """One entry per tier, in first-seen order, each tier's measurements combined."""
    by_tier: dict[str, TierFigures] = {}
    for entry in figures:
        known = by_tier.get(entry.tier)
        by_tier[entry.tier] = entry if known is None else combine(known, entry)
    return list(by_tier.values())


def busy_seconds(ttft_ms: float, tpot_ms: float, tokens: float) -> float:
    """How long one request occupies a stream: its first token, then every further token."""
    return (ttft_ms + tokens * tpot_ms) / 1e3


def offered_load(req: Requirements, busy_s: float) -> float:
    """Average number of busy streams (Erlangs) the application's requests need."""
    return req.sessions_per_hour * req.requests_per_session * busy_s / 3600.0


def workers_needed(load: float, utilization: float, streams_per_worker: int = 1) -> int:
    if load <= 0:
        return 0
    # A hair below the next integer is float noise, not a need for another worker.
    return max(1, math.ceil(load / (streams_per_worker * utilization) - 1e-9))


@dataclass(frozen=True)
class TierPlan:
    tier: str
    # One stream's figures.
    tpot_ms: float
    ttft_ms: float
    ppl_delta_pct: float | None
    # Concurrent streams one worker is planned at, and its figures there.
    streams_per_worker: int
    tpot_at_streams_ms: float
    ttft_at_streams_ms: float
    # How streams_per_worker was chosen (or why it is 1).
    streams_basis: str
    # (TTFT + tokens x TPOT) / tokens at streams_per_worker: per-token time, first token spread out.
    effective_ms_per_token: float
    busy_s: float
    load_erlangs: float
    workers: int
    # The seed's plan from the same figures: one stream per worker.
    one_stream_workers: int
    meets_budget: bool
    within_tolerance: bool
    source: str
    max_batch: int | None = None


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
            "formulas": {
                "budget": BUDGET_FORMULA,
                "meets": MEETS_RULE,
                "streams": STREAMS_RULE,
                "workers": WORKERS_FORMULA,
            },
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


@dataclass(frozen=True)
class _Option:
    """A tier planned at one stream count."""

    streams: int
    tpot_ms: float
    ttft_ms: float
    effective_ms: float
    busy_s: float
    load: float
    workers: int
    meets: bool


def _option(req: Requirements, budget: Budget, streams: int, tpot_ms: float, ttft_ms: float) -> _Option:
    busy = busy_seconds(ttft_ms, tpot_ms, req.tokens_per_request)
    load = offered_load(req, busy)
    effective = busy * 1e3 / req.tokens_per_request
    return _Option(
        streams=streams,
        tpot_ms=tpot_ms,
        ttft_ms=ttft_ms,
        effective_ms=effective,
        busy_s=busy,
        load=load,
        workers=workers_needed(load, req.target_utilization, streams),
        meets=budget.feasible and effective <= budget.per_token_s * 1e3,
    )


def _no_batch_reason(figures: TierFigures, cap: int) -> str | None:
    """Why a tier's worker is planned at one stream before looking at the budget; None if it need not be."""
    if figures.batching is False:
        return "one stream: its workers serve one request at a time (batching off)"
    if not figures.levels:
        return "one stream: no TPOT by concurrency measured"
    if figures.max_batch is not None and figures.max_batch <= 1:
        return "one stream: max_batch is 1"
    if cap < 2:
        return "one stream: measured at one stream only"
    return None


def choose_streams(req: Requirements, budget: Budget, figures: TierFigures) -> tuple[_Option, _Option, str]:
    """The tier planned at the stream count STREAMS_RULE picks, the one-stream plan, and how."""
    one = _option(req, budget, 1, figures.tpot_ms, figures.ttft_ms)
    cap = stream_cap(figures.levels, figures.max_batch)
    if (reason := _no_batch_reason(figures, cap)) is not None:
        return one, one, reason
    if not one.meets:
        return one, one, "one stream: one stream alone does not meet the budget"
    chosen, largest, basis = one, one, "measured at 1 stream"
    for point in points_up_to(figures.levels, cap):
        ttft = figures.ttft_ms if point.ttft_ms is None else point.ttft_ms
        option = _option(req, budget, point.streams, point.tpot_ms, ttft)
        if not option.meets:
            break  # a worker planned at more streams also runs at this many: each must meet
        largest = option
        if option.workers <= chosen.workers:
            chosen, basis = option, point.basis
    if chosen is one:
        if largest is one:
            return one, one, "one stream: 2 streams exceed the budget"
        return one, one, f"one stream: up to {largest.streams} fit the budget but need more workers"
    limit = "max_batch" if figures.max_batch is not None and cap == figures.max_batch else "highest measured"
    if largest.streams == cap:
        basis += f"; {cap} = {limit}"
    if largest is not chosen:
        basis += f"; {largest.streams} fit the budget but need more workers (throughput falls)"
    elif largest.streams < cap:
        basis += f"; {largest.streams + 1} exceed the budget"
    return chosen, one, basis


def plan_tier(req: Requirements, budget: Budget, figures: TierFigures) -> TierPlan:
    chosen, one, basis = choose_streams(req, budget, figures)
    return TierPlan(
        tier=figures.tier,
        tpot_ms=figures.tpot_ms,
        ttft_ms=figures.ttft_ms,
        ppl_delta_pct=figures.ppl_delta_pct,
        streams_per_worker=chosen.streams,
        tpot_at_streams_ms=chosen.tpot_ms,
        ttft_at_streams_ms=chosen.ttft_ms,
        streams_basis=basis,
        effective_ms_per_token=chosen.effective_ms,
        busy_s=chosen.busy_s,
        load_erlangs=chosen.load,
        workers=chosen.workers,
        one_stream_workers=one.workers,
        meets_budget=one.meets,
        within_tolerance=within_tolerance(figures.tier, figures.ppl_delta_pct, req.max_quality_loss_pct),
        source=figures.source,
        max_batch=figures.max_batch,
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
    single = [t.tier for t in plan.tiers if t.streams_per_worker == 1]
    if single:
        plan.notes.append(
            f"planned at one stream per worker (the seed's arithmetic): {', '.join(single)}; "
            "see each tier's streams basis for why"
        )
    plan.notes.append("queueing delay is not in the budget; the utilization target leaves room for it")
    return plan


# --- measured figures from a live pool ----------------------------------------------------------------


def freshest_latency(worker: router_pb2.WorkerStatus) -> tuple[worker_pb2.LatencyStats, str]:
    """The freshest figures a worker has: relayed by the router, else its own live, else warm-up."""
    if worker.relayed_latency.samples and worker.relayed_latency.tpot_p50_us:
        return worker.relayed_latency, "relayed"
    if worker.info.live_latency.samples and worker.info.live_latency.tpot_p50_us:
        return worker.info.live_latency, "live"
    return worker.info.warmup_latency, "warm-up"


def live_levels(worker: router_pb2.WorkerStatus) -> tuple[Level, ...]:
    """The router's TPOT by concurrent streams on the worker's cores (moving averages, no TTFT)."""
    return tuple(
        Level(c.streams, c.tpot_us / 1e3)
        for c in sorted(worker.live.tpot_by_concurrency, key=lambda c: c.streams)
        if c.streams >= 1 and c.samples > 0 and c.tpot_us > 0
    )


def figures_from_workers(workers: Sequence[router_pb2.WorkerStatus]) -> tuple[list[TierFigures], list[str]]:
    """One entry per tier, from ListWorkers: with several workers of a tier, their figures combined
    (the slower at each concurrency, the smaller batch: a plan should hold for every worker it
    counts). Returns the figures and notes on what was skipped and where the figures came from."""
    measured: list[TierFigures] = []
    notes: list[str] = []
    for worker in workers:
        stats, kind = freshest_latency(worker)
        tier = worker.info.tier
        if not tier or not stats.tpot_p50_us:
            notes.append(f"worker {worker.worker_id}: no latency measured yet; left out")
            continue
        card, batch = worker.info.accuracy, worker.info.batch
        measured.append(
            TierFigures(
                tier=tier,
                tpot_ms=stats.tpot_p50_us / 1e3,
                ttft_ms=stats.ttft_p50_us / 1e3,
                ppl_delta_pct=float(card.perplexity_delta_pct) if card.measured else None,
                source=f"{worker.worker_id} ({kind} p50)",
                levels=live_levels(worker),
                max_batch=max(1, batch.max_batch) if batch.enabled else 1,
                batching=batch.enabled,
            )
        )
    if any(f.levels for f in measured):
        notes.append(
            "streams per worker from the router's live TPOT by concurrent streams (moving averages of "
            "relayed tokens; streams counted on the worker's cores, those of workers sharing them "
            "included; the highest level counts that many or more); TTFT at one stream"
        )
    return combine_by_tier(measured), notes
