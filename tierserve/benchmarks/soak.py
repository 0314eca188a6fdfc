"""`tierserve bench soak`: a pool held above its capacity for a while; its memory and descriptors stay flat.

    tierserve bench soak --out bench-results/soak.json [--config F] [--duration-s 600] [--clients N]

Starts a real pool (router and workers as their own processes; two workers by default, or --config's)
and drives it from more closed-loop clients than it admits. The router takes one request per worker
plus `[router] max_queue_per_worker` waiting behind it; the other clients are refused with
RESOURCE_EXHAUSTED and a `retry-after-ms` hint, wait that hint (at most MAX_BACKOFF_S) and come back,
as the SDK does. Each client keeps one connection for the whole run. Every few seconds the resident
memory (RSS) and open file descriptors of the router and of every worker process are read (psutil).
When the load stops, one plain request must complete: the pool recovered.

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
status, a stream without its summary, a process that died, or a load that never went above capacity
(nothing refused) fails the verdict. Exit status 1 on a failed verdict.

`tests/unit/test_overload.py` runs the same clients and bounds for a minute against in-process fake
workers (one process, no model); `tests/integration/test_soak.py` runs this benchmark for a minute on a
small pool of the default model.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from rich.console import Console
from rich.table import Table
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

from tierserve.benchmarks.chaos import PROMPTS
from tierserve.benchmarks.livepool import bench_pool_config, running_pool, usable_cpus
from tierserve.benchmarks.streamcall import CallResult, GenerateStub, timed_generate
from tierserve.domain.config import TierserveConfig

MIB = 1024 * 1024
OVERLOAD_CODE = "RESOURCE_EXHAUSTED"
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
    # Taken after the load stopped and the recovery request completed (not judged).
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
            "after_load": self.after_load.to_json() if self.after_load else None,
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

    def record(self, result: CallResult) -> None:
        self.codes[result.status] += 1
        if result.status == OVERLOAD_CODE:
            self.refusal_s.append(result.done_s - result.sent_s)
            if result.retry_after_ms is None:
                self.refusals_without_hint += 1
            else:
                self.hints_ms.append(result.retry_after_ms)

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
        unexpected = {code: n for code, n in self.codes.items() if code not in ("OK", OVERLOAD_CODE)}
        if unexpected:
            problems.append(f"requests ended otherwise than completed or refused: {unexpected}")
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
        }


async def overload_client(
    stub: GenerateStub,
    until: float,
    tally: LoadTally,
    make_request: Callable[[], generate_pb2.GenerateRequest],
    max_backoff_s: float = MAX_BACKOFF_S,
    timeout_s: float = CALL_TIMEOUT_S,
) -> None:
    """Send requests one after another until `until`; after a refusal wait its retry hint (capped)."""
    while time.monotonic() < until:
        tally.sent += 1
        result = await timed_generate(stub, make_request(), timeout_s)
        tally.record(result)
        if result.status == OVERLOAD_CODE:
            await asyncio.sleep(min((result.retry_after_ms or 0) / 1e3, max_backoff_s))


def admitted(config: TierserveConfig) -> int:
    """Requests the pool's router takes at once: one generating on each worker plus its queue."""
    return len(config.workers) * (1 + config.router.max_queue_per_worker)


def request_maker(
    prompts: Sequence[str], new_tokens: int, rng: random.Random
) -> Callable[[], generate_pb2.GenerateRequest]:
    """Greedy requests: one of a few fixed prompts, and `new_tokens / 2` to `new_tokens` tokens. Few
    shapes, all met during warm-up: caches keyed by shape (the kernels' primitive caches, allocator
    size classes) are full by then, so what grows after is what requests leave behind."""

    def make() -> generate_pb2.GenerateRequest:
        return generate_pb2.GenerateRequest(
            prompt=rng.choice(prompts), max_new_tokens=rng.randint(max(1, new_tokens // 2), new_tokens)
        )

    return make


async def drive(
    address: str,
    series: Sequence[ProcessSeries],
    duration_s: float,
    clients: int,
    make_request: Callable[[], generate_pb2.GenerateRequest],
) -> tuple[LoadTally, CallResult]:
    """The load, the samples taken meanwhile, and the request sent once the load stopped."""
    tally = LoadTally()
    # A subchannel pool of its own per channel: every client its own connection, as separate clients
    # have (channels of one process to one target would otherwise share one).
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(clients)]
    try:
        started = time.monotonic()
        until = started + duration_s
        tasks = [
            asyncio.create_task(overload_client(router_pb2_grpc.RouterStub(c), until, tally, make_request))
            for c in channels
        ]
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
        recovery = await timed_generate(router_pb2_grpc.RouterStub(channels[0]), plain, RECOVERY_TIMEOUT_S)
        for process in series:
            process.after_load = process.read(time.monotonic() - started)
    finally:
        for channel in channels:
            await channel.close()
    return tally, recovery


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"soak: {report['config']['duration_s']:.0f} s, warm-up {report['config']['warmup_s']:.0f} s"
    )
    for column in (
        "process",
        "pid",
        "RSS MiB first/max/last",
        "RSS growth",
        "fds first/max/last",
        "fd growth",
        "",
    ):
        table.add_column(column, justify="left" if column in ("process", "") else "right")
    for p in report["processes"]:
        if "growth" in p:
            first, peak, last, growth = p["first_after_warmup"], p["max"], p["last"], p["growth"]
            rss = f"{first['rss_mib']:.0f}/{peak['rss_mib']:.0f}/{last['rss_mib']:.0f}"
            fds = f"{first['fds']}/{peak['fds']}/{last['fds']}"
            cells = [rss, f"{growth['rss_mib']:+.1f}", fds, f"{growth['fds']:+d}"]
        else:
            cells = ["-"] * 4
        table.add_row(
            p["process"], str(p["pid"]), *cells, "ok" if p["within_bounds"] else "; ".join(p["problems"])
        )
    console.print(table)
    r, recovery, verdict = report["requests"], report["recovery"], report["verdict"]
    console.print(
        f"requests: sent {r['sent']}, completed {r['completed']}, refused {r['refused']} "
        f"(refusal p50 {r['refusal_ms']['p50']} ms, p99 {r['refusal_ms']['p99']} ms; retry hints "
        f"{r['retry_hint_ms']['min']}-{r['retry_hint_ms']['max']} ms, {r['refusals_without_hint']} without), "
        f"by code {r['by_code']}, unfinished {r['unfinished']}",
        highlight=False,
    )
    console.print(
        f"after the load: a plain request {recovery['status']} in {recovery['ms']:.0f} ms", highlight=False
    )
    bounds = report["bounds"]
    console.print(
        f"verdict: {'PASS' if verdict['passed'] else 'FAIL'} (bounds per process after warm-up: RSS growth "
        f"<= {bounds['rss_growth_mib']:.0f} MiB, fd growth <= {bounds['fd_growth']}; refusals p99 <= "
        f"{bounds['refusal_p99_ms']:.0f} ms)" + "".join(f"\n  - {p}" for p in verdict["problems"]),
        highlight=False,
    )


def run_soak_benchmark(
    out: Path,
    config_path: str | None,
    duration_s: float,
    clients: int | None,
    new_tokens: int,
    seed: int,
    run_dir: Path | None,
    console: Console,
) -> int:
    config = bench_pool_config(config_path, ("fp32", "bf16"), usable_cpus(), new_tokens)
    room = admitted(config)
    clients = clients or 2 * room + 4
    if clients <= room:
        console.print(
            f"[yellow]{clients} clients fit the pool's room for {room} requests: nothing will be refused[/]"
        )
    make_request = request_maker(PROMPTS, new_tokens, random.Random(seed))
    with running_pool(config, run_dir, console) as launcher:
        assert launcher.router is not None
        series = [ProcessSeries("router", launcher.router.process.pid)] + [
            ProcessSeries(m.name, m.process.pid) for m in launcher.workers
        ]
        console.print(f"soak: {clients} clients against room for {room} requests, for {duration_s:.0f} s")
        tally, recovery = asyncio.run(
            drive(launcher.router_address, series, duration_s, clients, make_request)
        )
    warmup = warmup_s(duration_s)
    processes = [s.report(warmup) for s in series]
    recovered = recovery.ok and recovery.generated_tokens > 0
    problems = [f"{p['process']}: {problem}" for p in processes for problem in p["problems"]]
    problems += tally.problems()
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
        },
        "bounds": {
            "rss_growth_mib": BOUNDS.rss_growth_bytes / MIB,
            "fd_growth": BOUNDS.fd_growth,
            "refusal_p99_ms": BOUNDS.refusal_p99_s * 1e3,
        },
        "processes": processes,
        "requests": tally.to_json(),
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
    print_report(report, console)
    console.print(f"-> {out}", highlight=False)
    return 0 if not problems else 1
