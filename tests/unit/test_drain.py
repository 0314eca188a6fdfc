"""Graceful drain of the router in front of fake streaming workers, in-process on port 0: on the
first signal health turns NOT_SERVING and new Generate calls are UNAVAILABLE with a retry hint at
once, the streams in flight finish, then the server stops, then the worker channels close, in that
order; the grace period and a second signal cut the wait short. And `tierserve up`'s stop order
(tests/integration/test_drain.py runs it on the default model)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.unit.fake_pool import FakeWorker
from tierserve.domain.config import TierserveConfig, parse_config
from tierserve.ops.launcher import ROUTER_STOP_MARGIN_S, ManagedProcess, PoolLauncher
from tierserve.router.app import Router, build_router
from tierserve.router.server import serve_until_drained
from tierserve.rpc.drain import DRAIN_RETRY_MS, StopSignals
from tierserve.rpc.server import ServerHandle, start_server

REQUEST = generate_pb2.GenerateRequest(prompt="p" * 40, max_new_tokens=4)


@dataclass
class Draining:
    """A router serving until `signals` says stop (in `serving`), its fake worker, and what happened
    when, in order (`events`)."""

    router: Router
    handle: ServerHandle
    worker: FakeWorker
    signals: StopSignals
    serving: asyncio.Task[None]
    channel: grpc.aio.Channel
    events: list[str]

    @property
    def stub(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel)

    async def health(self) -> int:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(reply.status)


@contextlib.asynccontextmanager
async def draining_router(monkeypatch: pytest.MonkeyPatch, drain_grace_s: float) -> AsyncIterator[Draining]:
    """One fake worker holding every stream at its gate, and a router in front of it, SERVING, run
    by the router process's own `serve_until_drained`."""
    fake = FakeWorker("bf16-0", "bf16")
    fake.gate.clear()

    def register(server: grpc.aio.Server) -> list[str]:
        worker_pb2_grpc.add_WorkerServicer_to_server(fake, server)
        return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

    worker = await start_server("127.0.0.1", 0, register)
    await worker.set_serving(True)
    config: TierserveConfig = parse_config(
        {
            "router": {"port": 0, "health_interval_s": 0.05, "drain_grace_s": drain_grace_s},
            "workers": [{"name": fake.name, "tier": fake.tier, "address": f"127.0.0.1:{worker.port}"}],
        }
    )
    router = build_router(config)
    handle = await router.start()
    events: list[str] = []

    def recorded(name: str, step: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def run(*args: object) -> None:
            events.append(f"{name} ({handle.drain.in_flight} in flight)")
            await step(*args)

        return run

    # The steps whose order the drain promises, recorded as they start, with the streams still open.
    monkeypatch.setattr(handle.server, "stop", recorded("server stopped", handle.server.stop))
    monkeypatch.setattr(router.pool, "close", recorded("worker channels closed", router.pool.close))
    signals = StopSignals()
    serving = asyncio.create_task(serve_until_drained(router, handle, signals))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    draining = Draining(router, handle, fake, signals, serving, channel, events)
    try:
        while await draining.health() != health_pb2.HealthCheckResponse.SERVING:
            await asyncio.sleep(0.02)
        yield draining
    finally:
        fake.gate.set()
        signals.received()
        signals.received()
        await serving
        await channel.close()
        await worker.server.stop(0)


async def stream(draining: Draining, request_id: str) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest()
    request.CopyFrom(REQUEST)
    request.request_id = request_id
    return [r async for r in draining.stub.Generate(request, timeout=30)]


async def in_flight(draining: Draining, request_id: str) -> asyncio.Task[list[generate_pb2.GenerateResponse]]:
    """A stream the fake worker holds at its gate, once it has arrived there."""
    task = asyncio.create_task(stream(draining, request_id))
    assert await asyncio.wait_for(draining.worker.arrivals.get(), 5) == request_id
    return task


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


def test_a_signal_refuses_new_calls_then_streams_finish_then_server_stops_then_channels_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        async with draining_router(monkeypatch, drain_grace_s=30) as draining:
            held = await in_flight(draining, "held")
            draining.signals.received()
            while not draining.handle.drain.closed:
                await asyncio.sleep(0)
            # At once, while the stream is still held: NOT_SERVING, and new calls go elsewhere.
            assert await draining.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stream(draining, "late")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
            assert dict(refused.value.trailing_metadata() or ())["retry-after-ms"] == str(DRAIN_RETRY_MS)
            # Other calls still answer while the stream runs: the pool listing, health.
            assert (await draining.stub.ListWorkers(router_pb2.ListWorkersRequest())).workers
            await asyncio.sleep(0.3)
            assert not held.done() and not draining.serving.done() and draining.events == []
            # The pool's health rounds (every 0.05 s) ran meanwhile and did not turn it SERVING again.
            assert await draining.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            draining.worker.gate.set()
            # The whole stream, and its OK status: nothing was cut.
            summary = (await held)[-1].summary
            assert summary.request_id == "held" and summary.generated_tokens == REQUEST.max_new_tokens
            await asyncio.wait_for(draining.serving, 10)
            assert draining.events == ["server stopped (0 in flight)", "worker channels closed (0 in flight)"]
            assert "late" not in [r.request_id for r in draining.worker.requests]

    run(scenario)


def test_streams_still_running_when_the_grace_period_ends_are_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        async with draining_router(monkeypatch, drain_grace_s=0.5) as draining:
            held = await in_flight(draining, "held")
            started = time.monotonic()
            draining.signals.received()
            await asyncio.wait_for(draining.serving, 10)
            assert 0.5 <= time.monotonic() - started < 5
            # The server stops (cancelling the stream) before the channel the stream used closes.
            assert draining.events == ["server stopped (1 in flight)", "worker channels closed (0 in flight)"]
            with pytest.raises(grpc.aio.AioRpcError):
                await held

    run(scenario)


def test_a_second_signal_stops_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with draining_router(monkeypatch, drain_grace_s=60) as draining:
            held = await in_flight(draining, "held")
            draining.signals.received()
            await asyncio.sleep(0.3)
            assert not draining.serving.done()
            started = time.monotonic()
            draining.signals.received()
            await asyncio.wait_for(draining.serving, 5)
            assert time.monotonic() - started < 3
            assert draining.events == ["server stopped (1 in flight)", "worker channels closed (0 in flight)"]
            with pytest.raises(grpc.aio.AioRpcError):
                await held

    run(scenario)


def test_an_idle_router_stops_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with draining_router(monkeypatch, drain_grace_s=60) as draining:
            started = time.monotonic()
            draining.signals.received()
            await asyncio.wait_for(draining.serving, 5)
            assert time.monotonic() - started < 3
            assert draining.events == ["server stopped (0 in flight)", "worker channels closed (0 in flight)"]

    run(scenario)


# ---------------------------------------------------------------- `tierserve up`

# Stands in for a router or worker process: notes when SIGTERM arrives and when it exits, taking
# `delay` seconds in between (a router draining its streams).
STAND_IN = """
import signal, sys, time
log, delay = sys.argv[1], float(sys.argv[2])
def stop(signum, frame):
    with open(log, "a") as out:
        out.write(f"{time.monotonic()} term\\n")
    time.sleep(delay)
    with open(log, "a") as out:
        out.write(f"{time.monotonic()} exit\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(log + ".ready", "w").close()
while True:
    time.sleep(0.05)
"""


def stand_in(tmp_path: Path, name: str, delay_s: float) -> ManagedProcess:
    log = tmp_path / f"{name}.events"
    process = subprocess.Popen([sys.executable, "-c", STAND_IN, str(log), str(delay_s)])
    deadline = time.monotonic() + 30
    while not Path(f"{log}.ready").exists():
        assert time.monotonic() < deadline and process.poll() is None, f"{name} did not start"
        time.sleep(0.05)
    return ManagedProcess(name, process, log, tmp_path / f"{name}.port")


def events(managed: ManagedProcess) -> dict[str, float]:
    lines = managed.log_path.read_text().split()
    return {lines[i + 1]: float(lines[i]) for i in range(0, len(lines), 2)}


def test_the_launcher_stops_the_workers_only_after_the_router_has_drained(tmp_path: Path) -> None:
    config = parse_config({"router": {"drain_grace_s": 3}, "workers": [{"name": "w", "tier": "fp32"}]})
    launcher = PoolLauncher(config, tmp_path, Console(file=open("/dev/null", "w")))  # noqa: SIM115
    # A router that takes 1.5 s to drain: longer than a worker takes to stop.
    launcher.router = stand_in(tmp_path, "router", 1.5)
    launcher.workers = [stand_in(tmp_path, "worker", 0)]
    try:
        launcher.stop()
        router, worker = events(launcher.router), events(launcher.workers[0])
        assert router["exit"] - router["term"] >= 1.5
        assert worker["term"] >= router["exit"], "a worker was stopped while the router still drained"
        assert launcher.router.process.returncode == 0 == launcher.workers[0].process.returncode
    finally:
        for managed in [launcher.router, *launcher.workers]:
            managed.process.kill()
            managed.process.wait()


def test_the_launcher_gives_the_router_its_drain_grace_and_a_margin(tmp_path: Path) -> None:
    config = parse_config({"router": {"drain_grace_s": 1}, "workers": [{"name": "w", "tier": "fp32"}]})
    launcher = PoolLauncher(config, tmp_path, Console(file=open("/dev/null", "w")))  # noqa: SIM115
    # Longer than the launcher's plain stop timeout would allow a router without a drain.
    launcher.router = stand_in(tmp_path, "router", 0.5)
    waited: list[float | None] = []
    wait = launcher.router.process.wait

    def recording_wait(timeout: float | None = None) -> int:
        waited.append(timeout)
        return wait(timeout)

    launcher.router.process.wait = recording_wait  # type: ignore[method-assign]
    try:
        launcher.stop()
        assert waited and waited[0] is not None
        assert 1 + ROUTER_STOP_MARGIN_S - 1 < waited[0] <= 1 + ROUTER_STOP_MARGIN_S
    finally:
        launcher.router.process.kill()
        wait()
