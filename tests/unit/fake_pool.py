"""A router in front of fake streaming workers, all in-process on port 0: no model needed.

A fake worker streams tokens with set latencies, reports a set accuracy card and
warm-up figures, and can hold every stream at a gate so tests build queues
deterministically (an event, not a sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from router.policy import make_policy
from router.pool import WorkerPool
from router.service import RouterServicer
from tierserve.config import TierserveConfig
from tierserve.grpcserver import start_server
from tierserve.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc


@dataclass
class FakeWorker(worker_pb2_grpc.WorkerServicer):
    name: str
    tier: str
    loss_pct: float = 0.0
    ttft_us: int = 20_000
    tpot_us: int = 10_000
    cores: list[int] = field(default_factory=lambda: [0])
    # While clear, streams wait before their first token.
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    # Request ids in arrival order.
    arrivals: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.gate.set()

    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            worker_id=self.name,
            tier=self.tier,
            cores=self.cores,
            accuracy=worker_pb2.AccuracyCard(perplexity_delta_pct=self.loss_pct, measured=True),
            warmup_latency=worker_pb2.LatencyStats(
                ttft_p50_us=self.ttft_us, tpot_p50_us=self.tpot_us, samples=16
            ),
            warmup_prompt_tokens=10,
            chars_per_token=4.0,
        )

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        await self.arrivals.put(request.request_id)
        await self.gate.wait()
        count = request.max_new_tokens or 4
        for index in range(count):
            latency = self.ttft_us if index == 0 else self.tpot_us
            yield generate_pb2.GenerateResponse(
                token=generate_pb2.Token(text=" x", id=1, index=index, latency_us=latency)
            )
            await asyncio.sleep(0)
        yield generate_pb2.GenerateResponse(
            summary=generate_pb2.Summary(
                request_id=request.request_id,
                worker_id=self.name,
                tier=self.tier,
                prompt_tokens=max(1, len(request.prompt) // 4),
                generated_tokens=count,
                ttft_us=self.ttft_us,
                tpot_mean_us=self.tpot_us,
                budget_met=True,
                text=" x" * count,
            )
        )


@dataclass
class RunningPool:
    address: str
    pool: WorkerPool
    stub: router_pb2_grpc.RouterStub
    # The router's servicer, for tests that read its metrics.
    servicer: RouterServicer | None = None


@contextlib.asynccontextmanager
async def running_pool(workers: list[FakeWorker], **router: object) -> AsyncIterator[RunningPool]:
    handles = []
    for fake in workers:

        def register(server: grpc.aio.Server, fake: FakeWorker = fake) -> list[str]:
            worker_pb2_grpc.add_WorkerServicer_to_server(fake, server)
            return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

        handle = await start_server("127.0.0.1", 0, register)
        await handle.set_serving(True)
        handles.append(handle)
    config = TierserveConfig.model_validate(
        {
            "router": {"port": 0, "health_interval_s": 0.05, **router},
            "workers": [
                {"name": f.name, "tier": f.tier, "address": f"127.0.0.1:{h.port}"}
                for f, h in zip(workers, handles, strict=True)
            ],
        }
    )
    pool = WorkerPool(config)
    servicer = RouterServicer(pool, make_policy(config.router.policy), config.limits, config.service_level)

    def register_router(server: grpc.aio.Server) -> list[str]:
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

    router_handle = await start_server("127.0.0.1", 0, register_router)
    pool.start()
    await pool.first_round_done.wait()
    address = f"127.0.0.1:{router_handle.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield RunningPool(address, pool, router_pb2_grpc.RouterStub(channel), servicer)
    finally:
        await channel.close()
        await router_handle.server.stop(0)
        await pool.close()
        for handle in handles:
            await handle.server.stop(0)
