"""Slow and silent clients cannot hold what others need: a client that stops reading its stream, one
that never sends (or oversizes) its request body, one that vanishes, and watchers beyond their cap.

The stalled client is a real gRPC channel with a flow-control window of 1 KB that never reads past
its first message; the bodiless one opens Generate as a client stream and never sends the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tierserve_client.options import MAX_MESSAGE_BYTES
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.unit.fake_engine import FakeEngine, worker_state
from tests.unit.fake_pool import FakeWorker, running_pool
from tests.unit.test_keepalive import SilentLink
from tierserve.domain.config import LimitsConfig, parse_config
from tierserve.router.limits import OpenStreams, peer_host
from tierserve.rpc.server import start_server
from tierserve.rpc.stalls import StalledStreamGuard, client_connection_options
from tierserve.worker.engine import Engine
from tierserve.worker.service import WorkerServicer

PROMPT = "p" * 40
IDLE_TIMEOUT_S = 1.0
# Released within the idle timeout plus this (a loaded machine schedules late); without the
# bound the place would be held until the client goes.
MARGIN_S = 5.0
# A client whose flow-control window is 1 KB: the server can send it a few dozen tokens, then
# waits for it to read.
STALLING = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
GENERATE = "/tierserve.v1.Router/Generate"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


async def until(condition: Callable[[], bool], within_s: float, what: str) -> float:
    """Seconds until `condition` holds; fails after `within_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within_s, f"{what}: not within {within_s:.0f} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def generate(stub: router_pb2_grpc.RouterStub, **fields: Any) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest(**{"prompt": PROMPT, "max_new_tokens": 3, **fields})
    return [response async for response in stub.Generate(request, timeout=10)]


async def refusal(stub: router_pb2_grpc.RouterStub, **fields: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, **fields)
    return caught.value


def test_a_client_that_stops_reading_gives_back_its_worker_and_its_place() -> None:
    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32")
        limits: dict[str, object] = {"stream_idle_timeout_s": IDLE_TIMEOUT_S}
        async with running_pool([fake], limits=limits, max_concurrent_per_peer=1) as pool:
            worker = pool.pool.workers[0]
            async with grpc.aio.insecure_channel(pool.address, options=STALLING) as stalled:
                request = generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=500)
                call = router_pb2_grpc.RouterStub(stalled).Generate(request)
                assert (await call.read()).token.index == 0  # streaming; from now on nobody reads
                assert worker.outstanding == 1
                # Its host may have one stream open: a second waits for this one to end.
                held = await refusal(pool.stub)
                assert held.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, held
                assert "127.0.0.1" in (held.details() or "")
                # The router stops waiting for the reader: the worker's place and the client's go back.
                await until(lambda: worker.outstanding == 0, IDLE_TIMEOUT_S + MARGIN_S, "worker place freed")
                assert (await generate(pool.stub))[-1].summary.generated_tokens == 3
                call.cancel()

    run(scenario)


class ManyTokens(FakeEngine):
    """Tokens enough to fill any flow-control window a stalled client leaves."""

    latencies_us = (1_000,) * 2_000


def test_a_worker_stream_its_reader_stops_reading_gives_back_the_model() -> None:
    async def scenario() -> None:
        state = worker_state()
        assert state.load_report is not None
        state.ready(cast(Engine, ManyTokens()), state.load_report)
        executor = ThreadPoolExecutor(max_workers=1)
        servicer = WorkerServicer(state, LimitsConfig(), executor)

        def register(server: grpc.aio.Server) -> list[str]:
            worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
            return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

        handle = await start_server(
            "127.0.0.1", 0, register, interceptors=[StalledStreamGuard(IDLE_TIMEOUT_S)]
        )
        address = f"127.0.0.1:{handle.port}"
        try:
            async with grpc.aio.insecure_channel(address, options=STALLING) as stalled:
                call = worker_pb2_grpc.WorkerStub(stalled).Generate(generate_pb2.GenerateRequest(prompt="hi"))
                await call.read()
                assert state.in_flight == 1  # the model is this stream's while it is stalled
                await until(lambda: state.in_flight == 0, IDLE_TIMEOUT_S + MARGIN_S, "model slot freed")
                async with grpc.aio.insecure_channel(address) as reader:
                    stub = worker_pb2_grpc.WorkerStub(reader)
                    replies = [r async for r in stub.Generate(generate_pb2.GenerateRequest(prompt="hi"))]
                    assert replies[-1].summary.generated_tokens == len(ManyTokens.latencies_us)
                call.cancel()
        finally:
            await handle.server.stop(0)
            executor.shutdown()

    run(scenario)


async def never() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""  # pragma: no cover - never reached


def test_calls_without_a_body_or_with_one_too_large_hold_no_place(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("secret-a alice 1\n")
    alice = (("authorization", "Bearer secret-a"),)

    async def scenario() -> None:
        security: dict[str, object] = {"tokens_file": str(tokens)}
        async with running_pool([FakeWorker("fp32-0", "fp32")], security=security) as pool:
            channel = grpc.aio.insecure_channel(pool.address, options=[("grpc.max_send_message_length", -1)])
            # Headers only: the request never comes, and the call is left pending, then cancelled.
            silent = channel.stream_stream(GENERATE, request_serializer=bytes, response_deserializer=bytes)
            waiting = silent(never(), metadata=alice)
            cancelled = silent(never(), metadata=alice)
            await asyncio.sleep(0.2)
            cancelled.cancel()
            # A body over the message limit is refused by gRPC before any handler runs.
            oversized = generate_pb2.GenerateRequest(prompt="x" * (MAX_MESSAGE_BYTES + 1))
            stub = router_pb2_grpc.RouterStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as too_large:
                await stub.Generate(oversized, metadata=alice, timeout=10).read()
            assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # None of them took alice's one place.
            replies = [
                r async for r in stub.Generate(generate_pb2.GenerateRequest(prompt=PROMPT), metadata=alice)
            ]
            assert replies[-1].HasField("summary")
            waiting.cancel()
            await channel.close()

    run(scenario)


def test_without_tokens_each_host_has_a_bounded_number_of_streams() -> None:
    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32")
        async with running_pool([fake], max_concurrent_per_peer=2) as pool:
            fake.gate.clear()
            held = [asyncio.create_task(generate(pool.stub)) for _ in range(2)]
            for _ in held:
                await fake.arrivals.get()
            over = await refusal(pool.stub)
            assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(over.trailing_metadata() or ())["retry-after-ms"] == "1000"
            fake.gate.set()
            for task in held:
                assert (await task)[-1].HasField("summary")
            assert (await generate(pool.stub))[-1].HasField("summary")

    run(scenario)


def test_watchers_are_capped_per_client_and_in_all() -> None:
    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32")
        async with running_pool([fake], max_watchers_per_client=2) as pool:
            channel = grpc.aio.insecure_channel(pool.address)
            health = health_pb2_grpc.HealthStub(channel)
            stats = pool.stub.WatchStats(router_pb2.WatchStatsRequest(interval_ms=100))
            watch = health.Watch(health_pb2.HealthCheckRequest())
            await stats.read()
            await watch.read()
            for third in (
                pool.stub.WatchStats(router_pb2.WatchStatsRequest(interval_ms=100)),
                health.Watch(health_pb2.HealthCheckRequest()),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await third.read()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "watches" in (refused.value.details() or "")
            stats.cancel()
            # A place is back once a watch ends.
            deadline = time.monotonic() + 5
            while True:
                again = pool.stub.WatchStats(router_pb2.WatchStatsRequest(interval_ms=100))
                try:
                    await again.read()
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the ended watch kept its place"
                    await asyncio.sleep(0.02)
            again.cancel()
            watch.cancel()
            await channel.close()
        async with running_pool([FakeWorker("fp32-0", "fp32")], max_watchers=1) as pool:
            first = pool.stub.WatchStats(router_pb2.WatchStatsRequest(interval_ms=100))
            await first.read()
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await pool.stub.WatchStats(router_pb2.WatchStatsRequest(interval_ms=100)).read()
            assert "this server already has 1" in (full.value.details() or "")
            first.cancel()

    run(scenario)


def test_a_watcher_that_stops_reading_holds_no_one_up() -> None:
    async def scenario() -> None:
        handle = await start_server("127.0.0.1", 0, lambda server: [])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}", options=STALLING) as stalled:
                watch = health_pb2_grpc.HealthStub(stalled).Watch(health_pb2.HealthCheckRequest())
                await watch.read()
                # Each change is one message to a watcher that no longer reads: its window fills.
                for flip in range(600):
                    await asyncio.wait_for(handle.set_serving(flip % 2 == 0), timeout=2)
                watch.cancel()
        finally:
            await handle.server.stop(0)

    run(scenario)


def test_a_client_that_vanishes_is_dropped_by_keepalive() -> None:
    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32")
        async with running_pool(
            [fake], client_keepalive_time_s=1.0, client_keepalive_timeout_s=1.0, max_concurrent_per_peer=1
        ) as pool:
            link = SilentLink(int(pool.address.rpartition(":")[2]))
            await link.start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{link.port}") as far:
                fake.gate.clear()  # the stream waits for its first token: nothing is written to the client
                call = router_pb2_grpc.RouterStub(far).Generate(generate_pb2.GenerateRequest(prompt=PROMPT))
                await fake.arrivals.get()
                link.cut()
                worker = pool.pool.workers[0]
                await until(lambda: worker.outstanding == 0, 2 + MARGIN_S, "vanished client's place freed")
                fake.gate.set()
                assert (await generate(pool.stub))[-1].HasField("summary")
                call.cancel()
            await link.close()

    run(scenario)


def test_connection_options_bound_what_clients_hold() -> None:
    options = dict(client_connection_options(30, 20, 300, 100))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 20_000
    # Pings go on while a stalled stream sends nothing (gRPC stops after two by default).
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.max_concurrent_streams"] == 100
    assert "grpc.max_connection_idle_ms" not in dict(client_connection_options(30, 20, 0, 100))
    config = parse_config({"workers": [{"name": "w", "tier": "fp32"}]})
    assert config.router.max_concurrent_per_peer == 64 and config.limits.stream_idle_timeout_s == 30
    with pytest.raises(ValueError, match="positive"):
        StalledStreamGuard(0)


def test_peers_are_counted_by_host() -> None:
    assert peer_host("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/run/tierserve.sock") == "unix:/run/tierserve.sock"
    streams = OpenStreams("streams", 1, total=2)
    assert streams.refusal("a", 1) is None
    streams.take("a")
    assert "client a already has 1 streams" in (streams.refusal("a", 1) or "")
    streams.take("b")
    assert "already has 2 streams" in (streams.refusal("c", 1) or "")
    streams.give_back("a")
    streams.give_back("b")
    assert streams.in_all == 0 and not streams.open
