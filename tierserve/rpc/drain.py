"""Drain: how a server stops taking work and lets the work it has finish.

A `DrainGate` sits in a server's interceptor chain and counts the calls in flight of the server's
work methods (Generate). Once closed it refuses new ones with UNAVAILABLE and a `retry-after-ms`
hint, so a client (or, for a worker, the router) goes elsewhere while the calls already running
finish. `StopSignals` turns SIGTERM and SIGINT into two events: the first asks for a drain, the
second to stop at once.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
from tierserve_client.options import RETRY_AFTER_KEY

# Retry hint of a call refused while draining: about how long a balancer takes to stop sending
# here once health says NOT_SERVING, or a restarted process to listen again.
DRAIN_RETRY_MS = 1000


class DrainGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts the calls of `methods` (full names, "/package.Service/Method") in flight; once
    `close` is called, refuses new ones with UNAVAILABLE and a retry hint. Other methods (health,
    listings, watches) pass untouched: they hold no work and the server's stop ends them."""

    def __init__(self, methods: Collection[str], retry_after_ms: int = DRAIN_RETRY_MS) -> None:
        self._methods = frozenset(methods)
        self._retry_after_ms = retry_after_ms
        self._closed = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self) -> None:
        """Refuse every new call of the work methods from now on."""
        self._closed = True

    async def idle(self) -> None:
        """Return once no call of the work methods is in flight."""
        await self._idle.wait()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method not in self._methods:
            return handler
        return self._guarded(handler)

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        # Checked when the call's handler runs (its request has arrived), and counted from then: a
        # call whose client leaves before that never runs, so it must never be counted.
        if self._closed:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"shutting down: this server takes no new requests; retry in {self._retry_after_ms} ms "
                "(another replica, or this one once restarted)",
                trailing_metadata=((RETRY_AFTER_KEY, str(self._retry_after_ms)),),
            )
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    def _guarded(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        stream = handler.unary_stream
        if stream is not None and inspect.isasyncgenfunction(stream):

            async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self._admit(context)
                try:
                    async for response in stream(request, context):
                        yield response
                finally:
                    self._leave()

            return grpc.unary_stream_rpc_method_handler(guarded_stream, **kwargs)
        if stream is not None and inspect.iscoroutinefunction(stream):  # writes with context.write

            async def guarded_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                await self._admit(context)
                try:
                    await stream(request, context)
                finally:
                    self._leave()

            return grpc.unary_stream_rpc_method_handler(guarded_writer, **kwargs)
        unary = handler.unary_unary
        if unary is not None and inspect.iscoroutinefunction(unary):

            async def guarded_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._admit(context)
                try:
                    return await unary(request, context)
                finally:
                    self._leave()

            return grpc.unary_unary_rpc_method_handler(guarded_unary, **kwargs)
        raise TypeError(f"DrainGate guards async unary-unary and unary-stream handlers, not {handler!r}")


class StopSignals:
    """SIGTERM and SIGINT as two events: the first sets `drain`, any later one `now`. Tests call
    `received` themselves, as the signal handler does."""

    def __init__(self) -> None:
        self.drain = asyncio.Event()
        self.now = asyncio.Event()

    def received(self) -> None:
        (self.now if self.drain.is_set() else self.drain).set()

    @classmethod
    def install(cls) -> StopSignals:
        """Handle SIGTERM and SIGINT in the running loop from now on (the loop's close removes them)."""
        signals = cls()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signals.received)
        return signals
