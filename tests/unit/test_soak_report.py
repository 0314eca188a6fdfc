"""`tierserve bench soak`'s judgement: growth after warm-up against the stated bounds, how requests ended,
a process that disappears; its varied request mix, its tokens and callers without one; its markdown."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from tierserve.benchmarks.soak import (
    BOUNDS,
    MIB,
    LoadTally,
    ProcessSeries,
    Sample,
    admitted,
    warmup_s,
)
from tierserve.benchmarks.soak_mix import (
    CAPPED_STREAMS,
    MAX_PROMPT_WORDS,
    ProbeTally,
    RequestMix,
    SoakTokens,
)
from tierserve.benchmarks.soak_report import soak_markdown
from tierserve.benchmarks.streamcall import CallResult
from tierserve.domain.config import parse_config
from tierserve.router.auth import bearer_token, load_tokens


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
    # Refused only by a client's own limit (its token's): the pool itself was never full.
    capped = result("RESOURCE_EXHAUSTED")
    capped.error = "client soak-capped already has 2 Generate streams open, its limit; retry when one ends"
    tally.sent += 1
    tally.record(capped)
    assert tally.problems() == [
        "only clients' own limits refused requests: the load never went above the pool's capacity"
    ]
    full = result("RESOURCE_EXHAUSTED")
    full.error = "every eligible worker's queue is full (a, b); retry later"
    tally.sent += 1
    tally.record(full)
    assert tally.problems() == [] and tally.to_json()["refused_for_client_limit"] == 1


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
    # Each worker's batch (16 by default) plus its queue of 2.
    assert admitted(config) == 2 * (16 + 2)
    small = config.model_copy(update={"batching": config.batching.model_copy(update={"max_batch": 2})})
    assert admitted(small) == 2 * (2 + 2)
    unbatched = config.model_copy(update={"batching": config.batching.model_copy(update={"enabled": False})})
    assert admitted(unbatched) == 2 * (1 + 2)
    assert warmup_s(60) == 10 and warmup_s(600) == 60


def test_a_worker_that_served_nothing_is_named() -> None:
    tally = LoadTally(sent=2)
    served = CallResult(sent_s=0.0, done_s=0.1, budget_met=True, worker_id="a")
    tally.record(served)
    tally.record(result("RESOURCE_EXHAUSTED"))
    assert tally.to_json()["served_by"] == {"a": 1}
    assert tally.idle_workers(["a", "b"]) == ["worker b served no request"]


def test_the_mix_varies_prompts_lengths_kinds_and_stays_within_its_bounds() -> None:
    words = [f"w{i}" for i in range(500)]
    mix = RequestMix(words, 16, random.Random(1))
    requests = [mix() for _ in range(400)]
    assert all(1 <= r.max_new_tokens <= 16 for r in requests)
    assert all(bool(r.prompt) != bool(r.messages) for r in requests)
    texts = [r.prompt or r.messages[-1].content for r in requests]
    assert all(1 <= len(t.split()) <= MAX_PROMPT_WORDS for t in texts)
    assert len(set(texts)) > 350 and len({len(t.split()) for t in texts}) > 40
    chat = [r for r in requests if r.messages]
    assert chat and all([m.role for m in r.messages] == ["system", "user"] for r in chat)
    sampled = [r for r in requests if r.temperature > 0]
    assert sampled and all(r.seed and 0 < r.top_p <= 1 for r in sampled)
    assert any(r.stop for r in requests)
    figures = mix.to_json()
    assert figures["primed"] == 0
    assert set(figures["kinds"]) == {"prompt", "chat", "sampled", "stop strings"}
    assert sum(figures["kinds"][k] for k in ("prompt", "chat")) == 400
    assert figures["prompt_words"]["max"] <= MAX_PROMPT_WORDS


def test_the_first_requests_of_a_primed_mix_are_of_the_largest_shape() -> None:
    mix = RequestMix([f"w{i}" for i in range(100)], 8, random.Random(2), primed=3)
    first, then = [mix() for _ in range(3)], [mix() for _ in range(50)]
    assert all(r.max_new_tokens == 8 for r in first)
    assert all(len((r.prompt or r.messages[-1].content).split()) == MAX_PROMPT_WORDS for r in first)
    assert any(r.max_new_tokens < 8 for r in then) and mix.to_json()["primed"] == 3


def test_soak_tokens_are_a_tokens_file_the_router_reads_and_each_client_carries_one(tmp_path: Path) -> None:
    tokens = SoakTokens.write(tmp_path)
    assert tokens.path.stat().st_mode & 0o777 == 0o600
    loaded = load_tokens(tokens.path, default_limit=0)
    assert {(e.name, e.max_concurrent) for e in loaded.values()} == {
        ("soak-a", 0),
        ("soak-b", 0),
        ("soak-capped", CAPPED_STREAMS),
    }
    names = [tokens.for_client(i)[0] for i in range(7)]
    assert names[:3] == ["soak-a", "soak-b", "soak-capped"] and names[3] == "soak-a"
    (key, value), *_ = tokens.for_client(2)[1]
    assert key == "authorization" and bearer_token([(key, value)]) == tokens.tokens[2][0]
    assert tokens.to_json(7)["soak-capped"] == {"clients": 2, "max_streams": CAPPED_STREAMS}


def test_calls_without_a_valid_token_must_each_be_refused_as_such() -> None:
    probes = ProbeTally()
    assert probes.problems() == ["no call with no token was made", "no call with unknown token was made"]
    probes.codes["no token"]["UNAUTHENTICATED"] += 3
    probes.codes["unknown token"]["PERMISSION_DENIED"] += 2
    assert probes.problems() == [] and probes.sent == 5
    probes.codes["unknown token"]["OK"] += 1
    assert probes.problems() == ["calls with unknown token must end PERMISSION_DENIED, got {'OK': 1}"]


def test_the_markdown_report_shows_before_and_after_and_the_bound_checked() -> None:
    router = series((0, 100, 30), (10, 120, 40), (30, 125, 41))
    router.before_load = Sample(0, 90 * MIB, 20)
    router.after_load = Sample(31, 126 * MIB, 38)
    process = router.report(warmup_s=10)
    tally = LoadTally(sent=2)
    tally.record(result("OK"))
    tally.record(result("RESOURCE_EXHAUSTED"))
    probes = ProbeTally()
    probes.codes["no token"]["UNAUTHENTICATED"] += 1
    report = {
        "config": {
            "duration_s": 60,
            "warmup_s": 10,
            "clients": 16,
            "admitted": 6,
            "tokens": {"soak-a": {"clients": 16, "max_streams": None}},
        },
        "bounds": {"rss_growth_mib": 64, "fd_growth": 16, "refusal_p99_ms": 1000},
        "processes": [process],
        "requests": tally.to_json(),
        "mix": RequestMix(["a"], 4, random.Random(0)).to_json(),
        "without_valid_token": probes.to_json(),
        "recovery": {"status": "OK", "ms": 120.0},
        "verdict": {"passed": True, "problems": []},
    }
    markdown = soak_markdown(report)
    bound_mib = BOUNDS.rss_growth_bytes / MIB
    row = (
        f"| worker a | 1 | 90 / 120 / 125 / 125 / 126 | +5.0 (<= {bound_mib:.0f}) | 20 / 40 / 41 / 41 / 38 |"
    )
    assert row in markdown, markdown
    assert "| +1 (<= 16) | ok |" in markdown
    assert "tokens on: soak-a (16 clients, no limit of its own)" in markdown
    assert "calls without a valid token: no token: {'UNAUTHENTICATED': 1}" in markdown
    assert "verdict: PASS" in markdown


def test_a_warm_up_as_long_as_the_run_is_refused_before_any_pool_starts(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tierserve.cli", "bench", "soak", "--out", str(tmp_path / "soak.json")]
    result = subprocess.run(
        [*command, "--duration-s", "30", "--warmup-s", "30", "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the warm-up (30 s) must be shorter than the run (30 s)" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "soak.json").exists()
