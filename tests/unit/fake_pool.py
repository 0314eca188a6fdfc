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
from pathlib import Path

import grpc
from tierserve_client.v1 import generate_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tierserve.domain.config import SecurityConfig, TierserveConfig
from tierserve.router.app import build_router
from tierserve.router.http.server import start_http_api
from tierserve.router.pool import WorkerPool
from tierserve.router.service import RouterServicer
from tierserve.rpc.server import start_server
from tierserve.rpc.tls import worker_interceptors, worker_server_credentials


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
    # Failure injection: after this many tokens every stream ends with `fail_code`, as a worker
    # whose process died or crashed would; None: never.
    fail_after: int | None = None
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    # After this many tokens streams set `holding` and stop until the test acts (e.g. stops the server).
    hold_after: int | None = None
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    # Token texts continue the prompt's word count (" w3", " w4", ...), like a model continuing its
    # prompt, so a resumed stream's text can be checked for seams.
    count_words: bool = False
    # Every request received, as received.
    requests: list[generate_pb2.GenerateRequest] = field(default_factory=list)
    # Real time spent on each token (0: none), for load tests that need a busy worker.
    token_delay_s: float = 0.0
    # While clear, streams stay open after their summary, as a busy worker's can before its status.
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    # The model ends generation with end of sequence at this token index (marked as the last token,
    # as real workers mark it); None: streams run to max_new_tokens.
    eos_at: int | None = None
    # Streams take turns token by token: one token at a time, like one model (with token_delay_s).
    _slot: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.gate.set()
        self.closing.set()

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
        self.requests.append(request)
        await self.arrivals.put(request.request_id)
        await self.gate.wait()
        count = request.max_new_tokens or 4
        if self.eos_at is not None:
            count = min(count, self.eos_at + 1)
        # A resumed stream continues its prefix (the text streamed before the failover).
        prompt = request.prompt + request.response_prefix
        words = len(prompt.split())
        texts = []
        for index in range(count):
            if index == self.fail_after:
                await context.abort(self.fail_code, f"{self.name} failed on purpose")
            if index == self.hold_after:
                self.holding.set()
                await asyncio.Event().wait()
            latency = self.ttft_us if index == 0 else self.tpot_us
            texts.append(f" w{words + index}" if self.count_words else " x")
            token = generate_pb2.Token(
                text=texts[-1], id=100 + words + index, index=index, latency_us=latency
            )
            if index == self.eos_at:
                token.finish_reason = generate_pb2.FINISH_REASON_EOS
            yield generate_pb2.GenerateResponse(token=token)
            if self.token_delay_s:
                async with self._slot:
                    await asyncio.sleep(self.token_delay_s)
            else:
                await asyncio.sleep(0)
        if self.fail_after is not None and self.fail_after >= count:  # after the last token
            await context.abort(self.fail_code, f"{self.name} failed on purpose")
        yield generate_pb2.GenerateResponse(
            summary=generate_pb2.Summary(
                request_id=request.request_id,
                worker_id=self.name,
                tier=self.tier,
                prompt_tokens=max(1, len(prompt) // 4),
                generated_tokens=count,
                ttft_us=self.ttft_us,
                tpot_mean_us=self.tpot_us,
                budget_met=True,
                text="".join(texts),
            )
        )
        await self.closing.wait()


@dataclass
class RunningPool:
    address: str
    pool: WorkerPool
    stub: router_pb2_grpc.RouterStub
    # The router's servicer, for tests that read its metrics.
    servicer: RouterServicer
    # The fake workers' servers, in the order given, for tests that stop one.
    worker_servers: list[grpc.aio.Server] = field(default_factory=list)
    # The OpenAI-compatible API's base URL ("http://127.0.0.1:PORT/v1") when started (`http=True`).
    http_url: str = ""


@contextlib.asynccontextmanager
async def running_pool(
    workers: list[FakeWorker],
    security: dict[str, object] | None = None,
    limits: dict[str, object] | None = None,
    http: bool = False,
    **router: object,
) -> AsyncIterator[RunningPool]:
    """A router built as the router process builds it (TLS, mutual TLS to the workers and tokens as
    `security`, a [security] table, configures; `limits` a [limits] table), except that it stays
    NOT_SERVING. With `http`, the OpenAI-compatible API too, on a free port."""
    secured = SecurityConfig.model_validate(security or {})
    handles = []
    for fake in workers:

        def register(server: grpc.aio.Server, fake: FakeWorker = fake) -> list[str]:
            worker_pb2_grpc.add_WorkerServicer_to_server(fake, server)
            return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

        credentials = worker_server_credentials(secured, fake.name)
        handle = await start_server(
            "127.0.0.1", 0, register, credentials=credentials, interceptors=worker_interceptors(secured)
        )
        await handle.set_serving(True)
        handles.append(handle)
    config = TierserveConfig.model_validate(
        {
            "router": {"port": 0, "http_port": 0, "health_interval_s": 0.05, **router},
            "security": security or {},
            "limits": limits or {},
            "workers": [
                {"name": f.name, "tier": f.tier, "address": f"127.0.0.1:{h.port}"}
                for f, h in zip(workers, handles, strict=True)
            ],
        }
    )
    app = build_router(config)
    router_handle = await app.start(follow_pool_health=False)
    await app.pool.first_round_done.wait()
    api = await start_http_api(app, [router_handle.drain]) if http else None
    address = f"127.0.0.1:{router_handle.port}"
    channel = (
        grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(Path(secured.ca).read_bytes()))
        if secured.router_tls
        else grpc.aio.insecure_channel(address)
    )
    try:
        yield RunningPool(
            address,
            app.pool,
            router_pb2_grpc.RouterStub(channel),
            app.servicer,
            [h.server for h in handles],
            api.url if api is not None else "",
        )
    finally:
        if api is not None:
            await api.close()
        await channel.close()
        await router_handle.server.stop(0)
        await app.pool.close()
        for handle in handles:
            await handle.server.stop(0)
