"""`tierserve bench soak`'s judgement: growth after warm-up against the stated bounds, how requests ended,
and a process that disappears."""

from __future__ import annotations

import random
import subprocess
import sys

from tierserve.benchmarks.soak import (
    BOUNDS,
    MIB,
    LoadTally,
    ProcessSeries,
    Sample,
    admitted,
    request_maker,
    warmup_s,
)
from tierserve.benchmarks.streamcall import CallResult
from tierserve.domain.config import parse_config


def series(*points: tuple[float, float, int]) -> ProcessSeries:
    """A process's samples from (seconds, MiB, descriptors)."""
    return ProcessSeries("worker a", 1, [Sample(at, int(mib * MIB), fds) for at, mib, fds in points])


def test_growth_is_the_last_sample_against_the_first_after_warm_up() -> None:
    # Warm-up growth (300 -> 400 MiB, 20 -> 60 fds) and a transient peak do not count.
    report = series((0, 300, 20), (10, 400, 60), (20, 470, 70), (30, 430, 62)).report(warmup_s=10)
    assert report["first_after_warmup"] == {"at_s": 10, "rss_mib": 400.0, "fds": 60}
    assert report["max"] == {"rss_mib": 470.0, "fds": 70}
    assert report["growth"] == {"rss_mib": 30.0, "fds": 2}
    assert report["within_bounds"] and report["problems"] == []


def test_growth_past_either_bound_is_named() -> None:
    bound_mib = BOUNDS.rss_growth_bytes / MIB
    report = series((10, 400, 60), (30, 400 + bound_mib + 1, 60 + BOUNDS.fd_growth + 1)).report(warmup_s=10)
    assert not report["within_bounds"]
    assert [p.split(" grew")[0] for p in report["problems"]] == ["resident memory", "open descriptors"]


def test_a_process_that_is_gone_fails_and_so_does_one_never_sampled_after_warm_up() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = ProcessSeries("worker b", child.pid)
    gone.sample(12.0)
    assert gone.samples == [] and gone.died_at_s == 12.0
    assert gone.report(warmup_s=10)["problems"] == ["gone at 12 s", "no sample after warm-up"]


def result(status: str, seconds: float = 0.01, hint: int | None = 50) -> CallResult:
    return CallResult(sent_s=0.0, done_s=seconds, status=status, retry_after_ms=hint, budget_met=True)


def test_requests_must_complete_or_be_refused_promptly_with_a_hint() -> None:
    tally = LoadTally(sent=4)
    for outcome in (result("OK"), result("RESOURCE_EXHAUSTED"), result("RESOURCE_EXHAUSTED", hint=80)):
        tally.record(outcome)
    assert tally.problems() == ["1 requests never ended"]
    tally.record(result("RESOURCE_EXHAUSTED", seconds=2.0, hint=None))
    no_hint, slow = tally.problems()
    assert no_hint == "1 refusals carried no retry-after-ms hint"
    assert slow.startswith("refusals took 1.9") and slow.endswith("s at p99 (bound 1)")
    tally.sent += 1
    tally.record(result("UNAVAILABLE"))
    assert "requests ended otherwise than completed or refused: {'UNAVAILABLE': 1}" in tally.problems()
    figures = tally.to_json()
    assert (
        figures["completed"] == 1
        and figures["refused"] == 3
        and figures["retry_hint_ms"] == {"min": 50, "max": 80}
    )


def test_a_load_that_is_never_refused_was_not_above_capacity() -> None:
    tally = LoadTally(sent=1)
    tally.record(result("OK"))
    assert tally.problems() == ["nothing was refused: the load never went above the pool's capacity"]


def test_room_warm_up_and_requests() -> None:
    config = parse_config(
        {
            "router": {"max_queue_per_worker": 2},
            "placement": {"allow_shared_cores": True},
            "workers": [
                {"name": "a", "tier": "fp32", "cores": [0]},
                {"name": "b", "tier": "bf16", "cores": [0]},
            ],
        }
    )
    assert admitted(config) == 6
    assert warmup_s(60) == 10 and warmup_s(600) == 60
    make = request_maker(["one", "two"], 16, random.Random(1))
    requests = [make() for _ in range(50)]
    assert {r.prompt for r in requests} == {"one", "two"}
    assert all(8 <= r.max_new_tokens <= 16 for r in requests)
