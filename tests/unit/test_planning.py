"""Capacity planning arithmetic: the budget formula, who meets it, and how many workers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tierserve_client.v1 import router_pb2

from tierserve.cli import main
from tierserve.ops.capacity import (
    PlanningError,
    Requirements,
    TierFigures,
    busy_seconds,
    figures_from_workers,
    make_plan,
    offered_load,
    token_budget,
    workers_needed,
)
from tierserve.ops.capacity_bench import figures_from_bench, load_bench_file


def test_budget_is_the_session_time_left_over_every_token() -> None:
    req = Requirements(
        sessions_per_hour=1000,
        requests_per_session=5,
        tokens_per_request=128,
        session_overhead_s=10,
        think_time_s=20,
        session_length_s=150,
    )
    budget = token_budget(req)
    # (150 - 10 - 5 x 20) / (5 x 128) = 40 / 640 s
    assert budget.feasible and budget.per_token_s == pytest.approx(0.0625)
    assert "62.50 ms" in budget.reason


def test_requirements_that_leave_no_time_are_infeasible_and_say_why() -> None:
    budget = token_budget(Requirements(session_overhead_s=10, think_time_s=30, session_length_s=150))
    assert not budget.feasible and budget.per_token_s < 0
    assert "infeasible" in budget.reason and "160 s" in budget.reason and "150 s" in budget.reason
    plan = make_plan(
        Requirements(think_time_s=30), [TierFigures("fp32", tpot_ms=1.0, ttft_ms=1.0, ppl_delta_pct=0.0)]
    )
    assert not any(t.meets_budget for t in plan.tiers) and plan.recommended() is None


def test_workers_from_erlangs_and_utilization() -> None:
    req = Requirements(sessions_per_hour=3600, requests_per_session=2, tokens_per_request=100)
    busy = busy_seconds(ttft_ms=100, tpot_ms=9, tokens=100)
    assert busy == pytest.approx(1.0)
    # 3600 sessions/h x 2 requests x 1 s / 3600 = 2 Erlangs; at 70%: ceil(2.857) = 3.
    assert offered_load(req, busy) == pytest.approx(2.0)
    assert workers_needed(2.0, 0.7) == 3
    assert workers_needed(2.0, 1.0) == 2  # no float noise turns exactly 2 into 3
    assert workers_needed(0.0, 0.7) == 0
    assert workers_needed(0.01, 0.7) == 1


def test_a_tier_meets_the_budget_with_its_first_token_spread_over_the_request() -> None:
    req = Requirements(tokens_per_request=100)  # budget 40 s / 500 tokens = 80 ms
    plan = make_plan(
        req,
        [
            TierFigures("fast", tpot_ms=70, ttft_ms=500, ppl_delta_pct=3.0),  # 75 ms/token: meets
            TierFigures("slow-start", tpot_ms=70, ttft_ms=2000, ppl_delta_pct=0.0),  # 90 ms/token: not
            TierFigures("exact", tpot_ms=1.0, ttft_ms=0.0, ppl_delta_pct=0.0),
        ],
    )
    by_name = {t.tier: t for t in plan.tiers}
    assert by_name["fast"].meets_budget and by_name["fast"].effective_ms_per_token == pytest.approx(75)
    assert not by_name["slow-start"].meets_budget
    assert plan.recommended() is by_name["exact"]  # the most accurate that meets it


def test_tolerance_keeps_lossy_tiers_from_being_recommended() -> None:
    req = Requirements(max_quality_loss_pct=1.0)
    plan = make_plan(
        req,
        [TierFigures("int4", 1.0, 1.0, 5.0), TierFigures("unknown", 1.0, 1.0, None)],
    )
    assert [t.within_tolerance for t in plan.tiers] == [False, False]
    assert plan.recommended() is None


@pytest.mark.parametrize(
    "field, value", [("sessions_per_hour", 0), ("think_time_s", -1), ("target_utilization", 1.5)]
)
def test_bad_requirements_are_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(PlanningError):
        Requirements(**{field: value})


positive = st.floats(min_value=0.1, max_value=1e4, allow_nan=False, allow_infinity=False)


@given(
    sessions=positive,
    requests=st.floats(min_value=1, max_value=50),
    tokens=st.floats(min_value=1, max_value=4096),
    ttft=st.floats(min_value=0, max_value=5000),
    tpot=st.floats(min_value=0.1, max_value=1000),
    more=st.floats(min_value=1.0, max_value=10.0),
)
def test_more_traffic_never_needs_fewer_workers(
    sessions: float, requests: float, tokens: float, ttft: float, tpot: float, more: float
) -> None:
    def workers(per_hour: float) -> int:
        req = Requirements(
            sessions_per_hour=per_hour, requests_per_session=requests, tokens_per_request=tokens
        )
        return make_plan(req, [TierFigures("t", tpot, ttft)]).tiers[0].workers

    assert workers(sessions * more) >= workers(sessions) >= 1


@given(
    length=st.floats(min_value=1, max_value=1e5),
    extra=st.floats(min_value=0, max_value=1e4),
    think=st.floats(min_value=0, max_value=100),
    overhead=st.floats(min_value=0, max_value=100),
)
def test_a_longer_session_never_shrinks_the_budget(
    length: float, extra: float, think: float, overhead: float
) -> None:
    def budget(session: float) -> float:
        return token_budget(
            Requirements(session_length_s=session, think_time_s=think, session_overhead_s=overhead)
        ).per_token_s

    assert budget(length + extra) >= budget(length)


@given(tpot=st.floats(min_value=0.1, max_value=500), faster=st.floats(min_value=0.0, max_value=0.99))
def test_a_faster_tier_meets_every_budget_a_slower_one_meets(tpot: float, faster: float) -> None:
    plan = make_plan(
        Requirements(), [TierFigures("slow", tpot, 50.0), TierFigures("fast", tpot * faster, 50.0)]
    )
    slow, fast = plan.tiers
    assert fast.workers <= slow.workers
    assert fast.meets_budget or not slow.meets_budget


def test_figures_from_a_bench_tiers_file(tmp_path: Path) -> None:
    rows = [
        {"tier": "fp32", "tpot_ms": 30.0, "ttft_ms": 80.0, "ppl_delta_pct": 0.0},
        {"tier": "llamacpp", "tpot_ms": None},
    ]
    file = tmp_path / "tiers.json"
    file.write_text(json.dumps(rows))
    figures, notes = figures_from_bench(load_bench_file(file), str(file))
    assert figures == [TierFigures("fp32", 30.0, 80.0, 0.0, str(file))]
    assert "llamacpp" in notes[0]
    file.write_text("{}")
    with pytest.raises(PlanningError, match="expected a JSON list"):
        load_bench_file(file)
    with pytest.raises(PlanningError, match="not found"):
        load_bench_file(tmp_path / "missing.json")


def _worker(worker_id: str, tier: str, tpot_us: int, delta: float | None) -> router_pb2.WorkerStatus:
    status = router_pb2.WorkerStatus(worker_id=worker_id)
    status.info.tier = tier
    status.info.warmup_latency.tpot_p50_us = tpot_us
    status.info.warmup_latency.ttft_p50_us = 3 * tpot_us
    status.info.warmup_latency.samples = 4
    if delta is not None:
        status.info.accuracy.measured = True
        status.info.accuracy.perplexity_delta_pct = delta
    return status


def test_figures_from_workers_take_each_tiers_slowest_and_skip_unmeasured() -> None:
    workers = [
        _worker("a", "fp32", 20_000, 0.0),
        _worker("b", "fp32", 30_000, 0.0),
        _worker("c", "bf16", 0, None),
    ]
    relayed = _worker("d", "int8-woq", 50_000, 0.8)
    relayed.relayed_latency.tpot_p50_us, relayed.relayed_latency.samples = 25_000, 10
    figures, notes = figures_from_workers([*workers, relayed])
    by_tier = {f.tier: f for f in figures}
    assert by_tier["fp32"].tpot_ms == 30.0 and by_tier["fp32"].ttft_ms == 90.0
    assert "b (warm-up p50)" in by_tier["fp32"].source
    assert by_tier["int8-woq"].tpot_ms == 25.0 and "relayed" in by_tier["int8-woq"].source
    assert "bf16" not in by_tier and "c" in notes[0]


def test_plan_command_prints_json_and_exits_1_when_infeasible(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "tiers.json"
    file.write_text(json.dumps([{"tier": "fp32", "tpot_ms": 30.0, "ttft_ms": 80.0, "ppl_delta_pct": 0.0}]))
    assert main(["plan", "--from-bench", str(file), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["feasible"] and math.isclose(plan["budget_per_token_ms"], 62.5)
    assert plan["tiers"][0]["workers"] == 8 and plan["recommended_tier"] == "fp32"
    assert "budget_per_token =" in plan["formulas"]["budget"]
    assert main(["plan", "--think-time-s", "40"]) == 1
    assert "infeasible" in capsys.readouterr().out


def test_tolerances_and_ranking_judge_loss_as_the_router_does() -> None:
    plan = make_plan(
        Requirements(max_quality_loss_pct=0.0),
        [TierFigures("bf16", 1.0, 1.0, -0.4), TierFigures("fp32", 2.0, 1.0, 0.0001)],
    )
    bf16, fp32 = plan.tiers
    assert bf16.within_tolerance and fp32.within_tolerance  # a gain is noise; fp32 is the reference
    assert plan.recommended() is fp32  # ties on loss go to the reference
