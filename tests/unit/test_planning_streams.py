"""`tierserve plan` with batching workers: streams per worker from TPOT by concurrency (a
`bench throughput` file or the live router), never past max_batch or the highest measured
concurrency, one stream without figures, and never more workers than the one-stream plan.

Every concurrency table here is ILLUSTRATIVE (made up for the arithmetic), not a measurement."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tierserve_client.v1 import generate_pb2, router_pb2, worker_pb2

from tests.unit.fake_pool import FakeWorker, running_pool
from tests.unit.test_batch_display import BatchingWorker
from tierserve.benchmarks.streamcall import CallResult
from tierserve.benchmarks.throughput.figures import (
    OFF,
    ON,
    LevelRun,
    TierWorkers,
    add_ratios,
    check_targets,
    level_row,
    tier_summary,
)
from tierserve.cli import main
from tierserve.ops.capacity import (
    Requirements,
    TierFigures,
    figures_from_workers,
    make_plan,
    token_budget,
)
from tierserve.ops.capacity_bench import figures_from_file, figures_from_files
from tierserve.ops.capacity_streams import Level, figures_at, stream_cap

# The seed article's example: 300 sessions/h, 5 requests of 100 tokens, 10 s overhead, 30 s think
# time, 180 s sessions.
SEED = Requirements(
    sessions_per_hour=300,
    requests_per_session=5,
    tokens_per_request=100,
    session_overhead_s=10,
    think_time_s=30,
    session_length_s=180,
)
SEED_ARGS = [
    "--sessions-per-hour", "300", "--requests-per-session", "5", "--tokens-per-request", "100",
    "--overhead-s", "10", "--think-time-s", "30", "--session-length-s", "180",
]  # fmt: skip

# ILLUSTRATIVE: streams -> (TPOT p50 ms, TTFT p50 ms), shaped like a batching worker's (TPOT grows
# slowly with the streams decoding together).
ILLUSTRATIVE = {1: (24.0, 300.0), 2: (25.0, 320.0), 4: (27.0, 350.0), 8: (32.0, 400.0), 16: (48.0, 700.0)}


def illustrative(max_batch: int | None = 16, batching: bool | None = True) -> TierFigures:
    levels = tuple(Level(s, tpot, ttft) for s, (tpot, ttft) in ILLUSTRATIVE.items())
    return TierFigures("bf16", 24.0, 300.0, 0.0, "illustrative", levels, max_batch, batching)


def test_the_seed_examples_budget_is_40_ms_per_token() -> None:
    budget = token_budget(SEED)
    # (180 - 10 - 5 x 30) / (5 x 100) = 20 s / 500 tokens
    assert budget.feasible and budget.per_token_s == pytest.approx(0.040)
    assert "40.00 ms" in budget.reason


def test_figures_between_measured_concurrencies_are_interpolated_and_never_extrapolated() -> None:
    levels = [Level(2, 20.0, 100.0), Level(8, 32.0, None)]
    eight = figures_at(levels, 8)
    assert eight is not None and (eight.tpot_ms, eight.basis) == (32.0, "measured at 8 streams")
    five = figures_at(levels, 5)
    assert five is not None and five.tpot_ms == pytest.approx(26.0) and "between 2 and 8" in five.basis
    assert five.ttft_ms is None  # no TTFT at 8: none interpolated
    one = figures_at(levels, 1)
    assert one is not None and one.tpot_ms == 20.0 and "at most" in one.basis
    assert figures_at(levels, 9) is None
    assert stream_cap(levels, None) == 8 and stream_cap(levels, 4) == 4 and stream_cap(levels, 64) == 8
    assert stream_cap([], 16) == 0


def test_the_seed_example_one_stream_against_streams_per_worker() -> None:
    plan = make_plan(SEED, [illustrative()])
    (tier,) = plan.tiers
    # At c streams a request takes TTFT(c) + 100 x TPOT(c): 8 streams 0.4 + 3.2 = 3.6 s (36 ms a
    # token); 9 (interpolated) 0.4375 + 3.4 = 3.8375 s (38.4 ms); 10: 40.75 ms, past the budget.
    assert tier.streams_per_worker == 9 and tier.meets_budget
    assert tier.tpot_at_streams_ms == pytest.approx(34.0) and tier.ttft_at_streams_ms == pytest.approx(437.5)
    assert "interpolated between 8 and 16" in tier.streams_basis and "10 exceed" in tier.streams_basis
    assert tier.effective_ms_per_token == pytest.approx(38.375)
    # One stream: 300 x 5 x 2.7 s / 3600 = 1.125 Erlangs -> ceil(1.125 / 0.7) = 2 workers; at 9
    # streams: 300 x 5 x 3.8375 / 3600 = 1.599 Erlangs -> ceil(1.599 / (9 x 0.7)) = 1.
    assert tier.one_stream_workers == 2 and tier.workers == 1
    assert tier.load_erlangs == pytest.approx(300 * 5 * 3.8375 / 3600)
    # Ten times the sessions: 17 workers at one stream each, 3 at 9 streams each.
    busy = make_plan(Requirements(**{**SEED.__dict__, "sessions_per_hour": 3000}), [illustrative()])
    assert (busy.tiers[0].one_stream_workers, busy.tiers[0].workers) == (17, 3)


def test_streams_never_pass_max_batch_or_the_highest_measured_concurrency() -> None:
    capped = make_plan(SEED, [illustrative(max_batch=4)]).tiers[0]
    assert capped.streams_per_worker == 4 and "4 = max_batch" in capped.streams_basis
    loose = Requirements(**{**SEED.__dict__, "think_time_s": 0})  # 340 ms a token: every level meets
    top = make_plan(loose, [illustrative(max_batch=64)]).tiers[0]
    assert top.streams_per_worker == 16 and "16 = highest measured" in top.streams_basis


@pytest.mark.parametrize(
    "figures, reason",
    [
        (TierFigures("fp32", 24.0, 300.0, 0.0, "bench tiers"), "no TPOT by concurrency"),
        (illustrative(batching=False), "batching off"),
        (illustrative(max_batch=1), "max_batch is 1"),
        (TierFigures("bf16", 24.0, 300.0, levels=(Level(1, 24.0),)), "measured at one stream only"),
        (TierFigures("bf16", 41.0, 300.0, levels=(Level(2, 42.0),)), "alone does not meet"),
    ],
)
def test_without_usable_concurrency_figures_a_worker_serves_one_stream(
    figures: TierFigures, reason: str
) -> None:
    plan = make_plan(SEED, [figures])
    (tier,) = plan.tiers
    assert tier.streams_per_worker == 1 and tier.workers == tier.one_stream_workers
    assert tier.tpot_at_streams_ms == figures.tpot_ms and reason in tier.streams_basis
    assert any("one stream per worker" in note and figures.tier in note for note in plan.notes)


def test_batching_that_loses_throughput_keeps_the_smaller_batch() -> None:
    # ILLUSTRATIVE: 2 streams each nearly twice as slow: both fit the budget, but 2 streams serve
    # fewer tokens per second than 1.
    slow = TierFigures("int4-woq", 10.0, 0.0, levels=(Level(2, 39.0, 0.0),), max_batch=8, batching=True)
    tier = make_plan(Requirements(**{**SEED.__dict__, "sessions_per_hour": 3000}), [slow]).tiers[0]
    assert tier.streams_per_worker == 1 and "need more workers" in tier.streams_basis
    # One stream: 3000 x 5 x 1.0 s / 3600 = 4.17 Erlangs -> 6 workers; two: 16.25 / (2 x 0.7) -> 12.
    assert tier.workers == tier.one_stream_workers == 6


tpot_ms = st.floats(min_value=1.0, max_value=200.0)


@st.composite
def tables(draw: st.DrawFn) -> TierFigures:
    """Random measured concurrencies (a subset of bench throughput's), random (noisy, not always
    monotone) TPOT and TTFT, random max_batch and batching state."""
    streams = draw(st.lists(st.sampled_from([1, 2, 4, 8, 16]), min_size=0, max_size=5, unique=True))
    levels = tuple(
        Level(s, draw(tpot_ms), draw(st.one_of(st.none(), st.floats(0, 2000)))) for s in sorted(streams)
    )
    return TierFigures(
        "bf16",
        draw(tpot_ms),
        draw(st.floats(0, 2000)),
        levels=levels,
        max_batch=draw(st.one_of(st.none(), st.integers(1, 32))),
        batching=draw(st.sampled_from([True, False, None])),
    )


@given(figures=tables(), sessions=st.floats(1, 1e5), think=st.floats(0, 33))
def test_streams_are_within_limits_meet_the_budget_and_never_cost_workers(
    figures: TierFigures, sessions: float, think: float
) -> None:
    req = Requirements(**{**SEED.__dict__, "sessions_per_hour": sessions, "think_time_s": think})
    tier = make_plan(req, [figures]).tiers[0]
    highest = max((level.streams for level in figures.levels), default=1)
    assert 1 <= tier.streams_per_worker <= max(highest, 1)
    assert tier.streams_per_worker <= (figures.max_batch or highest)
    if figures.batching is False:
        assert tier.streams_per_worker == 1
    assert tier.workers <= tier.one_stream_workers
    if tier.streams_per_worker > 1:
        assert tier.effective_ms_per_token <= token_budget(req).per_token_s * 1e3
        # Each stream count up to the chosen one meets the budget as well.
        for streams in range(2, tier.streams_per_worker + 1):
            point = figures_at(figures.levels, streams)
            assert point is not None
            ttft = figures.ttft_ms if point.ttft_ms is None else point.ttft_ms
            assert ttft / 100 + point.tpot_ms <= token_budget(req).per_token_s * 1e3 + 1e-9


@given(
    base=st.floats(5.0, 30.0),
    growth=st.lists(st.floats(0.0, 3.0), min_size=4, max_size=4),
    max_batch=st.integers(1, 32),
)
def test_with_tpot_growing_slower_than_streams_the_largest_stream_count_in_budget_is_taken(
    base: float, growth: list[float], max_batch: int
) -> None:
    tpots = [base]
    for step in growth:
        tpots.append(tpots[-1] + step)  # aggregate tokens/s rise with every doubling
    levels = tuple(Level(s, t, 0.0) for s, t in zip((1, 2, 4, 8, 16), tpots, strict=True))
    figures = TierFigures("bf16", base, 0.0, levels=levels, max_batch=max_batch, batching=True)
    tier = make_plan(SEED, [figures]).tiers[0]
    cap = min(max_batch, 16)
    within = [s for s in range(1, cap + 1) if (p := figures_at(levels, s)) is not None and p.tpot_ms <= 40.0]
    expected = max(within) if base <= 40.0 else 1
    assert tier.streams_per_worker == expected


# --- a `bench throughput` file, written as the benchmark writes it ------------------------------------


def _calls(ttft_ms: float, tpot_ms: float, streams: int) -> list[tuple[int, CallResult]]:
    times = [ttft_ms / 1e3 + i * tpot_ms / 1e3 for i in range(5)]
    return [
        (i, CallResult(sent_s=0.0, token_times_s=times, done_s=times[-1], text="t")) for i in range(streams)
    ]


def throughput_document(table: dict[int, tuple[float, float]], max_batch: int = 16) -> dict[str, Any]:
    """The object `bench throughput --out` writes (tierserve/benchmarks/throughput/run.py: meta,
    results, tiers, targets), from the benchmark's own figures functions."""
    runs = {
        ON: [LevelRun("bf16", ON, s, calls=_calls(ttft, tpot, s)) for s, (tpot, ttft) in table.items()],
        OFF: [LevelRun("bf16", OFF, 1, calls=_calls(table[1][1], table[1][0], 1))],
    }
    rows = [level_row(run) for mode in (ON, OFF) for run in runs[mode]]
    add_ratios(rows)
    workers = {ON: TierWorkers("ipex bf16", True, max_batch=max_batch), OFF: TierWorkers("ipex bf16", False)}
    summaries = [tier_summary("bf16", rows, runs, workers)]
    meta = {"tiers": ["bf16"], "concurrency": sorted(table), "new_tokens": 5, "notes": []}
    return {"meta": meta, "results": rows, "tiers": summaries, "targets": check_targets(summaries)}


def test_a_bench_throughput_file_gives_tpot_and_ttft_by_concurrency(tmp_path: Path) -> None:
    file = tmp_path / "throughput.json"
    file.write_text(json.dumps(throughput_document(ILLUSTRATIVE, max_batch=8)))
    (figures,), notes = figures_from_file(file)
    assert figures.tier == "bf16" and figures.max_batch == 8 and figures.batching is True
    assert (figures.tpot_ms, figures.ttft_ms) == pytest.approx((24.0, 300.0))
    assert [lv.streams for lv in figures.levels] == list(ILLUSTRATIVE)
    assert [(lv.tpot_ms, lv.ttft_ms) for lv in figures.levels] == [
        pytest.approx(expected) for expected in ILLUSTRATIVE.values()
    ]
    assert any("bench throughput" in note for note in notes)


def test_plan_from_a_throughput_file_shows_streams_per_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "throughput.json"
    file.write_text(json.dumps(throughput_document(ILLUSTRATIVE)))
    assert main(["plan", "--from-bench", str(file), "--json", *SEED_ARGS]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget_per_token_ms"] == pytest.approx(40.0)
    (tier,) = plan["tiers"]
    assert tier["streams_per_worker"] == 9 and tier["tpot_at_streams_ms"] == pytest.approx(34.0)
    assert (tier["workers"], tier["one_stream_workers"]) == (1, 2)
    assert "streams per worker" in plan["formulas"]["streams"]
    assert any(str(file) in note and "bench throughput" in note for note in plan["notes"])
    # The table: the streams column and its TPOT.
    assert main(["plan", "--from-bench", str(file), *SEED_ARGS]) == 0
    text = capsys.readouterr().out
    assert "streams/worker c" in text and "34.00" in text and "workers at 1" in text
    assert "bf16: 9 stream(s) per worker: interpolated between 8 and 16 streams" in text


def test_a_tiers_file_and_a_throughput_file_combine(tmp_path: Path) -> None:
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps([{"tier": "bf16", "tpot_ms": 23.0, "ttft_ms": 250.0, "ppl_delta_pct": 0.1}]))
    throughput = tmp_path / "throughput.json"
    throughput.write_text(json.dumps(throughput_document(ILLUSTRATIVE)))
    (figures,), notes = figures_from_files([tiers, throughput])
    # The accuracy card from bench tiers, the slower one-stream figures, the levels from throughput.
    assert figures.ppl_delta_pct == 0.1 and figures.tpot_ms == pytest.approx(24.0)
    assert len(figures.levels) == 5 and figures.max_batch == 16
    assert str(tiers) in figures.source and str(throughput) in figures.source
    plan = make_plan(Requirements(**{**SEED.__dict__, "max_quality_loss_pct": 0.5}), [figures])
    assert plan.recommended() is plan.tiers[0] and plan.tiers[0].streams_per_worker == 9
    assert any("combined" in note for note in notes)


def _bad(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """The document with one value replaced (path: dotted keys and list indexes) or deleted (None)."""
    copy: dict[str, Any] = json.loads(json.dumps(document))
    *parents, last = path.split(".")
    target: Any = copy
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    if value is None:
        del target[int(last) if last.isdigit() else last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return copy


@pytest.mark.parametrize(
    "change, message",
    [
        (("results.0.tier", None), "no tier"),
        (("results.2.concurrency", "four"), "concurrency must be a whole number"),
        (("results.1.batching", "maybe"), "batching must be 'on' or 'off'"),
        (("results.3.tpot_p50_ms", "fast"), "tpot_p50_ms must be a number"),
        (("results.3.tpot_p50_ms", -1), "must not be negative"),
        (("meta.tiers", ["bf16", "int8-sq"]), "tier int8-sq is listed but has no rows"),
        (("tiers.0.max_batch", "lots"), "max_batch must be a whole number"),
        (("results", {"bf16": 1}), "expected a 'results' list"),
    ],
)
def test_a_malformed_throughput_file_is_refused_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, Any], message: str
) -> None:
    file = tmp_path / "throughput.json"
    file.write_text(json.dumps(_bad(throughput_document(ILLUSTRATIVE), *change)))
    assert main(["plan", "--from-bench", str(file), *SEED_ARGS]) == 2
    out = capsys.readouterr().out
    assert "error:" in out and message in out and "Traceback" not in out


def test_a_file_that_is_not_json_is_refused_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "throughput.json"
    file.write_text('{"meta": {"concurrency": [1, 2]}, "results": [')
    assert main(["plan", "--from-bench", str(file)]) == 2
    assert "not valid JSON" in capsys.readouterr().out
    file.write_text('"just a string"')
    assert main(["plan", "--from-bench", str(file)]) == 2
    assert "expected a JSON list" in capsys.readouterr().out


def test_a_tier_whose_every_level_failed_is_left_out_with_a_note(tmp_path: Path) -> None:
    document = throughput_document(ILLUSTRATIVE)
    for row in document["results"]:
        row["tpot_p50_ms"] = None
    file = tmp_path / "throughput.json"
    file.write_text(json.dumps(document))
    figures, notes = figures_from_file(file)
    assert figures == [] and any("bf16: no TPOT measured" in note for note in notes)


# --- the live router ----------------------------------------------------------------------------------


def test_live_figures_take_tpot_by_concurrency_and_the_workers_batch() -> None:
    status = router_pb2.WorkerStatus(worker_id="bf16-0")
    status.info.tier = "bf16"
    status.info.warmup_latency.CopyFrom(
        worker_pb2.LatencyStats(tpot_p50_us=24_000, ttft_p50_us=300_000, samples=4)
    )
    status.info.batch.CopyFrom(worker_pb2.BatchState(enabled=True, max_batch=8))
    for streams, tpot_us, samples in ((1, 24_000, 40), (2, 25_000, 30), (4, 27_000, 0), (8, 32_000, 12)):
        status.live.tpot_by_concurrency.add(streams=streams, tpot_us=tpot_us, samples=samples)
    other = router_pb2.WorkerStatus()
    other.CopyFrom(status)
    other.worker_id = "bf16-1"
    other.info.batch.max_batch = 4
    other.live.tpot_by_concurrency[1].tpot_us = 26_000
    (figures,), notes = figures_from_workers([status, other])
    # Levels without samples are left out; each level the slower worker's; the smaller batch.
    assert [(lv.streams, lv.tpot_ms) for lv in figures.levels] == [(1, 24.0), (2, 26.0), (8, 32.0)]
    assert figures.max_batch == 4 and figures.batching is True
    assert "bf16-0" in figures.source and "bf16-1" in figures.source
    assert any("live TPOT by concurrent streams" in note for note in notes)
    off = router_pb2.WorkerStatus()
    off.CopyFrom(status)
    off.info.batch.enabled = False
    (alone,), _ = figures_from_workers([off])
    assert alone.batching is False and make_plan(SEED, [alone]).tiers[0].streams_per_worker == 1


def test_plan_against_a_live_router_whose_worker_batches(capsys: pytest.CaptureFixture[str]) -> None:
    bf16 = BatchingWorker(
        "bf16-0", "bf16", tpot_us=20_000, batch=worker_pb2.BatchState(enabled=True, max_batch=4)
    )
    fp32 = FakeWorker("fp32-0", "fp32", cores=[1], tpot_us=30_000)  # an older worker: no batch

    async def scenario() -> dict[str, Any]:
        async with running_pool([bf16, fp32]) as pool:
            bf16.gate.clear()
            request = generate_pb2.GenerateRequest(prompt="p" * 40, max_new_tokens=6, tier="bf16")
            streams = [asyncio.create_task(_drain(pool.stub.Generate(request, timeout=10))) for _ in range(2)]
            for _ in streams:
                await bf16.arrivals.get()
            bf16.gate.set()  # both decode together: the router counts their tokens at 2 streams
            await asyncio.gather(*streams)
            code = await asyncio.to_thread(main, ["plan", "--router", pool.address, "--json", *SEED_ARGS])
            assert code == 0
            return dict(json.loads(capsys.readouterr().out))

    plan = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    tiers = {t["tier"]: t for t in plan["tiers"]}
    # 20 ms a token and 20 ms to the first at 2 streams: well within 40 ms; 2 is the highest measured.
    assert tiers["bf16"]["streams_per_worker"] == 2 and tiers["bf16"]["max_batch"] == 4
    assert "measured at 2 streams" in tiers["bf16"]["streams_basis"]
    assert tiers["fp32"]["streams_per_worker"] == 1 and "batching off" in tiers["fp32"]["streams_basis"]
    assert any("live TPOT by concurrent streams" in note for note in plan["notes"])


async def _drain(call: Any) -> int:
    return len([response async for response in call])
