"""Prometheus metrics of the router (against fake workers) and of a worker (with a fake engine), both
served in-process on port 0 and scraped over HTTP after traffic."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.unit.fake_engine import worker_state
from tests.unit.fake_pool import FakeWorker, RunningPool, running_pool
from tests.unit.scrape import Samples, scrape, total, value
from tierserve.domain.config import LimitsConfig
from tierserve.rpc.metrics import MetricsEndpoint, serve_metrics
from tierserve.rpc.server import start_server
from tierserve.worker.service import WorkerServicer


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


async def read(endpoint: MetricsEndpoint) -> Samples:
    # The endpoint serves from its own thread; scrape off the event loop so the servers keep running.
    return await asyncio.to_thread(scrape, f"http://127.0.0.1:{endpoint.port}/metrics")


async def generate(pool: RunningPool, **fields: Any) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest(**{"prompt": "p" * 40, "max_new_tokens": 4, **fields})
    return [response async for response in pool.stub.Generate(request, timeout=10)]


def test_router_metrics_move_with_traffic(tmp_path: Path) -> None:
    fp32 = FakeWorker("fp32-0", "fp32", tpot_us=30_000)
    int4 = FakeWorker("int4-0", "int4-woq", loss_pct=0.3, tpot_us=10_000, cores=[1])

    async def scenario() -> None:
        async with running_pool([fp32, int4]) as pool:
            assert pool.servicer is not None
            endpoint = serve_metrics(pool.servicer.metrics.registry, "127.0.0.1", 0, tmp_path / "router.port")
            try:
                assert (tmp_path / "router.metrics.port").read_text().strip() == str(endpoint.port)
                before = await read(endpoint)
                assert value(before, "tierserve_router_worker_up", worker="fp32-0", tier="fp32") == 1
                assert total(before, "tierserve_router_requests_total") == 0

                await generate(pool)  # most accurate: fp32, no budget
                assert (await generate(pool, max_token_latency_ms=20))[-1].summary.budget_met  # int4
                await generate(pool, max_token_latency_ms=5)  # best effort on int4: missed
                await generate(pool, tier="fp32")
                with pytest.raises(grpc.aio.AioRpcError):
                    await generate(pool, max_token_latency_ms=5, strict=True)
                with pytest.raises(grpc.aio.AioRpcError):
                    await generate(pool, max_token_latency_ms=-1.0)

                # Two requests held at fp32's gate: one generating, one waiting behind it.
                while not fp32.arrivals.empty():
                    fp32.arrivals.get_nowait()
                fp32.gate.clear()
                held = [asyncio.ensure_future(generate(pool)) for _ in range(2)]
                for _ in held:
                    await fp32.arrivals.get()
                during = await read(endpoint)
                assert value(during, "tierserve_router_in_flight", worker="fp32-0", tier="fp32") == 2
                assert value(during, "tierserve_router_queue_depth", worker="fp32-0", tier="fp32") == 1
                assert value(during, "tierserve_router_queue_depth", worker="int4-0", tier="int4-woq") == 0
                fp32.gate.set()
                await asyncio.gather(*held)
                after = await read(endpoint)
            finally:
                endpoint.close()

        fp32_labels = {"tier": "fp32", "worker": "fp32-0"}
        int4_labels = {"tier": "int4-woq", "worker": "int4-0"}
        requests = "tierserve_router_requests_total"
        grpc_calls = {"protocol": "grpc"}
        assert value(after, requests, **fp32_labels, status="ok", **grpc_calls) == 4
        assert value(after, requests, **int4_labels, status="ok", **grpc_calls) == 2
        unrouted = {"tier": "none", "worker": "none", **grpc_calls}
        assert value(after, requests, **unrouted, status="resource_exhausted") == 1
        assert value(after, requests, **unrouted, status="invalid_argument") == 1

        decisions = "tierserve_router_routing_decisions_total"
        assert value(after, decisions, policy="slo", reason="eligible", tier="fp32") == 3
        assert value(after, decisions, policy="slo", reason="eligible", tier="int4-woq") == 1
        assert value(after, decisions, policy="slo", reason="best_effort", tier="int4-woq") == 1
        assert value(after, decisions, policy="slo", reason="pinned", tier="fp32") == 1
        # Validation failures are not routing decisions; the strict refusal is.
        assert value(after, decisions, policy="slo", reason="rejected", tier="none") == 1

        assert value(after, "tierserve_router_ttft_seconds_count", **fp32_labels, **grpc_calls) == 4
        assert value(after, "tierserve_router_tpot_seconds_count", **fp32_labels) == 4 * 3
        assert value(after, "tierserve_router_tpot_seconds_sum", **int4_labels) == pytest.approx(
            2 * 3 * 0.010
        )
        assert value(after, "tierserve_router_tokens_total", **int4_labels) == 8
        # Only the two requests with a budget count towards the SLO.
        assert value(after, "tierserve_router_slo_total", **int4_labels, result="met") == 1
        assert value(after, "tierserve_router_slo_total", **int4_labels, result="missed") == 1
        assert total(after, "tierserve_router_slo_total") == 2
        assert value(after, "tierserve_router_in_flight", **fp32_labels) == 0

    run(scenario)


def test_worker_metrics_move_with_traffic() -> None:
    async def scenario() -> None:
        executor = ThreadPoolExecutor(max_workers=1)
        servicer = WorkerServicer(worker_state(), LimitsConfig(), executor)

        def register(server: grpc.aio.Server) -> list[str]:
            worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
            return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

        handle = await start_server("127.0.0.1", 0, register)
        endpoint = serve_metrics(servicer.metrics.registry, "127.0.0.1", 0)
        try:
            labels = {"tier": "bf16", "worker": "bf16-0"}
            before = await read(endpoint)
            assert value(before, "tierserve_worker_model_load_seconds", **labels) == 2.5
            assert value(before, "tierserve_worker_warmup_seconds", **labels) == 0.8
            assert value(before, "tierserve_worker_ready", **labels) == 1
            assert value(before, "tierserve_worker_ttft_seconds_count", **labels) == 0
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                for budget in (0.0, 5.0, 50.0):
                    request = generate_pb2.GenerateRequest(prompt="hello", max_token_latency_ms=budget)
                    replies = [r async for r in stub.Generate(request, timeout=10)]
                    assert replies[-1].HasField("summary")
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Generate(generate_pb2.GenerateRequest(prompt=""), timeout=10).read()
            after = await read(endpoint)
        finally:
            endpoint.close()
            await handle.server.stop(0)
            executor.shutdown()

        assert value(after, "tierserve_worker_requests_total", **labels, status="ok") == 3
        assert value(after, "tierserve_worker_requests_total", **labels, status="invalid_argument") == 1
        assert value(after, "tierserve_worker_ttft_seconds_count", **labels) == 3
        assert value(after, "tierserve_worker_ttft_seconds_sum", **labels) == pytest.approx(3 * 0.040)
        assert value(after, "tierserve_worker_tpot_seconds_count", **labels) == 6
        assert value(after, "tierserve_worker_tpot_seconds_sum", **labels) == pytest.approx(3 * 0.026)
        assert value(after, "tierserve_worker_tokens_total", **labels) == 9
        assert value(after, "tierserve_worker_queue_time_seconds_count", **labels) == 3
        # Mean TPOT 13 ms: within 50 ms, not within 5 ms; the unbudgeted request is not counted.
        assert value(after, "tierserve_worker_slo_total", **labels, result="met") == 1
        assert value(after, "tierserve_worker_slo_total", **labels, result="missed") == 1
        assert value(after, "tierserve_worker_queue_depth", **labels) == 0
        assert value(after, "tierserve_worker_in_flight", **labels) == 0

    run(scenario)


def test_a_client_that_leaves_after_its_summary_counts_as_served(tmp_path: Path) -> None:
    # The SDKs stop reading at the summary; the worker's status may not have reached the router yet.
    worker = FakeWorker("fp32-0", "fp32")

    async def scenario() -> Samples:
        async with running_pool([worker]) as pool:
            assert pool.servicer is not None
            endpoint = serve_metrics(pool.servicer.metrics.registry, "127.0.0.1", 0, tmp_path / "router.port")
            try:
                worker.closing.clear()
                async with grpc.aio.insecure_channel(pool.address) as channel:
                    call = router_pb2_grpc.RouterStub(channel).Generate(
                        generate_pb2.GenerateRequest(prompt="hello", max_new_tokens=3)
                    )
                    async for response in call:
                        if response.HasField("summary"):
                            call.cancel()
                            break
                await asyncio.sleep(0.2)
                worker.closing.set()
                deadline = asyncio.get_running_loop().time() + 5
                while True:
                    after = await read(endpoint)
                    ended = total(after, "tierserve_router_requests_total")
                    if ended or asyncio.get_running_loop().time() > deadline:
                        return after
                    await asyncio.sleep(0.05)
            finally:
                endpoint.close()

    after = asyncio.run(scenario())
    labels = {"tier": "fp32", "worker": "fp32-0"}
    assert value(after, "tierserve_router_requests_total", **labels, status="ok", protocol="grpc") == 1
    assert total(after, "tierserve_router_requests_total") == 1
