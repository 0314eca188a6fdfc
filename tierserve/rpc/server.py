"""The skeleton every tierserve server shares: grpc.aio, health, reflection, graceful stop.

A server binds first (port 0 picks a free port, written to a port file so a
launcher or test can find it), reports NOT_SERVING until its owner says it is
ready, and on SIGTERM or SIGINT drains: it turns NOT_SERVING, refuses new work
(UNAVAILABLE with a retry hint), lets the work in flight finish within a grace
period (a second signal stops at once), and only then stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tierserve_client.options import MAX_MESSAGE_BYTES

from tierserve.rpc.decoding import RequestDecodingInterceptor
from tierserve.rpc.drain import DrainGate, StopSignals
from tierserve.rpc.health import HealthServicer

log = logging.getLogger(__name__)

# The most often a server accepts HTTP/2 keepalive pings from a peer (the router pings its
# workers every [router] keepalive_time_s, at least this): pings closer together while no data
# is sent count as strikes, and past a few (grpc.http2.max_ping_strikes, 2) the server ends the
# connection with GOAWAY too_many_pings. gRPC's default allows one ping every 5 minutes.
MIN_PING_INTERVAL_MS = 1000
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Accept the router's keepalive pings, between calls too (GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS,
    # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
]
STOP_GRACE_S = 5.0
# Once the work in flight has finished: time for the last statuses to reach their clients before
# the server cancels what is left (watch streams).
STOP_LINGER_S = 1.0


def keepalive_options(time_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Channel options that ping the peer every `time_s` and drop the connection when a ping goes
    unanswered for `timeout_s`: a peer whose network link is cut then fails its calls (UNAVAILABLE)
    within about `time_s + timeout_s`, where TCP alone would wait for minutes."""
    return [
        ("grpc.keepalive_time_ms", round(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(timeout_s * 1000)),
        # What gRPC core (1.85 at least) really waits for a ping's ack before it closes the
        # connection: with keepalive on it defaults to a minute, whatever keepalive_timeout_ms says.
        ("grpc.http2.ping_timeout_ms", round(timeout_s * 1000)),
        # Also between calls, so an idle connection is known dead before a request is sent on it.
        ("grpc.keepalive_permit_without_calls", 1),
        # No cap on pings sent while no data is (a stalled stream is exactly when they matter).
        ("grpc.http2.max_pings_without_data", 0),
    ]


class ServerHandle:
    """A started server and its health servicer; `mark_serving` flips every service to SERVING."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health: HealthServicer,
        services: list[str],
        port: int,
        drain: DrainGate | None = None,
    ):
        self.server = server
        self.health = health
        self.services = services
        self.port = port
        # Counts the work in flight, and refuses new work once the server drains.
        self.drain = drain if drain is not None else DrainGate(())

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ["", *self.services]:
            await self.health.set(service, status)


def write_port_file(path: Path, port: int) -> None:
    """Write atomically, so a reader never sees a half-written port."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{port}\n", encoding="utf-8")
    os.replace(tmp, path)


async def start_server(
    host: str,
    port: int,
    register: Callable[[grpc.aio.Server], list[str]],
    port_file: Path | None = None,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    work_methods: Collection[str] = (),
    options: Sequence[tuple[str, int]] = (),
) -> ServerHandle:
    """Create, register, bind and start a server; `register` adds servicers and returns their full names.
    With `credentials` it listens with TLS only; `interceptors` see every call (authentication).
    `work_methods` ("/package.Service/Method") are the calls a drain waits for and refuses anew;
    `options` add to SERVER_OPTIONS (e.g. keepalive towards clients, tierserve/rpc/stalls.py)."""
    # Inside the given interceptors, so a call they refuse is never counted as work and one they
    # count (per-client limits) is released when the drain refuses it.
    drain = DrainGate(work_methods)
    # Innermost: requests that do not parse are INVALID_ARGUMENT for every service.
    server = grpc.aio.server(
        options=[*SERVER_OPTIONS, *options], interceptors=[*interceptors, drain, RequestDecodingInterceptor()]
    )
    services = register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not listen on {host}:{port} (address in use?)")
    await server.start()
    handle = ServerHandle(server, health, services, bound, drain)
    await handle.set_serving(False)
    if port_file is not None:
        write_port_file(port_file, bound)
    log.info("listening on %s:%d", host, bound)
    return handle


async def serve_until_signalled(
    handle: ServerHandle,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = STOP_GRACE_S,
    after_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then drain and stop (`serve_until_stopped`); a second signal
    stops at once."""
    await serve_until_stopped(handle, StopSignals.install(), on_stop, grace_s, after_stop)


async def serve_until_stopped(
    handle: ServerHandle,
    signals: StopSignals,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = STOP_GRACE_S,
    after_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until `signals` asks for a drain, then, in this order: NOT_SERVING (so balancers stop
    sending) and new work refused with a retry hint; `on_stop`; the work in flight finishes, for
    at most `grace_s` or until a second signal; the server stops (cancelling what is left); and
    `after_stop`, for what that work needed until its end (the router's channels to its workers)."""
    server_done = asyncio.ensure_future(handle.server.wait_for_termination())
    asked = asyncio.ensure_future(signals.drain.wait())
    await asyncio.wait([server_done, asked], return_when=asyncio.FIRST_COMPLETED)
    handle.drain.close()
    await handle.health.enter_graceful_shutdown()
    log.info(
        "draining: no new requests; %d in flight, given %.0f s to finish (a second signal stops at once)",
        handle.drain.in_flight,
        grace_s,
    )
    if on_stop is not None:
        await on_stop()
    idle = asyncio.ensure_future(handle.drain.idle())
    hurry = asyncio.ensure_future(signals.now.wait())
    await asyncio.wait([idle, hurry, server_done], timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
    if idle.done():
        log.info("drained: every request in flight has finished")
    elif hurry.done():
        log.warning("second signal: stopping now (%d requests in flight)", handle.drain.in_flight)
    else:
        log.warning("grace of %.0f s over: stopping %d requests in flight", grace_s, handle.drain.in_flight)
    await handle.server.stop(STOP_LINGER_S if idle.done() else 0)
    for waiting in (idle, hurry, asked, server_done):
        waiting.cancel()
    await asyncio.gather(idle, hurry, asked, server_done, return_exceptions=True)
    if after_stop is not None:
        await after_stop()
