"""`tierserve bench soak`: a pool held above its capacity for a while; its memory and descriptors stay flat.

    tierserve bench soak --out bench-results/soak.json [--config F] [--duration-s 600] [--clients N]

Starts a real pool (router and workers as their own processes; two workers by default, or --config's)
and drives it from more closed-loop clients than it admits. The router takes, per worker, as many
requests as the worker generates together (its batch) plus `[router] max_queue_per_worker` waiting
behind them; the other clients are refused with
RESOURCE_EXHAUSTED and a `retry-after-ms` hint, wait that hint (at most MAX_BACKOFF_S) and come back,
as the SDK does. Each client keeps one connection for the whole run. The requests vary (windows of
the evaluation text of any length up to a bound, chat messages, sampled ones, stop strings), and
bearer tokens are on (unless --no-tokens): every client carries one of the soak's tokens, one token
is capped at a few streams at once, and one more client keeps calling without a valid token, which
must be refused every time (tierserve/benchmarks/soak_mix.py). Every few seconds the resident
memory (RSS) and open file descriptors of the router and of every worker process are read (psutil),
once before the load starts too. When the load stops, one plain request must complete: the pool
recovered; then each process is read once more.

The verdict compares, per process, the last sample under load with the first after warm-up (the first
sixth of the run, at most a minute: the model touches its buffers, allocators grow their arenas, every
client connects). The bounds, and why:

- Resident memory may grow by at most 64 MiB. In a steady state the router and a worker each move by
  tens of MiB between samples (glibc arenas, buffers sized by the longest prompt so far, Python's
  heap), and 64 MiB stays clear of that. A request's model state (the default model's KV cache is
  about 46 KiB a token) or its stream kept after it ended passes 64 MiB within a few hundred of the
  thousands of requests and refusals a ten-minute soak makes. A leak of a few bytes per request
  needs a longer soak to show.
- Open file descriptors may grow by at most 16. With every client's connection open from the start,
  a steady pool holds a constant count; a socket, pipe or file leaked per request, per refusal or per
  health check passes 16 within seconds to minutes. 16 leaves room for the few connections gRPC opens
  again on its own (a health check, a worker channel reconnecting).

Requests must end well too: completed, or refused with RESOURCE_EXHAUSTED carrying a retry hint, the
refusal at once (p99 within a second: the router answers, it does not queue its refusals). Any other
status, a stream without its summary, a process that died, a call without a valid token that was not
refused as such, a worker that served no request (nothing was learnt about it), or a load that never
went above capacity (nothing refused) fails the verdict. The pool admits, per worker, its batch
(`[batching] max_batch`, or one without batching) plus its queue. Exit
status 1 on a failed verdict. The report is written as JSON (--out) and as markdown beside it (the
same name, .md): per process, RSS and descriptors before the load, after warm-up, last under load and
after it, the growth judged and its bound.

`tests/unit/test_overload.py` runs the same clients and bounds for a minute against in-process fake
workers (one process, no model); `tests/integration/test_soak.py` runs this benchmark for a minute on a
small pool of the default model.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from rich.console import Console
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

from tierserve.benchmarks.livepool import bench_pool_config, prompt_words, running_pool, usable_cpus
from tierserve.benchmarks.soak_mix import Metadata, ProbeTally, RequestMix, SoakTokens, probe_client
from tierserve.benchmarks.soak_report import print_report, soak_markdown
from tierserve.benchmarks.streamcall import CallResult, GenerateStub, timed_generate
from tierserve.domain.config import TierserveConfig, WorkerConfig, parse_config

MIB = 1024 * 1024
OVERLOAD_CODE = "RESOURCE_EXHAUSTED"
# In the message of a refusal for the caller's own limit of open streams (router/limits.py), not
# for the pool's capacity.
CLIENT_LIMIT_MARK = "open, its limit"
# Deadline of every request: an admitted request waits behind at most a queue of others.
CALL_TIMEOUT_S = 120.0
# The request sent once the load stops must complete within this.
RECOVERY_TIMEOUT_S = 60.0
# A refused client waits the router's hint, but never longer than this.
MAX_BACKOFF_S = 1.0
# Warm-up: this share of the run, at most WARMUP_MAX_S.
WARMUP_SHARE = 1 / 6
WARMUP_MAX_S = 60.0


@dataclass(frozen=True)
class Bounds:
    """What a soak may show, after warm-up, per process (see the module's docstring for why)."""

    rss_growth_bytes: int = 64 * MIB
    fd_growth: int = 16
    refusal_p99_s: float = 1.0


BOUNDS = Bounds()


def warmup_s(duration_s: float) -> float:
    return min(WARMUP_MAX_S, duration_s * WARMUP_SHARE)


def sample_every_s(duration_s: float) -> float:
    """A few seconds between samples: about 30 over the run, between 1 and 5 s apart."""
    return min(5.0, max(1.0, duration_s / 30))


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss_bytes: int
    fds: int

    def to_json(self) -> dict[str, Any]:
        return {"at_s": round(self.at_s, 1), "rss_mib": round(self.rss_bytes / MIB, 1), "fds": self.fds}


@dataclass
class ProcessSeries:
    """Resident memory and open descriptors of one process over the run."""

    name: str
    pid: int
    samples: list[Sample] = field(default_factory=list)
    # Taken before the first request, and after the load stopped and the recovery request completed
    # (both reported, not judged: the judged growth is after warm-up).
    before_load: Sample | None = None
    after_load: Sample | None = None
    died_at_s: float | None = None

    def read(self, at_s: float) -> Sample | None:
        """The process's figures now; None (and the time noted) once it is gone."""
        try:
            process = psutil.Process(self.pid)
            with process.oneshot():
                if process.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.ZombieProcess(self.pid)
                return Sample(at_s, process.memory_info().rss, process.num_fds())
        except psutil.Error:
            if self.died_at_s is None:
                self.died_at_s = at_s
            return None

    def sample(self, at_s: float) -> None:
        if (sample := self.read(at_s)) is not None:
            self.samples.append(sample)

    def report(self, warmup_s: float, bounds: Bounds = BOUNDS) -> dict[str, Any]:
        """First sample after warm-up, the maxima, the last, the growth, and what breaks a bound."""
        steady = [s for s in self.samples if s.at_s >= warmup_s]
        problems = []
        if self.died_at_s is not None:
            problems.append(f"gone at {self.died_at_s:.0f} s")
        report: dict[str, Any] = {"process": self.name, "pid": self.pid, "samples": len(self.samples)}
        if steady:
            first, last = steady[0], steady[-1]
            rss_growth, fd_growth = last.rss_bytes - first.rss_bytes, last.fds - first.fds
            if rss_growth > bounds.rss_growth_bytes:
                bound_mib = bounds.rss_growth_bytes / MIB
                problems.append(f"resident memory grew {rss_growth / MIB:.1f} MiB (bound {bound_mib:.0f})")
            if fd_growth > bounds.fd_growth:
                problems.append(f"open descriptors grew by {fd_growth} (bound {bounds.fd_growth})")
            report |= {
                "first_after_warmup": first.to_json(),
                "max": {
                    "rss_mib": round(max(s.rss_bytes for s in steady) / MIB, 1),
                    "fds": max(s.fds for s in steady),
                },
                "last": last.to_json(),
                "growth": {"rss_mib": round(rss_growth / MIB, 1), "fds": fd_growth},
            }
        else:
            problems.append("no sample after warm-up")
        report |= {
            "before_load": self.before_load.to_json() if self.before_load else None,
            "after_load": self.after_load.to_json() if self.after_load else None,
            "bounds": {"rss_growth_mib": bounds.rss_growth_bytes / MIB, "fd_growth": bounds.fd_growth},
            "within_bounds": not problems,
            "problems": problems,
            "series": [[round(s.at_s, 1), round(s.rss_bytes / MIB, 1), s.fds] for s in self.samples],
        }
        return report


@dataclass
class LoadTally:
    """How the requests of a load ended, as their clients saw them."""

    sent: int = 0
    # "OK", a status code's name, or NO_SUMMARY (a stream that ended without its summary).
    codes: Counter[str] = field(default_factory=Counter)
    refusal_s: list[float] = field(default_factory=list)
    refusals_without_hint: int = 0
    hints_ms: list[int] = field(default_factory=list)
    # Completed requests by the worker that served them.
    served_by: Counter[str] = field(default_factory=Counter)
    # Refusals for a client's own limit of streams (its token's), not for the pool's capacity.
    client_limit_refusals: int = 0
    # Requests that ended neither completed nor refused for overload, by code and message.
    unexpected: Counter[str] = field(default_factory=Counter)

    def record(self, result: CallResult) -> None:
        self.codes[result.status] += 1
        if result.ok:
            self.served_by[result.worker_id] += 1
        if result.status == OVERLOAD_CODE:
            self.client_limit_refusals += CLIENT_LIMIT_MARK in result.error
            self.refusal_s.append(result.done_s - result.sent_s)
            if result.retry_after_ms is None:
                self.refusals_without_hint += 1
            else:
                self.hints_ms.append(result.retry_after_ms)
        elif not result.ok:
            self.unexpected[f"{result.status}: {result.error[:200]}"] += 1

    def refusal_p99_s(self) -> float:
        if len(self.refusal_s) < 2:
            return max(self.refusal_s, default=0.0)
        return statistics.quantiles(self.refusal_s, n=100, method="inclusive")[98]

    def problems(self, bounds: Bounds = BOUNDS) -> list[str]:
        problems = []
        if not self.codes["OK"]:
            problems.append("no request completed")
        if not self.codes[OVERLOAD_CODE]:
            problems.append("nothing was refused: the load never went above the pool's capacity")
        elif self.codes[OVERLOAD_CODE] == self.client_limit_refusals:
            problems.append(
                "only clients' own limits refused requests: the load never went above the pool's capacity"
            )
        unexpected = {code: n for code, n in self.codes.items() if code not in ("OK", OVERLOAD_CODE)}
        if unexpected:
            problems.append(f"requests ended otherwise than completed or refused: {unexpected}")
            problems.append(f"their most common errors: {self.unexpected.most_common(3)}")
        if unfinished := self.sent - sum(self.codes.values()):
            problems.append(f"{unfinished} requests never ended")
        if self.refusals_without_hint:
            problems.append(f"{self.refusals_without_hint} refusals carried no retry-after-ms hint")
        if self.refusal_p99_s() > bounds.refusal_p99_s:
            problems.append(
                f"refusals took {self.refusal_p99_s():.2f} s at p99 (bound {bounds.refusal_p99_s:g})"
            )
        return problems

    def to_json(self) -> dict[str, Any]:
        refusal_ms = sorted(s * 1e3 for s in self.refusal_s)
        return {
            "sent": self.sent,
            "completed": self.codes["OK"],
            "refused": self.codes[OVERLOAD_CODE],
            "refused_for_client_limit": self.client_limit_refusals,
            "by_code": dict(self.codes),
            "unfinished": self.sent - sum(self.codes.values()),
            "refusals_without_hint": self.refusals_without_hint,
            "refusal_ms": {
                "p50": round(statistics.median(refusal_ms), 2) if refusal_ms else None,
                "p99": round(self.refusal_p99_s() * 1e3, 2) if refusal_ms else None,
                "max": round(refusal_ms[-1], 2) if refusal_ms else None,
            },
            "retry_hint_ms": {
                "min": min(self.hints_ms, default=None),
                "max": max(self.hints_ms, default=None),
            },
            "served_by": dict(self.served_by),
        }

    def idle_workers(self, names: Sequence[str]) -> list[str]:
        """Of these workers, those that completed no request: the soak says nothing about them."""
        return [f"worker {name} served no request" for name in names if not self.served_by[name]]


async def overload_client(
    stub: GenerateStub,
    until: float,
    tally: LoadTally,
    make_request: Callable[[], generate_pb2.GenerateRequest],
    max_backoff_s: float = MAX_BACKOFF_S,
    timeout_s: float = CALL_TIMEOUT_S,
    metadata: Metadata = (),
) -> None:
    """Send requests one after another until `until` (each with `metadata`, e.g. a bearer token);
    after a refusal wait its retry hint (capped)."""
    while time.monotonic() < until:
        tally.sent += 1
        result = await timed_generate(stub, make_request(), timeout_s, metadata)
        tally.record(result)
        if result.status == OVERLOAD_CODE:
            await asyncio.sleep(min((result.retry_after_ms or 0) / 1e3, max_backoff_s))


def admitted(config: TierserveConfig) -> int:
    """Requests the pool's router takes at once: on each worker, those generating together (its batch,
    or one without batching) plus its queue."""

    def slots(worker: WorkerConfig) -> int:
        batching = config.batching_for(worker)
        return batching.max_batch if batching.enabled else 1

    return sum(slots(w) + config.router.max_queue_per_worker for w in config.workers)


async def drive(
    address: str,
    series: Sequence[ProcessSeries],
    duration_s: float,
    clients: int,
    make_request: Callable[[], generate_pb2.GenerateRequest],
    tokens: SoakTokens | None = None,
    probes: ProbeTally | None = None,
) -> tuple[LoadTally, CallResult]:
    """The load, the samples taken meanwhile, and the request sent once the load stopped. With
    `tokens`, client i carries token i (in turn), and one more client calls without a valid token,
    its calls counted in `probes`."""
    tally = LoadTally()
    # A subchannel pool of its own per channel: every client its own connection, as separate clients
    # have (channels of one process to one target would otherwise share one).
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    probing = tokens is not None and probes is not None
    channels = [
        grpc.aio.insecure_channel(address, options=options) for _ in range(clients + (1 if probing else 0))
    ]
    metadata = [tokens.for_client(i)[1] if tokens else () for i in range(clients)]
    try:
        for process in series:
            process.before_load = process.read(0.0)
        started = time.monotonic()
        until = started + duration_s
        tasks = [
            asyncio.create_task(
                overload_client(
                    router_pb2_grpc.RouterStub(c), until, tally, make_request, metadata=metadata[i]
                )
            )
            for i, c in enumerate(channels[:clients])
        ]
        if probing and probes is not None:
            tasks.append(
                asyncio.create_task(probe_client(router_pb2_grpc.RouterStub(channels[-1]), until, probes))
            )
        every_s = sample_every_s(duration_s)
        while (now := time.monotonic()) < until:
            for process in series:
                process.sample(now - started)
            await asyncio.sleep(min(every_s, max(0.0, until - time.monotonic())))
        for process in series:
            process.sample(time.monotonic() - started)
        # Every client ends once its request in flight does; a hung one is left unfinished.
        _, pending = await asyncio.wait(tasks, timeout=CALL_TIMEOUT_S + 10)
        for task in pending:
            task.cancel()
        plain = generate_pb2.GenerateRequest(prompt="The pool is quiet again, and", max_new_tokens=8)
        stub = router_pb2_grpc.RouterStub(channels[0])
        recovery = await timed_generate(stub, plain, RECOVERY_TIMEOUT_S, metadata[0])
        for process in series:
            process.after_load = process.read(time.monotonic() - started)
    finally:
        for channel in channels:
            await channel.close()
    return tally, recovery


def tokens_config(config: TierserveConfig, tokens: SoakTokens) -> TierserveConfig:
    """`config` with the soak's tokens file as the router's (any other tokens file replaced)."""
    data = config.model_dump()
    data.setdefault("security", {})["tokens_file"] = str(tokens.path)
    return parse_config(data, source="soak config")


def run_soak_benchmark(
    out: Path,
    config_path: str | None,
    duration_s: float,
    clients: int | None,
    new_tokens: int,
    seed: int,
    run_dir: Path | None,
    console: Console,
    with_tokens: bool = True,
    warmup: float | None = None,
) -> int:
    warmup = warmup_s(duration_s) if warmup is None else warmup
    if not 0 <= warmup < duration_s:
        console.print(f"[red]the warm-up ({warmup:g} s) must be shorter than the run ({duration_s:g} s)[/]")
        return 2
    config = bench_pool_config(config_path, ("fp32", "bf16"), usable_cpus(), new_tokens)
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tierserve-soak-"))
    tokens = SoakTokens.write(run_dir) if with_tokens else None
    if tokens:
        config = tokens_config(config, tokens)
    room = admitted(config)
    clients = clients or 2 * room + 4
    if clients <= room:
        console.print(
            f"[yellow]{clients} clients fit the pool's room for {room} requests: nothing will be refused[/]"
        )
    mix = RequestMix(prompt_words(config), new_tokens, random.Random(seed), primed=room)
    probes = ProbeTally()
    with running_pool(config, run_dir, console) as launcher:
        assert launcher.router is not None
        series = [ProcessSeries("router", launcher.router.process.pid)] + [
            ProcessSeries(m.name, m.process.pid) for m in launcher.workers
        ]
        console.print(
            f"soak: {clients} clients against room for {room} requests, for {duration_s:.0f} s, "
            f"tokens {'on' if tokens else 'off'}"
        )
        tally, recovery = asyncio.run(
            drive(launcher.router_address, series, duration_s, clients, mix, tokens, probes)
        )
    processes = [s.report(warmup) for s in series]
    recovered = recovery.ok and recovery.generated_tokens > 0
    problems = [f"{p['process']}: {problem}" for p in processes for problem in p["problems"]]
    problems += tally.problems()
    problems += tally.idle_workers([w.name for w in config.workers])
    if tokens:
        problems += probes.problems()
    if not recovered:
        problems.append(f"the request after the load ended {recovery.status} {recovery.error}".rstrip())
    report = {
        "benchmark": "soak",
        "config": {
            "duration_s": duration_s,
            "warmup_s": warmup,
            "sample_every_s": sample_every_s(duration_s),
            "clients": clients,
            "admitted": room,
            "new_tokens": new_tokens,
            "seed": seed,
            "workers": [w.name for w in config.workers],
            "tokens": tokens.to_json(clients) if tokens else None,
        },
        "bounds": {
            "rss_growth_mib": BOUNDS.rss_growth_bytes / MIB,
            "fd_growth": BOUNDS.fd_growth,
            "refusal_p99_ms": BOUNDS.refusal_p99_s * 1e3,
        },
        "processes": processes,
        "requests": tally.to_json(),
        "mix": mix.to_json(),
        "without_valid_token": probes.to_json() if tokens else None,
        "recovery": {
            "status": recovery.status,
            "error": recovery.error,
            "ms": (recovery.done_s - recovery.sent_s) * 1e3,
            "generated_tokens": recovery.generated_tokens,
            "recovered": recovered,
        },
        "verdict": {"passed": not problems, "problems": problems},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    markdown = out.with_suffix(".md")
    markdown.write_text(soak_markdown(report), encoding="utf-8")
    print_report(report, console)
    console.print(f"-> {out}, {markdown}", highlight=False)
    return 0 if not problems else 1
