"""The routing and overhead benchmarks' pure parts: the seeded trace, its mix, the figures, the target."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from tierserve_client.v1 import generate_pb2

from tierserve.benchmarks.calibration import calibrated_facts, pool_capacity, service_of
from tierserve.benchmarks.livepool import WorkerFacts
from tierserve.benchmarks.loadgen import (
    LOOSE,
    TIGHT,
    Budgets,
    RequestMix,
    SentCall,
    make_trace,
    prompt_for,
    run_open_loop,
    to_request,
)
from tierserve.benchmarks.overhead import overhead_figures, overhead_pool_config
from tierserve.benchmarks.routing import (
    default_policies,
    derive_budgets,
    markdown_table,
    request_record,
)
from tierserve.benchmarks.routing_metrics import (
    Observed,
    goodput_target,
    met_slo,
    ninety_percent_load,
    summarize_level,
)
from tierserve.benchmarks.streamcall import CallResult

MIX = RequestMix()


def test_the_same_seed_gives_the_same_trace_and_another_seed_another() -> None:
    assert make_trace(50, MIX, seed=3) == make_trace(50, MIX, seed=3)
    assert make_trace(50, MIX, seed=3) != make_trace(50, MIX, seed=4)


def test_arrivals_are_poisson_at_unit_rate_and_scale_with_the_load() -> None:
    trace = make_trace(4000, MIX, seed=1)
    gaps = [b.unit_arrival_s - a.unit_arrival_s for a, b in itertools.pairwise(trace)]
    assert all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1.0, rel=0.06)
    assert statistics.stdev(gaps) == pytest.approx(1.0, rel=0.1)  # exponential: sd = mean
    assert trace[10].arrival_s(4.0) == pytest.approx(trace[10].unit_arrival_s / 4)


def test_the_mix_has_the_configured_proportions() -> None:
    trace = make_trace(6000, RequestMix(tight_share=0.3), seed=2)
    classes = Counter(item.budget_class for item in trace)
    assert classes[TIGHT] / len(trace) == pytest.approx(0.3, abs=0.03)
    assert classes[TIGHT] + classes[LOOSE] == len(trace)
    for field, values in (("tolerance_pct", MIX.tolerances_pct), ("prompt_words", MIX.prompt_words)):
        counts = Counter(getattr(item, field) for item in trace)
        assert set(counts) == set(values)
        assert all(n / len(trace) == pytest.approx(1 / len(values), abs=0.03) for n in counts.values())


def test_requests_carry_the_class_budgets_tolerance_and_lengths() -> None:
    budgets = Budgets(tight_ttft_ms=50, tight_tpot_ms=10, loose_ttft_ms=500, loose_tpot_ms=80)
    words = ["one", "two", "three", "four", "five", "six"]
    for item in make_trace(20, MIX, seed=5):
        request = to_request(item, budgets, words, "x")
        expected = (50, 10) if item.budget_class == TIGHT else (500, 80)
        assert (request.max_first_token_latency_ms, request.max_token_latency_ms) == expected
        assert request.max_quality_loss_pct == item.tolerance_pct
        assert request.max_new_tokens == item.new_tokens
        assert len(request.prompt.split()) == item.prompt_words  # wraps around a short text
        assert request.request_id == f"x-{item.index}"
    assert prompt_for(make_trace(1, RequestMix(prompt_words=(2,)), 0)[0], words) in " ".join(words)


def test_strict_share_marks_requests_strict_without_changing_the_rest_of_the_trace() -> None:
    plain = make_trace(4000, RequestMix(), seed=4)
    mixed = make_trace(4000, RequestMix(strict_share=0.25), seed=4)
    assert not any(item.strict for item in plain)
    assert sum(item.strict for item in mixed) / len(mixed) == pytest.approx(0.25, abs=0.03)
    assert [replace(item, strict=False) for item in mixed] == plain
    budgets = Budgets(tight_ttft_ms=50, tight_tpot_ms=10, loose_ttft_ms=500, loose_tpot_ms=80)
    assert [to_request(i, budgets, ["w"], "x").strict for i in mixed[:50]] == [i.strict for i in mixed[:50]]


def test_tight_requests_can_draw_their_own_tolerances() -> None:
    trace = make_trace(3000, RequestMix(tight_share=0.4, tight_tolerances_pct=(1.0, 10.0)), seed=6)
    tight = Counter(item.tolerance_pct for item in trace if item.budget_class == TIGHT)
    loose = Counter(item.tolerance_pct for item in trace if item.budget_class == LOOSE)
    assert set(tight) == {1.0, 10.0}
    assert set(loose) == {0.0, 1.0, 10.0}


def test_bad_mixes_are_refused() -> None:
    with pytest.raises(ValueError, match="tight_share"):
        RequestMix(tight_share=1.5)
    with pytest.raises(ValueError, match="strict_share"):
        RequestMix(strict_share=-0.1)
    with pytest.raises(ValueError, match="tight_tolerances_pct"):
        RequestMix(tight_tolerances_pct=())
    with pytest.raises(ValueError, match="new_tokens"):
        RequestMix(new_tokens=())
    with pytest.raises(ValueError):
        make_trace(0, MIX, seed=0)


class FakeStub:
    """Streams `tokens` tokens then a summary, or fails every third request with RESOURCE_EXHAUSTED."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def Generate(
        self,
        request: generate_pb2.GenerateRequest,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        self.seen.append(request.request_id)
        return self._stream(request)

    async def _stream(
        self, request: generate_pb2.GenerateRequest
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        for index in range(request.max_new_tokens):
            await asyncio.sleep(0.001)
            yield generate_pb2.GenerateResponse(token=generate_pb2.Token(index=index, text="a"))
        yield generate_pb2.GenerateResponse(
            summary=generate_pb2.Summary(
                tier="bf16", budget_met=True, generated_tokens=request.max_new_tokens
            )
        )


def test_open_loop_sends_every_request_of_the_trace_in_order() -> None:
    trace = make_trace(12, RequestMix(new_tokens=(3,)), seed=9)
    budgets = Budgets(100, 100, 100, 100)
    stub = FakeStub()
    done: list[int] = []
    start, calls = asyncio.run(
        run_open_loop(
            stub,  # type: ignore[arg-type]
            trace,
            rate=200.0,
            make_request=lambda item: to_request(item, budgets, ["w"], "t"),
            timeout_s=5,
            on_done=lambda call: done.append(call.item.index),
        )
    )
    assert stub.seen == [f"t-{i}" for i in range(12)]
    assert sorted(done) == list(range(12))
    assert [c.item.index for c in calls] == list(range(12))
    assert all(c.result.ok and len(c.result.token_times_s) == 3 and c.result.tier == "bf16" for c in calls)
    assert all(c.result.sent_s >= c.scheduled_s - 1e-3 for c in calls)
    assert calls[-1].scheduled_s - start == pytest.approx(trace[-1].arrival_s(200.0))


def obs(**fields: Any) -> Observed:
    base: dict[str, Any] = {
        "ttft_budget_ms": 100.0,
        "tpot_budget_ms": 10.0,
        "tolerance_pct": 1.0,
        "status": "OK",
        "sent_s": 0.0,
        "done_s": 1.0,
        "ttft_ms": 50.0,
        "tpot_ms": 5.0,
        "tier": "fp32",
        "summary_budget_met": True,
    }
    return Observed(**{**base, **fields})


def test_slo_is_met_only_within_both_budgets_and_zero_means_none() -> None:
    assert met_slo(obs())
    assert not met_slo(obs(ttft_ms=101.0))
    assert not met_slo(obs(tpot_ms=10.5))
    assert met_slo(obs(ttft_ms=1e6, tpot_ms=1e6, ttft_budget_ms=0.0, tpot_budget_ms=0.0))
    assert met_slo(obs(tpot_ms=None))  # one token: no gaps to judge
    assert not met_slo(obs(status="RESOURCE_EXHAUSTED", ttft_ms=None))


def test_level_figures_on_synthetic_outcomes() -> None:
    cards = {"fp32": 0.0, "int4-woq": 4.0}
    observed = [
        obs(done_s=2.0),
        obs(tier="int4-woq", tolerance_pct=10.0, ttft_ms=150.0, summary_budget_met=False),  # late
        obs(tier="int4-woq", tolerance_pct=1.0, done_s=4.0),  # beyond tolerance
        obs(tier="mystery"),  # no card: a violation
        obs(status="RESOURCE_EXHAUSTED", ttft_ms=None, tpot_ms=None, tier="", done_s=0.1),
    ]
    figures = summarize_level(observed, cards, start_s=0.0)
    assert figures["offered"] == 5 and figures["completed"] == 4
    assert figures["slo_met"] == 3 and figures["attainment"] == pytest.approx(0.6)
    assert figures["summary_budget_met"] == 3
    assert figures["wall_s"] == 4.0 and figures["goodput_rps"] == pytest.approx(0.75)
    assert figures["accuracy_violations"] == 2
    # Met both budgets and within tolerance: only the first (the third and fourth were on time on a
    # tier beyond their tolerance).
    assert figures["service_level_met"] == 1 and figures["service_level_attainment"] == pytest.approx(0.2)
    assert figures["service_level_goodput_rps"] == pytest.approx(0.25)
    assert figures["rejected"] == {"RESOURCE_EXHAUSTED": 1} and figures["rejected_total"] == 1
    assert figures["tier_share"] == {"fp32": 0.25, "int4-woq": 0.5, "mystery": 0.25}
    assert figures["ttft_p50_ms"] == 50.0 and figures["ttft_p99_ms"] == 150.0


def row(policy: str, load: float, attainment: float, goodput: float, violations: int = 0) -> dict[str, Any]:
    return {
        "policy": policy,
        "load": load,
        "rate_rps": load * 10,
        "attainment": attainment,
        "summary_attainment": attainment,
        "goodput_rps": goodput,
        "accuracy_violations": violations,
        "service_level_attainment": attainment,
        "ttft_p50_ms": 1.0,
        "ttft_p99_ms": None,
        "tpot_p50_ms": 1.0,
        "tpot_p99_ms": 2.0,
        "tier_share": {"fp32": 1.0},
        "rejected": {},
    }


ROWS = [
    row("slo", 0.5, 0.99, 5.0),
    row("slo", 1.0, 0.95, 9.0),
    row("round_robin", 0.5, 0.92, 4.0, violations=3),
    row("round_robin", 1.0, 0.60, 5.0),
    row("least_loaded", 0.5, 0.95, 4.5),
    row("least_loaded", 1.0, 0.91, 6.0),
]


def test_ninety_percent_load_is_interpolated_where_attainment_crosses_90() -> None:
    # round_robin: 92% at 0.5, 60% at 1.0: crosses 90% a sixteenth of the way, at 0.53125.
    assert ninety_percent_load(ROWS, "round_robin") == pytest.approx(0.53125)
    # least_loaded still attains 91% at the highest load run: that load, a lower bound.
    assert ninety_percent_load(ROWS, "least_loaded") == 1.0
    assert ninety_percent_load([row("x", 1.0, 0.5, 1.0)], "x") is None
    # A dip below 90% under a higher load that attains it again: the crossing after the last 90%.
    dip = [row("x", 0.5, 0.85, 1.0), row("x", 1.0, 0.95, 2.0), row("x", 1.5, 0.80, 3.0)]
    assert ninety_percent_load(dip, "x") == pytest.approx(1.0 + 0.5 / 3)


def test_target_compares_each_policys_goodput_at_its_own_90_percent_crossing() -> None:
    target = goodput_target(ROWS)
    # least_loaded sustains 6.0/s at load 1.0 (round_robin ~4.06/s at 0.53); slo 9.0/s at 1.0.
    assert target["best_other_policy"] == "least_loaded" and target["other_load"] == 1.0
    assert target["load"] == 1.0 and target["ratio"] == pytest.approx(1.5) and target["met"] is True
    assert "interpolated" in target["rule"]
    assert "crossing lies beyond" in target["note"]
    crossing = goodput_target([row("slo", 0.5, 1.0, 5.0), row("slo", 1.0, 0.8, 7.0), *ROWS[2:4]])
    # slo crosses at 0.75 with 6.0/s; round_robin at 0.53125 with 4.0625/s.
    assert crossing["load"] == pytest.approx(0.75) and crossing["reference_goodput_rps"] == pytest.approx(6.0)
    assert crossing["other_goodput_rps"] == pytest.approx(4.0625) and "note" not in crossing
    assert goodput_target([*ROWS, row("slo", 2.0, 0.2, 1.0, violations=1)])["met"] is False
    assert "did not run" in goodput_target([r for r in ROWS if r["policy"] != "slo"])["note"]
    never = [row("slo", 1.0, 0.5, 1.0), row("round_robin", 1.0, 0.5, 1.0)]
    assert "no other policy attains 90%" in goodput_target(never)["note"]
    slo_never = [row("slo", 1.0, 0.5, 1.0), row("round_robin", 1.0, 0.95, 3.0)]
    missed = goodput_target(slo_never)
    assert missed["met"] is False and "attains 90% at no offered load" in missed["note"]
    assert "least_loaded" in markdown_table(ROWS)


def test_budgets_and_capacity_follow_the_measured_workers() -> None:
    facts = [
        WorkerFacts("a", "fp32", "x", ttft_ms=100.0, tpot_ms=20.0, ppl_delta_pct=0.0),
        WorkerFacts("b", "int4-woq", "y", ttft_ms=50.0, tpot_ms=10.0, ppl_delta_pct=4.0),
    ]
    budgets = derive_budgets(facts)
    assert (budgets.tight_ttft_ms, budgets.tight_tpot_ms) == (150.0, 12.5)
    assert (budgets.loose_ttft_ms, budgets.loose_tpot_ms) == (1000.0, 40.0)
    assert default_policies(["first_healthy", "slo", "round_robin"]) == ["slo", "round_robin"]
    assert default_policies(["first_healthy"]) == ["first_healthy"]


def call(
    sent: float, token_times: list[float], status: str = "OK", worker_ttft_ms: float | None = None
) -> CallResult:
    return CallResult(
        sent_s=sent,
        token_times_s=token_times,
        done_s=token_times[-1],
        status=status,
        budget_met=True,
        worker_ttft_ms=worker_ttft_ms,
    )


def test_overhead_figures_pair_router_and_direct_calls() -> None:
    # The worker's own TTFT varies (9.6 / 9.0 ms routed, 9.8 / 9.9 ms direct): the added TTFT
    # outside it is 1.4 / 1.5 ms through the router and 0.2 / 0.1 ms directly.
    pairs = [
        (
            call(0.0, [0.0110, 0.0212, 0.0314], worker_ttft_ms=9.6),
            call(1.0, [1.0100, 1.0200, 1.0300], worker_ttft_ms=9.8),
        ),
        (
            call(2.0, [2.0105, 2.0207, 2.0309], worker_ttft_ms=9.0),
            call(3.0, [3.0100, 3.0200, 3.0300], worker_ttft_ms=9.9),
        ),
    ]
    figures = overhead_figures(pairs)
    assert figures["pairs"] == 2 and figures["tokens_compared"] == 4
    assert figures["per_token_diff_p50_ms"] == pytest.approx(0.2)
    assert figures["ttft_p50_diff_ms"] == pytest.approx(1.0)  # nearest rank of two: the upper
    assert figures["ttft_p99_diff_ms"] == pytest.approx(1.0)
    assert figures["added_ttft_p50_ms"] == pytest.approx(1.5 - 0.2)
    assert figures["added_ttft_p99_ms"] == pytest.approx(1.5 - 0.2)
    assert figures["rate_ratio"] == pytest.approx(0.06 / (0.0314 + 0.0309))
    assert figures["targets"] == {
        "per_token_p50_le_0.3ms": True,
        "ttft_p99_le_2ms": True,
        "token_rate_ge_0.97x": False,
    }
    slow_router = [
        (call(0.0, [0.0140, 0.0240], worker_ttft_ms=10.0), call(1.0, [1.0100, 1.0200], worker_ttft_ms=9.9))
    ]
    assert overhead_figures(slow_router)["targets"]["ttft_p99_le_2ms"] is False  # 4.0 - 0.1 ms added


def test_request_records_put_the_routers_prediction_beside_what_the_client_saw() -> None:
    item = make_trace(1, RequestMix(), seed=3)[0]
    result = CallResult(sent_s=10.0, token_times_s=[10.5, 10.52, 10.56], done_s=10.6, tier="bf16")
    result.predicted_ttft_ms, result.predicted_tpot_ms, result.best_effort = 400.0, 25.0, True
    record = request_record(SentCall(item=item, scheduled_s=10.0, result=result))
    assert record["predicted_ttft_ms"] == 400.0 and record["ttft_ms"] == pytest.approx(500.0)
    assert record["predicted_tpot_ms"] == 25.0 and record["tpot_ms"] == pytest.approx(30.0)
    assert record["tier"] == "bf16" and record["best_effort"] is True and record["status"] == "OK"
    assert record["index"] == item.index and record["budget_class"] == item.budget_class


def test_the_overhead_bench_puts_its_router_beside_the_client_and_the_worker_apart() -> None:
    config = overhead_pool_config(None, "bf16", [0, 1, 2, 3], new_tokens=64)
    assert config.router.cores == [0]
    assert [(w.tier, w.cores) for w in config.workers] == [("bf16", [1, 2, 3])]
    alone = overhead_pool_config(None, "bf16", [5], new_tokens=64)
    assert alone.router.cores == [] and alone.workers[0].cores == [5]


def test_calibration_rates_a_tier_by_its_busy_time_and_sums_its_workers() -> None:
    # Two requests on fp32: 0.5 s and 1.5 s busy -> 2 requests / 2 s; TTFT 100 and 300 ms.
    fp32 = service_of("fp32", [call(0.0, [0.1, 0.2, 0.5]), call(10.0, [10.3, 10.8, 11.5])])
    assert fp32.service_rate_rps == pytest.approx(1.0)
    assert fp32.ttft_ms == pytest.approx(200.0)
    assert fp32.tpot_ms == pytest.approx(statistics.median([200.0, 600.0]))
    int4 = service_of("int4-woq", [call(0.0, [0.05, 0.25])])
    assert int4.service_rate_rps == pytest.approx(4.0)
    facts = [
        WorkerFacts("a", "fp32", "x", ttft_ms=1.0, tpot_ms=1.0, ppl_delta_pct=0.0),
        WorkerFacts("b", "fp32", "y", ttft_ms=1.0, tpot_ms=1.0, ppl_delta_pct=0.0),
        WorkerFacts("c", "int4-woq", "z", ttft_ms=1.0, tpot_ms=1.0, ppl_delta_pct=4.0),
    ]
    assert pool_capacity(facts, [fp32, int4]) == pytest.approx(1.0 + 1.0 + 4.0)
    calibrated = calibrated_facts(facts, [fp32, int4])
    assert [(f.ttft_ms, f.tpot_ms) for f in calibrated] == [
        (fp32.ttft_ms, fp32.tpot_ms),
        (fp32.ttft_ms, fp32.tpot_ms),
        (int4.ttft_ms, int4.tpot_ms),
    ]
    assert calibrated[2].ppl_delta_pct == 4.0


def test_calibration_refuses_a_failed_request_rather_than_averaging_it() -> None:
    with pytest.raises(RuntimeError, match="calibrating tier bf16: UNAVAILABLE"):
        service_of("bf16", [call(0.0, [0.1, 0.2]), call(1.0, [1.2], status="UNAVAILABLE")])
