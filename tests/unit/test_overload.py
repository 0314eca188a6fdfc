"""Overload soak through a real router (in-process, slow fake workers): load far above capacity for half
a minute gets RESOURCE_EXHAUSTED with a retry hint without queueing for a slot, never a hang; resident
memory and open file descriptors stay within a stated bound; and the pool serves normally once the
load drops.

The clients, the tally and the bounds are `tierserve bench soak`'s (tierserve/benchmarks/soak.py);
here the whole pool is this one process, so it is the one measured. `tests/integration/test_soak.py`
runs the benchmark itself on real router and worker processes of the default model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any

import pytest
from tierserve_client.v1 import generate_pb2

from tests.unit.fake_pool import FakeWorker, running_pool
from tierserve.benchmarks.soak import BOUNDS, LoadTally, ProcessSeries, overload_client
from tierserve.router import pool as router_pool

SOAK_S = 30.0
CLIENTS = 48  # against room for 2 x (1 + 2) requests: most are refused
CALL_TIMEOUT_S = 30.0
# The soak's bounds; the descriptor bound doubled, as this process holds router, workers and client.
# How fast refusals come is `tierserve bench soak`'s figure (1 s at p99 there). Here router, workers
# and 48 clients share one event loop, which a busy machine can starve for seconds: the test only
# checks that no refusal waited out a call's deadline.
MAX_REFUSAL_S = CALL_TIMEOUT_S
LIMITS = dataclasses.replace(BOUNDS, fd_growth=2 * BOUNDS.fd_growth, refusal_p99_s=MAX_REFUSAL_S)
# Refused clients come back after this instead of the router's hint, to keep the load high.
BACKOFF_S = 0.005


async def soak(duration_s: float) -> tuple[LoadTally, dict[str, Any]]:
    """Run the load; returns the tally and this process's figures after a warm-up of a tenth."""
    workers = [
        FakeWorker("fp32-0", "fp32", token_delay_s=0.002),
        FakeWorker("bf16-0", "bf16", cores=[1], token_delay_s=0.002),
    ]
    me = ProcessSeries("test process", os.getpid())
    tally = LoadTally()
    request = generate_pb2.GenerateRequest(prompt="load " * 8, max_new_tokens=4)
    async with running_pool(workers, max_queue_per_worker=2) as pool:
        start = time.monotonic()
        until = start + duration_s
        tasks = [
            asyncio.create_task(
                overload_client(pool.stub, until, tally, lambda: request, BACKOFF_S, CALL_TIMEOUT_S)
            )
            for _ in range(CLIENTS)
        ]
        await asyncio.sleep(duration_s / 10)
        me.sample(time.monotonic() - start)
        done, pending = await asyncio.wait(tasks, timeout=duration_s + CALL_TIMEOUT_S + 5)
        assert not pending, "clients hung"
        for task in done:
            task.result()
        me.sample(time.monotonic() - start)
        # Load dropped: nothing left queued, and a request is served at once.
        assert all(w.outstanding == 0 for w in pool.pool.workers)
        quiet = generate_pb2.GenerateRequest(prompt="after the storm", max_new_tokens=2)
        assert [r async for r in pool.stub.Generate(quiet, timeout=5)][-1].summary.generated_tokens == 2
    return tally, me.report(duration_s / 10, LIMITS)


def test_overload_soak_is_refused_with_hints_and_bounded_memory_and_descriptors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The health checks are answered by the same starved loop: a slow answer is not a dead worker.
    monkeypatch.setattr(router_pool, "HEALTH_TIMEOUT_S", CALL_TIMEOUT_S)
    tally, me = asyncio.run(soak(SOAK_S))
    assert set(tally.codes) == {"OK", "RESOURCE_EXHAUSTED"}, (tally.codes, tally.unexpected)
    assert tally.codes["OK"] > 100 and tally.codes["RESOURCE_EXHAUSTED"] > tally.codes["OK"]
    assert max(tally.refusal_s) < MAX_REFUSAL_S
    # Every refusal carried a retry hint, none waited out a deadline, every request ended.
    assert tally.problems(LIMITS) == []
    assert me["within_bounds"], me["problems"]
