"""Slow and silent clients: how long one may hold a server stream it does not read, and what the
server does about connections whose peer went quiet.

gRPC's flow control makes a server stream wait, message by message, for its client to read: a
client that stops reading (or whose process hangs) keeps the handler suspended where it hands over
a message (`yield`, or `context.write`), and with it whatever the handler holds: a worker's model
slot, a queue place, a per-client slot. `StalledStreamGuard` bounds that wait: when a message has
not been taken by the transport within `timeout_s`, the call's task is cancelled, exactly as a
client's own cancellation cancels it, so every `finally` of the handler runs and what it held is
released at once.

grpc.aio cannot reset the HTTP/2 stream from the server side, so the stream itself stays open
until its client, or the connection, goes; `client_connection_options` bounds those: keepalive
pings find a vanished peer, an idle connection is closed, and each connection carries a bounded
number of streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger(__name__)


class WriteWatchdog:
    """Cancels the task serving one stream when a message waits longer than `timeout_s` to be taken
    by the transport. Create it in that task (the handler's)."""

    def __init__(self, timeout_s: float, method: str) -> None:
        self._timeout_s = timeout_s
        self._method = method
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("WriteWatchdog must be created inside the task serving the stream")
        self._task = task
        self.stalled = False

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Around the hand-over of one message: the `yield` of a generator handler (resumed once
        gRPC has sent the message and asks for the next) or the `await context.write(...)`."""
        timer = asyncio.get_running_loop().call_later(self._timeout_s, self._stall)
        try:
            yield
        finally:
            timer.cancel()

    def _stall(self) -> None:
        self.stalled = True
        log.warning(
            "%s: the client took no message for %.0f s; its stream is cancelled",
            self._method,
            self._timeout_s,
        )
        self._task.cancel()


class _WatchedContext:
    """A servicer context whose `write` is watched; everything else is the call's own context."""

    def __init__(self, context: grpc.aio.ServicerContext, watchdog: WriteWatchdog) -> None:
        self._context = context
        self._watchdog = watchdog

    async def write(self, message: Any) -> None:
        with self._watchdog.sending():
            await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class StalledStreamGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Ends every server stream (generator or `context.write` handler) whose client has not taken a
    message for `timeout_s` seconds ([limits] stream_idle_timeout_s)."""

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"stream idle timeout must be positive, got {timeout_s}")
        self.timeout_s = timeout_s

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_stream is None:
            return handler
        return self._guarded(handler, details.method)

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        inner = handler.unary_stream
        timeout_s = self.timeout_s
        if inspect.isasyncgenfunction(inner):

            async def watched_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                watchdog = WriteWatchdog(timeout_s, method)
                # Closed here, not left to the garbage collector, once the stream ends however it ends.
                async with contextlib.aclosing(inner(request, context)) as responses:
                    async for response in responses:
                        with watchdog.sending():
                            yield response

            return grpc.unary_stream_rpc_method_handler(watched_stream, **kwargs)
        if inspect.iscoroutinefunction(inner):

            async def watched_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                await inner(request, _WatchedContext(context, WriteWatchdog(timeout_s, method)))

            return grpc.unary_stream_rpc_method_handler(watched_writer, **kwargs)
        return handler


def client_connection_options(
    keepalive_time_s: float, keepalive_timeout_s: float, max_idle_s: float, max_streams: int
) -> list[tuple[str, int]]:
    """Server options for connections from clients one does not control: ping every
    `keepalive_time_s` while calls are open, and drop a connection whose ping goes unanswered for
    `keepalive_timeout_s` (a vanished peer); keep pinging while no data can be sent (a stalled
    stream is exactly when it matters); close a connection without calls after `max_idle_s` (0:
    never); at most `max_streams` calls open on one connection."""
    options = [
        ("grpc.keepalive_time_ms", round(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive_timeout_s * 1000)),
        # What gRPC core really waits for the ack (else a minute; see keepalive_options).
        ("grpc.http2.ping_timeout_ms", round(keepalive_timeout_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_concurrent_streams", max_streams),
    ]
    if max_idle_s:
        options.append(("grpc.max_connection_idle_ms", round(max_idle_s * 1000)))
    return options
