"""Small synchronous client helpers for the CLI and tests: stream a generation, list workers, check
health, watch the pool. Each takes `ClientOptions` for a secured router (TLS, mutual TLS, a token);
without them it dials in plaintext."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tierserve_client.options import CHANNEL_OPTIONS, ClientOptions
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc

DEFAULT_ROUTER_ADDRESS = "127.0.0.1:50051"


def open_channel(address: str, options: ClientOptions | None = None) -> grpc.Channel:
    """A channel to `address`: over TLS when the options ask for it, else plaintext."""
    if options is not None and options.secure:
        return grpc.secure_channel(address, options.credentials(), options=options.channel_options())
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def _metadata(options: ClientOptions | None) -> tuple[tuple[str, str], ...] | None:
    return (options.metadata() or None) if options is not None else None


def stream_generate(
    address: str,
    request: generate_pb2.GenerateRequest,
    timeout_s: float | None = None,
    options: ClientOptions | None = None,
) -> Iterator[generate_pb2.GenerateResponse]:
    """Yield the router's (or a worker's) responses: tokens, then the summary."""
    with open_channel(address, options) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        yield from stub.Generate(request, timeout=timeout_s, metadata=_metadata(options))


def list_workers(
    address: str, timeout_s: float = 5.0, options: ClientOptions | None = None
) -> router_pb2.ListWorkersResponse:
    with open_channel(address, options) as channel:
        reply: router_pb2.ListWorkersResponse = router_pb2_grpc.RouterStub(channel).ListWorkers(
            router_pb2.ListWorkersRequest(), timeout=timeout_s, metadata=_metadata(options)
        )
    return reply


def is_serving(
    address: str, service: str = "", timeout_s: float = 2.0, options: ClientOptions | None = None
) -> bool:
    """True when the server's grpc.health.v1 check answers SERVING."""
    with open_channel(address, options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=_metadata(options)
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def watch_stats(
    address: str, interval_ms: int = 1000, options: ClientOptions | None = None
) -> Generator[router_pb2.PoolStats, None, None]:
    """Yield the router's pool snapshots as it pushes them; closing the iterator ends the stream."""
    with open_channel(address, options) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        yield from stub.WatchStats(
            router_pb2.WatchStatsRequest(interval_ms=interval_ms), metadata=_metadata(options)
        )
