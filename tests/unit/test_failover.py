"""Failover through a real router in front of in-process fake workers that fail before or after
their first token: the client's stream has no seam, the summary records the failover, and the
client's own faults are never retried."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2

from tests.unit.fake_pool import FakeWorker, RunningPool, running_pool
from tierserve.router.failover import StreamProgress, is_worker_fault

PROMPT = "p" * 40  # one word: a counting worker continues with " w1", " w2", ...


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


def pool_of(first: FakeWorker) -> list[FakeWorker]:
    """`first` is fp32, which the slo policy prefers; bf16 is the one left to fail over to."""
    return [first, FakeWorker("bf16-0", "bf16", cores=[1], count_words=True)]


async def generate(pool: RunningPool, **fields: Any) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest(**{"prompt": PROMPT, "max_new_tokens": 5, **fields})
    return [response async for response in pool.stub.Generate(request, timeout=10)]


def check_seamless(responses: list[generate_pb2.GenerateResponse], count: int) -> generate_pb2.Summary:
    """Tokens indexed 0..count-1 whose text is the counting worker's uninterrupted continuation."""
    tokens = [r.token for r in responses[:-1]]
    assert [t.index for t in tokens] == list(range(count))
    expected = "".join(f" w{1 + i}" for i in range(count))
    assert "".join(t.text for t in tokens) == expected
    summary = responses[-1].summary
    assert summary.text == expected and summary.generated_tokens == count
    return summary


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN]
)
def test_a_worker_failing_before_the_first_token_is_retried_on_another(code: grpc.StatusCode) -> None:
    async def scenario() -> None:
        workers = pool_of(FakeWorker("fp32-0", "fp32", fail_after=0, fail_code=code, count_words=True))
        async with running_pool(workers) as pool:
            summary = check_seamless(await generate(pool, request_id="r1"), 5)
            assert summary.worker_id == "bf16-0" and summary.request_id == "r1"
            assert (summary.failovers, list(summary.failed_workers)) == (1, ["fp32-0"])
            assert summary.resumed_after_tokens == 0
            assert summary.routing_reason.startswith(f"failover after fp32-0 {code.name}; slo: bf16")
            # Sent again unchanged: nothing had been streamed.
            assert [(r.prompt, r.max_new_tokens) for r in workers[1].requests] == [(PROMPT, 5)]
            status = {w.worker_id: w for w in pool.pool.snapshot()}["fp32-0"]
            assert status.requests_failed == 1 and code.name in status.last_error

    run(scenario)


def test_a_worker_failing_mid_stream_is_resumed_without_a_seam() -> None:
    async def scenario() -> None:
        workers = pool_of(FakeWorker("fp32-0", "fp32", fail_after=2, count_words=True))
        async with running_pool(workers) as pool:
            summary = check_seamless(await generate(pool, max_new_tokens=6), 6)
            assert summary.worker_id == "bf16-0"
            assert (summary.failovers, list(summary.failed_workers)) == (1, ["fp32-0"])
            assert summary.resumed_after_tokens == 2
            assert "(resumed at token 2)" in summary.routing_reason
            # The second worker continued from the streamed text, as the reply's prefix, for what was owed.
            resumed = workers[1].requests[-1]
            assert (resumed.prompt, resumed.response_prefix, resumed.max_new_tokens) == (PROMPT, " w1 w2", 4)
            # With the ids of the two tokens streamed (the fake's are 100 + its word count).
            assert list(resumed.response_prefix_token_ids) == [101, 102]
            # Its own prompt count (the fake counts chars / 4, prefix included) less the streamed tokens.
            assert summary.prompt_tokens == len(PROMPT + " w1 w2") // 4 - 2
            assert pool.servicer is not None
            labels = {"tier": "fp32", "worker": "fp32-0", "status": "unavailable", "kind": "resumed"}
            registry = pool.servicer.metrics.registry
            assert registry.get_sample_value("tierserve_router_failovers_total", labels) == 1

    run(scenario)


def test_a_worker_whose_server_stops_mid_stream_is_resumed() -> None:
    async def scenario() -> None:
        workers = pool_of(FakeWorker("fp32-0", "fp32", hold_after=3, count_words=True))
        async with running_pool(workers) as pool:
            call = asyncio.create_task(generate(pool, max_new_tokens=5))
            await workers[0].holding.wait()
            await pool.worker_servers[0].stop(0)  # its streams are cut as the process ends
            summary = check_seamless(await call, 5)
            assert summary.worker_id == "bf16-0" and summary.resumed_after_tokens == 3
            # The stopped worker is out of rotation: the next request goes straight to bf16.
            again = (await generate(pool))[-1].summary
            assert again.worker_id == "bf16-0" and again.failovers == 0

    run(scenario)


def test_concurrent_requests_all_complete_when_their_worker_dies() -> None:
    async def scenario() -> None:
        workers = pool_of(FakeWorker("fp32-0", "fp32", fail_after=1, count_words=True))
        workers[0].gate.clear()
        async with running_pool(workers) as pool:
            calls = [asyncio.create_task(generate(pool, request_id=f"r{i}")) for i in range(4)]
            for _ in calls:
                await workers[0].arrivals.get()
            workers[0].gate.set()
            summaries = [check_seamless(await call, 5) for call in calls]
            assert sorted(s.request_id for s in summaries) == ["r0", "r1", "r2", "r3"]
            assert all(s.worker_id == "bf16-0" and s.failovers == 1 for s in summaries)

    run(scenario)


def test_a_worker_failing_after_its_last_token_gets_a_summary_from_the_router() -> None:
    async def scenario() -> None:
        workers = pool_of(FakeWorker("fp32-0", "fp32", fail_after=99, count_words=True))
        async with running_pool(workers) as pool:
            summary = check_seamless(await generate(pool, request_id="r9"), 5)
            assert (summary.worker_id, summary.request_id, summary.failovers) == ("fp32-0", "r9", 1)
            assert summary.finish_reason == generate_pb2.FINISH_REASON_LENGTH
            assert "summary by the router" in summary.routing_reason
            assert workers[1].requests == []  # nothing was owed: no other worker was asked

    run(scenario)


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_client_faults_are_relayed_not_retried(code: grpc.StatusCode) -> None:
    async def scenario() -> None:
        workers = pool_of(FakeWorker("fp32-0", "fp32", fail_after=1, fail_code=code))
        async with running_pool(workers) as pool:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await generate(pool)
            assert caught.value.code() == code
            assert caught.value.details() == "fp32-0 failed on purpose"
            assert workers[1].requests == []
            assert pool.pool.workers[0].healthy

    run(scenario)


def test_a_worker_side_cancel_is_a_worker_fault() -> None:
    async def scenario() -> None:
        workers = pool_of(FakeWorker("fp32-0", "fp32", fail_after=2, fail_code=grpc.StatusCode.CANCELLED))
        workers[0].count_words = True
        async with running_pool(workers) as pool:
            summary = check_seamless(await generate(pool), 5)
            assert summary.failovers == 1

    run(scenario)


def test_with_no_worker_left_the_client_gets_the_failure() -> None:
    async def scenario() -> None:
        async with running_pool([FakeWorker("fp32-0", "fp32", fail_after=1)]) as pool:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await generate(pool)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            details = caught.value.details() or ""
            assert details.startswith("worker fp32-0 failed: UNAVAILABLE: fp32-0 failed on purpose")
            assert "no other worker could take over" in details
            assert pool.pool.workers[0].load.outstanding == 0
            # Back in rotation once its health check passes again.
            while not pool.pool.workers[0].healthy:
                await asyncio.sleep(0.01)
            assert pool.pool.workers[0].health == router_pb2.WORKER_HEALTH_SERVING

    run(scenario)


def test_progress_rules() -> None:
    assert is_worker_fault(grpc.StatusCode.UNAVAILABLE, client_left=False)
    assert not is_worker_fault(grpc.StatusCode.INVALID_ARGUMENT, client_left=False)
    assert is_worker_fault(grpc.StatusCode.CANCELLED, client_left=False)
    assert not is_worker_fault(grpc.StatusCode.CANCELLED, client_left=True)
    request = generate_pb2.GenerateRequest(prompt="a", max_new_tokens=3, strict=True)
    progress = StreamProgress(request, 3)
    assert progress.worker_request() is request
    for text in (" b", " c", " d"):
        progress.relay_token(generate_pb2.Token(text=text), 1.0)
    # Every token owed was streamed: nothing is left to resume.
    assert not progress.can_fail_over()
