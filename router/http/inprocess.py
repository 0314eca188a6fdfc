"""The Router service called in-process, as a gRPC client's call reaches it, but without the network.

The HTTP API hands each of its requests to the very servicer methods and server interceptors the
gRPC server runs (authentication and per-client limits, the stalled-stream guard, the drain gate),
so both doors share validation, routing, relaying, failover, auth, limits and metrics. What gRPC
gives a handler, `InProcessContext` stands in for: the caller's metadata (its HTTP headers), its
peer address, its deadline, whether it has gone, and `abort`, which records the status and raises
`grpc.aio.AbortError` exactly as grpc.aio's does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tierserve.rpc.departures import DEADLINE_PASSED_S


@dataclass(frozen=True)
class CallDetails:
    """What a server interceptor sees of a call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class InProcessContext:
    """The part of grpc.aio.ServicerContext the router's handlers and interceptors use."""

    def __init__(
        self,
        metadata: tuple[tuple[str, str], ...],
        peer: str,
        deadline: float | None = None,
        gone: Callable[[], bool] = lambda: False,
    ) -> None:
        self._metadata = metadata
        self._peer = peer
        # time.monotonic() when the caller stops waiting; None: no deadline.
        self._deadline = deadline
        self._gone = gone
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def cancelled(self) -> bool:
        """The caller has gone, or its deadline has passed (gRPC cancels the call then too)."""
        remaining = self.time_remaining()
        return self._gone() or (remaining is not None and remaining <= DEADLINE_PASSED_S)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str]] = ()
    ) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing_metadata)
        raise grpc.aio.AbortError(details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._trailing = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


Interceptor = Any  # grpc.aio.ServerInterceptor (grpc ships no type hints)


async def intercepted(
    interceptors: Sequence[Interceptor], details: CallDetails, handler: grpc.RpcMethodHandler
) -> grpc.RpcMethodHandler:
    """`handler` as the chain of server `interceptors` (outermost first) turns it for this call,
    the way grpc.aio's server runs them: each gets a continuation to the next, the last one to the
    method's own handler."""

    async def run(index: int, call: CallDetails) -> grpc.RpcMethodHandler:
        if index == len(interceptors):
            return handler

        def continuation(next_call: CallDetails) -> Awaitable[grpc.RpcMethodHandler]:
            return run(index + 1, next_call)

        return await interceptors[index].intercept_service(continuation, call)

    return await run(0, details)


def stream_of(
    handler: grpc.RpcMethodHandler, request: Any, context: InProcessContext
) -> AsyncGenerator[Any, None]:
    """The responses of a server-streaming handler (an async generator: the servicer's, or the
    interceptors' wrapping of it)."""
    stream: AsyncGenerator[Any, None] = handler.unary_stream(request, context)
    return stream


async def unary_of(handler: grpc.RpcMethodHandler, request: Any, context: InProcessContext) -> Any:
    """The response of a unary handler."""
    return await handler.unary_unary(request, context)
