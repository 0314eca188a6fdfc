"""`bench throughput`'s figures and report from made-up calls, its pool config, and its closed loop
against a fake router stub (no servers, no model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

from tierserve.benchmarks.streamcall import CallResult
from tierserve.benchmarks.throughput import report
from tierserve.benchmarks.throughput.figures import (
    OFF,
    ON,
    LevelRun,
    TierWorkers,
    WorkerSample,
    add_ratios,
    check_targets,
    greedy_agreement,
    level_row,
    scaling_note,
    tier_summary,
)
from tierserve.benchmarks.throughput.run import (
    chosen_tiers,
    closed_loop,
    make_prompts,
    parse_concurrency,
    requests_at,
    throughput_pool_config,
)
from tierserve.cli.main import build_parser
from tierserve.domain.config import ConfigError

NATIVE_INT4 = (
    "native: layers aten._weight_int4pack_mm_for_cpu int4 group 32 asymmetric; lm_head fbgemm ...; "
    "in IPEX's TorchScript decoder graph"
)


def call(
    sent: float, ttft_s: float, gap_s: float, tokens: int, text: str = "t", status: str = "OK"
) -> CallResult:
    times = [sent + ttft_s + i * gap_s for i in range(tokens)]
    return CallResult(
        sent_s=sent, token_times_s=times, done_s=times[-1] if times else sent, status=status, text=text
    )


def sample(rss: float = 500.0, running: int = 1, kv: int = 100) -> WorkerSample:
    return WorkerSample(rss_mib=rss, running=running, waiting=0, kv_tokens_used=kv, kv_cache_mb=kv / 100)


def test_a_level_aggregates_every_token_over_the_wall_time() -> None:
    run = LevelRun("bf16", ON, 3)
    # Three streams side by side, 11 tokens each (TTFT 0.1, 0.1, 0.2 s; gaps 10, 10, 20 ms), then
    # a refused call that ends the level at 0.5 s.
    run.calls = [(0, call(0.0, 0.1, 0.01, 11)), (1, call(0.0, 0.1, 0.01, 11)), (2, call(0.0, 0.2, 0.02, 11))]
    run.calls.append((3, call(0.5, 0.0, 0.0, 0, status="RESOURCE_EXHAUSTED")))
    run.samples = [sample(500, 1, 100), sample(520, 2, 300), sample(510, 0, 0)]
    row = level_row(run)
    assert row["requests"] == 4 and row["completed"] == 3
    assert row["failures"] == {"RESOURCE_EXHAUSTED": 1}
    assert row["tokens"] == 33 and row["wall_s"] == pytest.approx(0.5)
    assert row["tokens_per_s"] == pytest.approx(66.0)
    assert row["tpot_p50_ms"] == pytest.approx(10.0) and row["tpot_p99_ms"] == pytest.approx(20.0)
    assert row["ttft_p50_ms"] == pytest.approx(100.0) and row["ttft_p99_ms"] == pytest.approx(200.0)
    assert row["worker_rss_mib_peak"] == 520 and row["worker_rss_mib_end"] == 510
    assert row["batch_running_peak"] == 2 and row["kv_tokens_peak"] == 300


def rows_for(tier: str, figures: dict[tuple[str, int], tuple[float, float]]) -> list[dict[str, Any]]:
    """Rows with these (mode, streams) -> (tokens/s, TPOT p50 ms)."""
    rows = []
    for (mode, streams), (rate, tpot) in figures.items():
        rows.append(
            {
                "tier": tier, "batching": mode, "concurrency": streams, "tokens_per_s": rate,
                "tpot_p50_ms": tpot, "failures": {},
            }
        )  # fmt: skip
    add_ratios(rows)
    return rows


def test_ratios_are_against_one_stream_of_the_same_mode_and_against_batching_off() -> None:
    rows = rows_for(
        "bf16",
        {(ON, 1): (40.0, 24.0), (ON, 8): (300.0, 26.0), (OFF, 1): (40.0, 24.0), (OFF, 8): (41.0, 24.0)},
    )
    on8 = next(r for r in rows if r["batching"] == ON and r["concurrency"] == 8)
    assert on8["tokens_per_s_vs_1"] == pytest.approx(7.5)
    assert on8["tpot_p50_vs_1"] == pytest.approx(26 / 24, abs=1e-3)
    assert on8["tokens_per_s_vs_off"] == pytest.approx(300 / 41, abs=1e-3)
    off8 = next(r for r in rows if r["batching"] == OFF and r["concurrency"] == 8)
    assert off8["tokens_per_s_vs_1"] == pytest.approx(41 / 40, abs=1e-3)


def test_greedy_agreement_compares_each_prompt_with_its_one_at_a_time_text() -> None:
    off = LevelRun("int8-woq", OFF, 1, calls=[(0, call(0, 0, 0, 1, "abcd")), (1, call(0, 0, 0, 1, "wxyz"))])
    alone = LevelRun("int8-woq", ON, 1, calls=[(0, call(0, 0, 0, 1, "abcd")), (1, call(0, 0, 0, 1, "wxyz"))])
    batched = LevelRun(
        "int8-woq", ON, 2, calls=[(0, call(0, 0, 0, 1, "abcd")), (1, call(0, 0, 0, 1, "wxQQ"))]
    )
    agreement = greedy_agreement([alone, batched], [off])
    assert agreement["reference_consistent"]
    assert (agreement["compared"], agreement["identical"]) == (4, 3)
    assert agreement["share"] == pytest.approx(0.75)
    assert agreement["by_concurrency"]["2"]["share"] == pytest.approx(0.5)
    # "wxQQ" keeps half of "wxyz": the mean common prefix is (1 + 0.5) / 2 at 2 streams.
    assert agreement["by_concurrency"]["2"]["prefix_share"] == pytest.approx(0.75)
    assert agreement["by_concurrency"]["1"]["share"] == pytest.approx(1.0)
    # One-at-a-time runs that disagree among themselves are flagged (the reference moves).
    off_again = LevelRun("int8-woq", OFF, 2, calls=[(0, call(0, 0, 0, 1, "abXX"))])
    assert not greedy_agreement([alone], [off, off_again])["reference_consistent"]


def test_a_weight_only_tier_on_tierserves_kernels_says_what_still_grows() -> None:
    kernel = "native: layers tierserve int8_woq_linear (VDPBF16PS) int8 per-channel symmetric; lm_head ..."
    note = scaling_note("int8-woq", 2.6, TierWorkers(kernel=kernel, batching_enabled=True))
    assert note is not None and "2.60x" in note and "read once" in note and "What would lift it" in note
    assert scaling_note("int8-woq", 3.2, TierWorkers(kernel=kernel, batching_enabled=True)) is None
    int4 = "native: layers tierserve int4_woq_linear (VDPBF16PS) int4 group 32 asymmetric; lm_head ..."
    note = scaling_note("int4-woq", 2.4, TierWorkers(kernel=int4, batching_enabled=True))
    assert note is not None and "2.40x" in note and "four rows in registers" in note


def test_a_weight_only_tier_below_3x_says_why_from_its_kernel() -> None:
    native = TierWorkers(kernel=NATIVE_INT4, batching_enabled=True)
    note = scaling_note("int4-woq", 2.1, native)
    assert note is not None
    assert "2.10x" in note and "aten._weight_int4pack_mm_for_cpu" in note
    assert "4 rows" in note and "twice" in note and "What would lift it" in note
    reference = TierWorkers(
        kernel="ipex WOQ INT8 ...; reference kernels: every weight dequantized", batching_enabled=True
    )
    assert "reference weight-only kernels" in (scaling_note("int8-woq", 1.5, reference) or "")
    assert scaling_note("int4-woq", 3.4, native) is None  # scales well enough
    assert scaling_note("bf16", 1.2, native) is None  # not weight-only
    assert scaling_note("int4-woq", None, native) is None  # 8 streams not measured


def _runs(tier: str) -> dict[str, list[LevelRun]]:
    return {mode: [LevelRun(tier, mode, 1, calls=[(0, call(0, 0, 0, 1, "same"))])] for mode in (ON, OFF)}


def test_tier_summary_and_targets() -> None:
    rows = rows_for(
        "bf16",
        {(ON, 1): (40.0, 24.0), (ON, 8): (280.0, 34.0), (ON, 16): (400.0, 40.0), (OFF, 1): (40.0, 24.0)},
    )
    rows += rows_for("int4-woq", {(ON, 1): (50.0, 20.0), (ON, 8): (100.0, 80.0)})
    workers = {
        "bf16": {ON: TierWorkers("ipex bf16", True, max_batch=16), OFF: TierWorkers("ipex bf16", False)},
        "int4-woq": {ON: TierWorkers(NATIVE_INT4, True), OFF: TierWorkers(NATIVE_INT4, False)},
    }
    summaries = [tier_summary(t, rows, _runs(t), workers[t]) for t in ("bf16", "int4-woq")]
    bf16, int4 = summaries
    assert bf16["ratio_8_vs_1"] == pytest.approx(7.0) and bf16["ratio_16_vs_1"] == pytest.approx(10.0)
    assert bf16["scaling"][OFF] == {"1": 1.0}
    assert bf16["notes"] == [] and bf16["agreement"]["share"] == 1.0
    assert int4["ratio_8_vs_1"] == pytest.approx(2.0) and "4 rows" in int4["notes"][0]
    targets = {t["rule"]: t for t in check_targets(summaries)}
    assert len(targets) == 3  # int8-sq not measured: its target is left out
    assert targets["tokens_per_s at 8 streams >= 6x one stream (batching on)"]["met"] is True
    assert targets["tpot_p50_ms at 8 streams <= 1.35x one stream (batching on)"]["met"] is False
    assert targets["tokens_per_s at 16 streams >= 9x one stream (batching on)"]["met"] is True


def test_a_worker_that_fell_back_to_one_at_a_time_is_named() -> None:
    rows = rows_for("int8-sq", {(ON, 1): (40.0, 24.0), (ON, 8): (41.0, 190.0)})
    fallback = TierWorkers("k", False, notices=("continuous batching unavailable: text differs",))
    summary = tier_summary("int8-sq", rows, _runs("int8-sq"), {ON: fallback, OFF: TierWorkers("k", False)})
    assert any("one request at a time" in n and "text differs" in n for n in summary["notes"])
    assert check_targets([summary])[0]["met"] is False


def _meta() -> dict[str, Any]:
    return {
        "requests_rule": "8 requests per level", "prompt_words": [16, 160], "new_tokens": 128,
        "layout": "one per tier", "notes": ["a run note"],
    }  # fmt: skip


def test_markdown_report_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = LevelRun("int4-woq", ON, 8, calls=[(0, call(0.0, 0.1, 0.01, 5, "x"))], samples=[sample()])
    rows = [level_row(run)]
    add_ratios(rows)
    workers = {
        ON: TierWorkers(NATIVE_INT4, True, max_batch=16, kv_tokens_budget=32768),
        OFF: TierWorkers("", False),
    }
    summaries = [tier_summary("int4-woq", rows, {ON: [run], OFF: []}, workers)]
    text = report.render_markdown(rows, summaries, check_targets(summaries), _meta())
    assert "| int4-woq | on | 8 |" in text and "yes (max 16, KV 32768 tokens)" in text
    assert "- a run note" in text and "n/a" in text  # no one-stream level: no ratio
    md, png = report.output_paths(tmp_path / "t.json")
    assert (md.name, png.name) == ("t.md", "t.png")
    monkeypatch.setattr(report, "import_pyplot", lambda: None)
    assert "matplotlib is not installed" in report.write_plot(rows, png, "title")
    assert not png.exists()


def test_plot_is_written_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = rows_for("bf16", {(ON, 1): (40.0, 24.0), (ON, 8): (300.0, 26.0), (OFF, 1): (40.0, 24.0)})
    png = tmp_path / "t.png"
    assert report.write_plot(rows, png, "title") == f"wrote {png}"
    assert png.read_bytes().startswith(b"\x89PNG")


def test_arguments_and_pool_config() -> None:
    assert parse_concurrency("16,1, 4,4") == [1, 4, 16]
    for bad in ("", "0,2", "a", "1,1000"):
        with pytest.raises(ConfigError, match="--concurrency"):
            parse_concurrency(bad)
    assert [requests_at(s, 0) for s in (1, 4, 16)] == [8, 8, 32] and requests_at(16, 20) == 20
    assert chosen_tiers(None, None, [0, 1]) == ["fp32", "bf16"]  # the default pool's tiers
    with pytest.raises(ConfigError, match="int9"):
        chosen_tiers(None, "bf16,int9", [0, 1])
    on = throughput_pool_config(None, ["bf16", "int8-woq"], [0, 1], 128, 16, batching=True)
    off = throughput_pool_config(None, ["bf16", "int8-woq"], [0, 1], 128, 16, batching=False)
    assert on.batching.enabled and not off.batching.enabled
    assert [(w.tier, w.cores, w.port) for w in off.workers] == [("bf16", [0, 1], 0), ("int8-woq", [0, 1], 0)]
    # Sixteen streams on one worker fit the router's queue even one at a time.
    assert off.router.max_queue_per_worker >= 16 and off.router.port == 0
    prompts = make_prompts([f"w{i}" for i in range(2000)])
    assert len({len(p.split()) for p in prompts}) == len(prompts) == 8
    assert len(set(prompts)) == 8
    args = build_parser().parse_args(["bench", "throughput", "--out", "x.json"])
    assert (args.concurrency, args.new_tokens, args.requests_per_level) == ("1,2,4,8,16", 128, 0)


class _Stub:
    """Generate as a router stub would stream it, counting the calls open at once."""

    def __init__(self) -> None:
        self.open = 0
        self.most_open = 0

    def Generate(
        self,
        request: generate_pb2.GenerateRequest,
        timeout: float | None = None,
        metadata: object = None,
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        return self._stream(request)

    async def _stream(
        self, request: generate_pb2.GenerateRequest
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            for index in range(3):
                await asyncio.sleep(0.002)
                yield generate_pb2.GenerateResponse(token=generate_pb2.Token(text="x", index=index))
            summary = generate_pb2.Summary(generated_tokens=3, budget_met=True, text=request.prompt)
            yield generate_pb2.GenerateResponse(summary=summary)
        finally:
            self.open -= 1


def test_closed_loop_keeps_that_many_streams_busy_and_sends_every_request_once() -> None:
    stub = _Stub()
    requests = [generate_pb2.GenerateRequest(prompt=f"p{i}") for i in range(10)]
    done: list[int] = []
    results = asyncio.run(
        closed_loop(cast(router_pb2_grpc.RouterStub, stub), requests, 3, 10.0, lambda: done.append(1))
    )
    assert [index for index, _ in results] == list(range(10)) and len(done) == 10
    assert [r.text for _, r in results] == [f"p{i}" for i in range(10)]
    assert all(r.status == "OK" and len(r.token_times_s) == 3 for _, r in results)
    assert stub.most_open == 3
