"""HTTP/2 keepalive between the router and its workers: the router's channels ping, the servers
accept those pings, and a worker whose link goes silent mid-stream (no FIN, no RST: a cut cable)
fails that stream within seconds, so the request resumes on another worker with no seam. The
cut link is a TCP proxy in front of one fake worker that stops forwarding, in either direction."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.unit.fake_pool import FakeWorker
from tierserve.domain.config import ConfigError, TierserveConfig, parse_config
from tierserve.router.app import build_router
from tierserve.router.pool import worker_channel_args
from tierserve.rpc.server import MIN_PING_INTERVAL_MS, SERVER_OPTIONS, start_server

PROMPT = "p" * 40  # one word: a counting worker continues with " w1", " w2", ...
NEW_TOKENS = 60
CUT_AFTER = 5  # tokens the client has when the link goes silent
KEEPALIVE_S = 1.0
# Keepalive notices within about time + timeout (2 s here); a stream that nothing notices would
# stall until the call's deadline (30 s).
RESUMED_WITHIN_S = 8.0


def config_with(**router: object) -> TierserveConfig:
    return parse_config({"router": router, "workers": [{"name": "w", "tier": "fp32"}]})


def test_worker_channels_carry_keepalive() -> None:
    options = dict(worker_channel_args(config_with()))
    assert options["grpc.keepalive_time_ms"] == 5000
    assert options["grpc.keepalive_timeout_ms"] == 5000
    assert options["grpc.http2.ping_timeout_ms"] == 5000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
    options = dict(worker_channel_args(config_with(keepalive_time_s=2.5, keepalive_timeout_s=1.5)))
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (2500, 1500)
    assert options["grpc.http2.ping_timeout_ms"] == 1500
    # The message limits and the rest stay.
    assert "grpc.max_receive_message_length" in options


def test_servers_accept_the_routers_pings() -> None:
    options = dict(SERVER_OPTIONS)
    # Else a worker answers pings between calls, or more often than every 5 minutes, with GOAWAY.
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == MIN_PING_INTERVAL_MS
    # The router may not ping more often than its workers accept.
    assert config_with(keepalive_time_s=MIN_PING_INTERVAL_MS / 1000)
    with pytest.raises(ConfigError, match="keepalive_time_s"):
        config_with(keepalive_time_s=MIN_PING_INTERVAL_MS / 1000 / 2)
    with pytest.raises(ConfigError, match="keepalive_timeout_s"):
        config_with(keepalive_timeout_s=0)


class SilentLink:
    """A TCP proxy to `upstream` that forwards until `cut()`, then swallows every byte either way
    while keeping both connections open, as a cut cable does (nothing is refused or reset)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._cut = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self._cut = True

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if not self._cut:
                    sink.write(data)
                    await sink.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.close()


@contextlib.asynccontextmanager
async def pool_with_a_link(
    behind_link: FakeWorker, direct: FakeWorker
) -> AsyncIterator[tuple[router_pb2_grpc.RouterStub, SilentLink]]:
    """A router (keepalive every second) dialling `behind_link` through a SilentLink and `direct`."""
    handles = []
    for fake in (behind_link, direct):

        def register(server: grpc.aio.Server, fake: FakeWorker = fake) -> list[str]:
            worker_pb2_grpc.add_WorkerServicer_to_server(fake, server)
            return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

        handle = await start_server("127.0.0.1", 0, register)
        await handle.set_serving(True)
        handles.append(handle)
    link = SilentLink(handles[0].port)
    await link.start()
    config = parse_config(
        {
            "router": {
                "port": 0,
                "health_interval_s": 0.05,
                "keepalive_time_s": KEEPALIVE_S,
                "keepalive_timeout_s": KEEPALIVE_S,
            },
            "workers": [
                {"name": behind_link.name, "tier": behind_link.tier, "address": f"127.0.0.1:{link.port}"},
                {"name": direct.name, "tier": direct.tier, "address": f"127.0.0.1:{handles[1].port}"},
            ],
        }
    )
    router = build_router(config)
    router_handle = await router.start()
    await router.pool.first_round_done.wait()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router_handle.port}")
    try:
        yield router_pb2_grpc.RouterStub(channel), link
    finally:
        await channel.close()
        await router_handle.server.stop(0)
        await router.pool.close()
        await link.close()
        for handle in handles:
            await handle.server.stop(0)


def test_a_stream_whose_link_goes_silent_resumes_on_another_worker_within_seconds() -> None:
    async def scenario() -> None:
        # fp32 first: the slo policy prefers it (most accurate); bf16 takes over.
        far = FakeWorker("fp32-0", "fp32", count_words=True, token_delay_s=0.05)
        near = FakeWorker("bf16-0", "bf16", cores=[1], count_words=True)
        async with pool_with_a_link(far, near) as (stub, link):
            request = generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=NEW_TOKENS)
            responses = []
            cut_at = 0.0
            async for response in stub.Generate(request, timeout=30):
                responses.append(response)
                if len(responses) == CUT_AFTER:
                    link.cut()
                    cut_at = time.monotonic()
            resumed_in_s = time.monotonic() - cut_at
        tokens = [r.token for r in responses[:-1]]
        summary = responses[-1].summary
        assert [t.index for t in tokens] == list(range(NEW_TOKENS)), "duplicated or missing indexes"
        assert "".join(t.text for t in tokens) == "".join(f" w{1 + i}" for i in range(NEW_TOKENS))
        assert summary.generated_tokens == NEW_TOKENS
        assert (summary.worker_id, list(summary.failed_workers)) == ("bf16-0", ["fp32-0"])
        assert summary.resumed_after_tokens >= CUT_AFTER
        assert "UNAVAILABLE" in summary.routing_reason, summary.routing_reason
        assert resumed_in_s < RESUMED_WITHIN_S, f"the silent link was noticed after {resumed_in_s:.1f} s"

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
