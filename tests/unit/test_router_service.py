"""The router service against fake streaming workers: routing by budget, admission with a retry
hint, live figures learned from relayed tokens, WatchStats and `tierserve top`."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2

from tests.unit.fake_pool import FakeWorker, RunningPool, running_pool
from tierserve.cli import main


async def generate(pool: RunningPool, **fields: Any) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest(**{"prompt": "p" * 40, "max_new_tokens": 4, **fields})
    return [response async for response in pool.stub.Generate(request, timeout=10)]


def two_tiers() -> list[FakeWorker]:
    return [
        FakeWorker("fp32-0", "fp32", tpot_us=30_000),
        FakeWorker("int4-0", "int4-woq", loss_pct=0.3, tpot_us=10_000, cores=[1]),
    ]


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


def test_requests_go_to_the_most_accurate_worker_that_meets_the_budget() -> None:
    async def scenario() -> None:
        async with running_pool(two_tiers()) as pool:
            loose = (await generate(pool))[-1].summary
            assert loose.worker_id == "fp32-0" and loose.policy == "slo" and loose.budget_met
            assert loose.routing_reason.startswith("slo: fp32 (fp32-0) predicted")
            assert loose.predicted_tpot_us == 30_000  # the worker's warm-up figure before traffic
            tight = (await generate(pool, max_token_latency_ms=20))[-1].summary
            assert tight.worker_id == "int4-0" and tight.budget_met and not tight.best_effort
            assert "TPOT 10ms ≤ 20ms" in tight.routing_reason
            best_effort = (await generate(pool, max_token_latency_ms=5))[-1].summary
            assert best_effort.best_effort and not best_effort.budget_met
            assert best_effort.worker_id == "int4-0"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generate(pool, max_token_latency_ms=5, strict=True)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "TPOT ≤ 5ms" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as impossible:
                await generate(pool, max_quality_loss_pct=0.0, tier="int4-woq")
            assert impossible.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    run(scenario)


@pytest.mark.parametrize(
    ("field", "value"), [("max_token_latency_ms", -1.0), ("max_first_token_latency_ms", math.nan)]
)
def test_bad_budgets_are_invalid_argument_naming_the_field(field: str, value: float) -> None:
    async def scenario() -> None:
        async with running_pool(two_tiers()) as pool:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await generate(pool, **{field: value})
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith(f"{field}:")

    run(scenario)


def test_a_full_queue_is_resource_exhausted_with_a_retry_hint_and_recovers() -> None:
    async def scenario() -> None:
        fake = FakeWorker("bf16-0", "bf16")
        fake.gate.clear()
        async with running_pool([fake], max_queue_per_worker=1) as pool:
            first = asyncio.create_task(generate(pool, request_id="first"))
            assert await fake.arrivals.get() == "first"
            second = asyncio.create_task(generate(pool, request_id="second"))
            assert await fake.arrivals.get() == "second"
            worker = pool.pool.workers[0]
            assert (worker.in_flight, worker.load.queued) == (2, 1)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await generate(pool, request_id="third")
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            hint = dict(caught.value.trailing_metadata() or ())["retry-after-ms"]
            # The first request's predicted remaining work: 20 ms TTFT-ish prefill + 3 tokens x 10 ms.
            assert 40 <= int(hint) <= 100
            fake.gate.set()
            done = [(await task)[-1].summary for task in (first, second)]
            assert [s.request_id for s in done] == ["first", "second"]
            assert worker.in_flight == 0
            assert (await generate(pool))[-1].summary.generated_tokens == 4

    run(scenario)


def test_relayed_tokens_drive_live_figures_streamed_by_watch_stats() -> None:
    async def scenario() -> None:
        workers = two_tiers()
        workers[1].cores = [0]  # shares fp32's core: its tokens count two streams while fp32 generates
        workers[0].gate.clear()
        async with running_pool(workers) as pool:
            held = asyncio.create_task(generate(pool, tier="fp32"))
            await workers[0].arrivals.get()
            await generate(pool, tier="int4-woq", max_new_tokens=5)
            workers[0].gate.set()
            await held
            stats = await anext(aiter(pool.stub.WatchStats(router_pb2.WatchStatsRequest(interval_ms=100))))
            assert stats.policy == "slo"
            live = {w.worker_id: w for w in stats.workers}
            int4 = live["int4-0"].live
            assert int4.basis == "live" and int4.tokens_relayed == 5
            assert [(c.streams, c.samples) for c in int4.tpot_by_concurrency] == [(2, 4)]
            assert int4.ttft_ewma_us == 20_000 and int4.tpot_ewma_us == 10_000
            assert live["int4-0"].relayed_latency.tpot_p50_us == 10_000
            assert live["fp32-0"].live.tpot_by_concurrency[0].streams == 1
            assert live["fp32-0"].queue_limit == 8 and live["fp32-0"].queued == 0
            # The prefill line now includes the relayed request's prompt (10 tokens for 40 characters).
            assert int4.prefill_per_token_us > 0

    run(scenario)


def test_top_renders_live_snapshots_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> None:
        async with running_pool(two_tiers()) as pool:
            await generate(pool)
            code = await asyncio.to_thread(
                main, ["top", "--router", pool.address, "--interval-ms", "100", "--iterations", "2"]
            )
            assert code == 0

    run(scenario)
    out = capsys.readouterr().out
    assert "tierserve top" in out and "policy slo" in out
    assert "fp32-0" in out and "int4-0" in out and "live" in out and "warm-up" in out
