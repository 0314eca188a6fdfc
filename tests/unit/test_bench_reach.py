"""`bench routing`'s reach: which requests some worker within their tolerance could serve at their
budgets alone, from the calibration, so a run that can never reach 90% says so."""

from __future__ import annotations

from tierserve.benchmarks.calibration import TierService, service_of
from tierserve.benchmarks.loadgen import LOOSE, TIGHT, Budgets, TraceItem
from tierserve.benchmarks.reach import beyond_lines, reach_line, trace_reach
from tierserve.benchmarks.streamcall import CallResult

BUDGETS = Budgets(tight_ttft_ms=1000, tight_tpot_ms=40, loose_ttft_ms=10_000, loose_tpot_ms=100)
# fp32: exact, quick to start, slow per token; int4-woq: 0.3% off, slow to start long prompts.
FP32 = TierService("fp32", 8, 0.5, 500, 50, ttft_ms_by_prompt_words={8: 300, 160: 700})
INT4 = TierService("int4-woq", 8, 0.5, 900, 35, ttft_ms_by_prompt_words={8: 400, 160: 2000})
CARDS = {"fp32": 0.0, "int4-woq": 0.3}


def item(index: int, budget_class: str, tolerance_pct: float, prompt_words: int) -> TraceItem:
    return TraceItem(index, float(index), budget_class, tolerance_pct, prompt_words, 16, 0.0)


def test_calibration_keeps_the_slowest_ttft_of_each_prompt_length() -> None:
    calls = [
        CallResult(sent_s=0.0, token_times_s=[0.3, 0.4], done_s=0.4, budget_met=True),
        CallResult(sent_s=1.0, token_times_s=[1.5, 1.6], done_s=1.6, budget_met=True),
        CallResult(sent_s=2.0, token_times_s=[2.2, 2.3], done_s=2.3, budget_met=True),
    ]
    items = [item(0, TIGHT, 0, 8), item(1, TIGHT, 0, 160), item(2, TIGHT, 0, 8)]
    service = service_of("fp32", calls, items)
    assert service.ttft_ms_by_prompt_words.keys() == {8, 160}
    assert (
        round(service.ttft_ms_by_prompt_words[8]) == 300
        and round(service.ttft_ms_by_prompt_words[160]) == 500
    )


def test_a_request_is_beyond_reach_when_every_tier_within_its_tolerance_misses_a_budget() -> None:
    trace = [
        item(0, TIGHT, 0.0, 8),  # only fp32 is exact, and its TPOT misses the tight 40 ms
        item(1, TIGHT, 1.0, 8),  # int4-woq meets both
        item(2, TIGHT, 1.0, 160),  # int4-woq starts too slowly, fp32's TPOT is too slow
        item(3, LOOSE, 0.0, 160),  # fp32 meets the loose budgets
        item(4, LOOSE, 0.0, 48),  # a length the calibration never served: fp32's TPOT fits
        item(5, LOOSE, 0.1, 8),  # int4-woq's loss is past the tolerance; fp32 meets it
    ]
    reach = trace_reach(trace, BUDGETS, [FP32, INT4], CARDS).to_json()
    assert reach["within"] == 3 and reach["unknown"] == 1
    assert [b["index"] for b in reach["beyond"]] == [0, 2]
    assert reach["beyond"][0]["why"] == {"fp32": "TPOT 50.0 > 40 ms"}
    assert reach["beyond"][1]["why"] == {
        "fp32": "TPOT 50.0 > 40 ms",
        "int4-woq": "TTFT 2000 > 1000 ms",
    }
    assert reach["ceiling"] == round(4 / 6, 4)
    assert "within reach alone: 3 of 6 requests, 1 more" in reach_line(reach)
    assert "no run can serve more than 66.7% at full service level" in reach_line(reach)
    assert beyond_lines(reach)[0] == "- request 0 (tight, tolerance 0%, 8 words): fp32: TPOT 50.0 > 40 ms"


def test_a_tier_without_a_card_serves_no_tolerance_and_a_trace_within_reach_has_no_ceiling() -> None:
    lost = trace_reach([item(0, LOOSE, 10.0, 8)], BUDGETS, [INT4], {"int4-woq": None}).to_json()
    assert lost["beyond"][0]["why"] == {"-": "no tier within the tolerance"}
    served = trace_reach([item(0, LOOSE, 10.0, 8)], BUDGETS, [INT4], CARDS).to_json()
    assert served["beyond"] == [] and served["ceiling"] == 1.0
    assert "no run can serve" not in reach_line(served)


def test_the_routing_report_states_the_reach_under_its_budgets() -> None:
    from tierserve.benchmarks.routing import render_markdown

    reach = trace_reach([item(0, TIGHT, 0.0, 8), item(1, TIGHT, 1.0, 8)], BUDGETS, [FP32, INT4], CARDS)
    meta = {
        "requests": 2,
        "seed": 7,
        "capacity_rps": 1.0,
        "budgets": BUDGETS.__dict__,
        "reach": reach.to_json(),
    }
    target = {"ratio": None, "note": "no comparison point", "rule": "r"}
    markdown = render_markdown([], meta, target)
    assert "within reach alone: 1 of 2 requests; beyond every worker even on an idle pool: 1" in markdown
    assert "- request 0 (tight, tolerance 0%, 8 words): fp32: TPOT 50.0 > 40 ms" in markdown
