"""The router's view of its workers: channels, health, descriptions and relayed latency."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierserve.config import TierserveConfig
from tierserve.grpcserver import CHANNEL_OPTIONS
from tierserve.latency import LatencyWindow
from tierserve.v1 import router_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
# Describe again every this many health rounds, for the worker's own live figures.
DESCRIBE_EVERY = 5


@dataclass
class WorkerHandle:
    """One worker: how to reach it and what the router has seen of it."""

    worker_id: str
    tier: str
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    relayed: LatencyWindow
    health: router_pb2.WorkerHealth.ValueType = router_pb2.WORKER_HEALTH_UNSPECIFIED
    info: worker_pb2.WorkerInfo | None = None
    in_flight: int = 0
    requests_total: int = 0
    requests_failed: int = 0
    last_error: str = ""
    _rounds: int = field(default=0, repr=False)

    @property
    def healthy(self) -> bool:
        return self.health == router_pb2.WORKER_HEALTH_SERVING

    @property
    def quality_loss_pct(self) -> float | None:
        if self.info is None or not self.info.accuracy.measured:
            return None
        return float(self.info.accuracy.perplexity_delta_pct)

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count a relayed request; a failure is recorded by the caller via `record_failure`."""
        self.in_flight += 1
        self.requests_total += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def record_failure(self, message: str) -> None:
        self.requests_failed += 1
        self.last_error = message

    def to_proto(self) -> router_pb2.WorkerStatus:
        status = router_pb2.WorkerStatus(
            worker_id=self.worker_id,
            address=self.address,
            health=self.health,
            relayed_latency=self.relayed.to_proto(),
            in_flight=self.in_flight,
            requests_total=self.requests_total,
            requests_failed=self.requests_failed,
            last_error=self.last_error,
        )
        if self.info is not None:
            status.info.CopyFrom(self.info)
        else:
            status.info.worker_id, status.info.tier = self.worker_id, self.tier
        return status


class WorkerPool:
    """All configured workers, with a background task that keeps their health current."""

    def __init__(
        self, config: TierserveConfig, on_round: Callable[[WorkerPool], Awaitable[None]] | None = None
    ) -> None:
        self.workers: list[WorkerHandle] = []
        self._on_round = on_round
        for worker in config.workers:
            channel = grpc.aio.insecure_channel(worker.dial_address(), options=CHANNEL_OPTIONS)
            self.workers.append(
                WorkerHandle(
                    worker_id=worker.name,
                    tier=worker.tier,
                    address=worker.dial_address(),
                    channel=channel,
                    stub=worker_pb2_grpc.WorkerStub(channel),
                    relayed=LatencyWindow(config.router.latency_window),
                )
            )
        self._interval_s = config.router.health_interval_s
        self._task: asyncio.Task[None] | None = None
        self.first_round_done = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._health_loop(), name="worker-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for worker in self.workers:
            await worker.channel.close()

    def by_id(self, worker_id: str) -> WorkerHandle:
        return next(w for w in self.workers if w.worker_id == worker_id)

    def any_healthy(self) -> bool:
        return any(w.healthy for w in self.workers)

    def snapshot(self) -> list[router_pb2.WorkerStatus]:
        return [w.to_proto() for w in self.workers]

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(worker) for worker in self.workers))
            self.first_round_done.set()
            if self._on_round is not None:
                await self._on_round(self)
            await asyncio.sleep(self._interval_s)

    async def check(self, worker: WorkerHandle) -> None:
        """Ask the worker's grpc.health.v1 service; describe it when it turns healthy, and now and then."""
        health_stub = health_pb2_grpc.HealthStub(worker.channel)
        was_healthy = worker.healthy
        try:
            reply = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            worker.health = (
                router_pb2.WORKER_HEALTH_SERVING if serving else router_pb2.WORKER_HEALTH_NOT_SERVING
            )
            if serving and (not was_healthy or worker.info is None or worker._rounds % DESCRIBE_EVERY == 0):
                worker.info = await worker.stub.Describe(
                    worker_pb2.DescribeRequest(), timeout=HEALTH_TIMEOUT_S
                )
        except grpc.aio.AioRpcError as error:
            worker.health = router_pb2.WORKER_HEALTH_UNREACHABLE
            if was_healthy:
                log.warning(
                    "worker %s at %s unreachable: %s", worker.worker_id, worker.address, error.details()
                )
        if worker.healthy != was_healthy:
            log.info("worker %s is now %s", worker.worker_id, router_pb2.WorkerHealth.Name(worker.health))
        worker._rounds += 1
