"""Per-client bounds on the router's long calls, so no one caller can take what the others need.

- Generate streams per client: per token when tokens are on (each token's limit, router/auth.py),
  else per peer host ([router] max_concurrent_per_peer).
- Watch subscribers, WatchStats and health Watch together: per peer host
  ([router] max_watchers_per_client) and in all ([router] max_watchers).

A stream is counted from when its handler starts, that is once its request has arrived, until it
ends however it ends. A call whose client never sends its request, sends one over the size limit,
or leaves before it arrives never runs a handler, so it never holds a place.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from tierserve_client.options import RETRY_AFTER_KEY

GENERATE_METHOD = "/tierserve.v1.Router/Generate"
WATCH_METHODS = frozenset({"/tierserve.v1.Router/WatchStats", "/grpc.health.v1.Health/Watch"})
# Retry hint sent with a client's RESOURCE_EXHAUSTED: one of its own streams must end first.
CLIENT_LIMIT_RETRY_MS = 1000


def peer_host(peer: str) -> str:
    """The host of a gRPC peer ("ipv4:10.0.0.7:51234" -> "10.0.0.7", "ipv6:[::1]:5000" -> "::1");
    the connections of one host count as one client."""
    scheme, _, address = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return peer  # unix sockets and the like: the whole peer string
    host = address.rpartition(":")[0] or address
    return host.removeprefix("[").removesuffix("]")


class OpenStreams:
    """Streams of one `kind` open per client, with a limit per client and one in all (0: none)."""

    def __init__(self, kind: str, per_client: int, total: int = 0) -> None:
        self.kind = kind
        self.per_client = per_client
        self.total = total
        self.open: Counter[str] = Counter()

    @property
    def in_all(self) -> int:
        return sum(self.open.values())

    def refusal(self, client: str, limit: int) -> str | None:
        """Why `client` may not open another stream now (its own `limit`, 0: none), or None."""
        if limit and self.open[client] >= limit:
            return f"client {client} already has {limit} {self.kind} open, its limit"
        if self.total and self.in_all >= self.total:
            return f"this server already has {self.total} {self.kind} open, its limit"
        return None

    def take(self, client: str) -> None:
        self.open[client] += 1

    def give_back(self, client: str) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]


def holding_a_place(
    handler: grpc.RpcMethodHandler,
    streams: OpenStreams,
    client_of: Callable[[grpc.aio.ServicerContext], str],
    limit: int,
) -> grpc.RpcMethodHandler:
    """`handler` (a server stream: generator or `context.write`) counted in `streams` under
    `client_of(context)` while it runs; past `limit` (or the total), RESOURCE_EXHAUSTED with a
    retry hint instead."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    inner = handler.unary_stream

    async def admit(context: grpc.aio.ServicerContext) -> str:
        client = client_of(context)
        refusal = streams.refusal(client, limit)
        if refusal is not None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{refusal}; retry when one ends",
                trailing_metadata=((RETRY_AFTER_KEY, str(CLIENT_LIMIT_RETRY_MS)),),
            )
        # No await between the check and the count: a burst cannot slip past the limit.
        streams.take(client)
        return client

    if inspect.isasyncgenfunction(inner):

        async def counted_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            client = await admit(context)
            try:
                async for response in inner(request, context):
                    yield response
            finally:
                streams.give_back(client)

        return grpc.unary_stream_rpc_method_handler(counted_stream, **kwargs)
    if inspect.iscoroutinefunction(inner):

        async def counted_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            client = await admit(context)
            try:
                await inner(request, context)
            finally:
                streams.give_back(client)

        return grpc.unary_stream_rpc_method_handler(counted_writer, **kwargs)
    raise TypeError(f"only async server streams are counted, not {handler!r}")


def by_peer(context: grpc.aio.ServicerContext) -> str:
    return peer_host(context.peer())


class ClientLimits(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Generate streams per peer (`generate_per_peer`, 0: none, as when tokens set the limits) and
    watch subscribers per peer and in all."""

    def __init__(self, generate_per_peer: int, watchers_per_client: int, watchers_total: int) -> None:
        self.generate = OpenStreams("Generate streams", generate_per_peer)
        self.watchers = OpenStreams("watches (WatchStats, health Watch)", watchers_per_client, watchers_total)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_stream is None:
            return handler
        if details.method == GENERATE_METHOD and self.generate.per_client:
            return holding_a_place(handler, self.generate, by_peer, self.generate.per_client)
        if details.method in WATCH_METHODS:
            return holding_a_place(handler, self.watchers, by_peer, self.watchers.per_client)
        return handler
