"""Overload soak through a real router (in-process, slow fake workers): load far above capacity for a
minute gets prompt RESOURCE_EXHAUSTED with a retry hint, never a hang; resident memory and open file
descriptors stay within a stated bound; and the pool serves normally once the load drops."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import psutil

from tests.unit.fake_pool import FakeWorker, RunningPool, running_pool
from tierserve.v1 import generate_pb2

SOAK_S = 60.0
CLIENTS = 48  # against room for 2 x (1 + 2) requests: most are refused
# Stated bounds, after a warm-up phase: growth of resident memory and of open descriptors.
MAX_RSS_GROWTH_BYTES = 64 * 1024 * 1024
MAX_FD_GROWTH = 32
# A refusal must come at once, not after queueing.
MAX_REFUSAL_S = 1.0
CALL_TIMEOUT_S = 10.0


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    slowest_refusal_s: float = 0.0
    hints: set[str] = field(default_factory=set)


async def client(pool: RunningPool, until: float, tally: Tally) -> None:
    request = generate_pb2.GenerateRequest(prompt="load " * 8, max_new_tokens=4)
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            responses = [r async for r in pool.stub.Generate(request, timeout=CALL_TIMEOUT_S)]
            assert responses[-1].summary.generated_tokens == 4
            tally.codes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            tally.codes[error.code().name] += 1
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally.slowest_refusal_s = max(tally.slowest_refusal_s, time.monotonic() - started)
                tally.hints.add(dict(error.trailing_metadata() or ()).get("retry-after-ms", ""))
                await asyncio.sleep(0.005)  # a client that backs off a little, as the SDK would


async def soak(duration_s: float) -> tuple[Tally, int, int]:
    """Run the load; returns the tally and the growth of RSS and FDs after a warm-up of a tenth."""
    workers = [
        FakeWorker("fp32-0", "fp32", token_delay_s=0.002),
        FakeWorker("bf16-0", "bf16", cores=[1], token_delay_s=0.002),
    ]
    me = psutil.Process()
    tally = Tally()
    async with running_pool(workers, max_queue_per_worker=2) as pool:
        start = time.monotonic()
        until = start + duration_s
        tasks = [asyncio.create_task(client(pool, until, tally)) for _ in range(CLIENTS)]
        await asyncio.sleep(duration_s / 10)
        rss, fds = me.memory_info().rss, me.num_fds()
        done, pending = await asyncio.wait(tasks, timeout=duration_s + CALL_TIMEOUT_S + 5)
        assert not pending, "clients hung"
        for task in done:
            task.result()
        rss_growth, fd_growth = me.memory_info().rss - rss, me.num_fds() - fds
        # Load dropped: nothing left queued, and a request is served at once.
        assert all(w.outstanding == 0 for w in pool.pool.workers)
        quiet = generate_pb2.GenerateRequest(prompt="after the storm", max_new_tokens=2)
        assert [r async for r in pool.stub.Generate(quiet, timeout=5)][-1].summary.generated_tokens == 2
    return tally, rss_growth, fd_growth


def test_overload_soak_is_refused_promptly_with_bounded_memory_and_descriptors() -> None:
    tally, rss_growth, fd_growth = asyncio.run(soak(SOAK_S))
    assert set(tally.codes) == {"OK", "RESOURCE_EXHAUSTED"}, tally.codes
    assert tally.codes["OK"] > 100 and tally.codes["RESOURCE_EXHAUSTED"] > tally.codes["OK"]
    assert tally.slowest_refusal_s < MAX_REFUSAL_S
    assert "" not in tally.hints  # every refusal carried a retry hint
    assert rss_growth < MAX_RSS_GROWTH_BYTES, f"RSS grew {rss_growth / 2**20:.1f} MiB"
    assert fd_growth < MAX_FD_GROWTH, f"{fd_growth} more open descriptors"
