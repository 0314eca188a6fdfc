"""The router's composition root: the pool, policy, metrics, authentication and servicer, built from
the config in one place for the router process and for every test that runs a router in-process.

Test doubles come in as parameters (a clock for registration expiry); fake workers come in as the
config's worker addresses, like real ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from tierserve_client.v1 import router_pb2, router_pb2_grpc

from tierserve.domain.config import TierserveConfig
from tierserve.router.limits import ClientLimits
from tierserve.router.metrics import RouterMetrics
from tierserve.router.policies.registry import RoutingPolicy, make_policy
from tierserve.router.pool import WorkerPool
from tierserve.router.registration import router_interceptors
from tierserve.router.service import RouterServicer
from tierserve.rpc.server import ServerHandle, start_server
from tierserve.rpc.stalls import StalledStreamGuard, client_connection_options
from tierserve.rpc.tls import router_server_credentials

GENERATE_METHOD = f"/{router_pb2.DESCRIPTOR.services_by_name['Router'].full_name}/Generate"


@dataclass
class Router:
    """A router, wired and ready to start."""

    config: TierserveConfig
    pool: WorkerPool
    policy: RoutingPolicy
    metrics: RouterMetrics
    servicer: RouterServicer
    # Client and registration tokens ([security]); empty when neither file is set.
    interceptors: list[grpc.aio.ServerInterceptor]
    # TLS for clients ([security]); None: plaintext.
    credentials: grpc.ServerCredentials | None
    # Per-client bounds on Generate streams and watches (also in `interceptors`).
    client_limits: ClientLimits | None = None

    def register(self, server: grpc.aio.Server) -> list[str]:
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

    async def start(self, port_file: Path | None = None, follow_pool_health: bool = True) -> ServerHandle:
        """Listen on [router] host and port, then start checking the workers. With
        `follow_pool_health` the router reports SERVING exactly while some worker can; without, it
        stays NOT_SERVING."""
        handle = await start_server(
            self.config.router.host,
            self.config.router.port,
            self.register,
            port_file,
            credentials=self.credentials,
            interceptors=self.interceptors,
            # What a drain waits for, and refuses anew with a retry hint.
            work_methods=[GENERATE_METHOD],
            options=client_connection_options(
                self.config.router.client_keepalive_time_s,
                self.config.router.client_keepalive_timeout_s,
                self.config.router.max_connection_idle_s,
                self.config.router.max_streams_per_connection,
            ),
        )

        async def report_pool_health(pool: WorkerPool) -> None:
            await handle.set_serving(pool.any_healthy())

        self.pool.start(on_round=report_pool_health if follow_pool_health else None)
        return handle


def build_router(config: TierserveConfig, clock: Callable[[], float] = time.monotonic) -> Router:
    """Everything the router process serves with, from its config; `clock` times registrations."""
    # What can refuse the config (policy name, token and certificate files) first, before any channel opens.
    policy = make_policy(config.router.policy)
    # After authentication, so a refused caller holds nothing: per-client limits (per peer without
    # tokens; with tokens each token's own, counted by the token check), then the stream idle guard.
    client_limits = ClientLimits(
        0 if config.security.tokens_file else config.router.max_concurrent_per_peer,
        config.router.max_watchers_per_client,
        config.router.max_watchers,
    )
    interceptors = [
        *router_interceptors(config),
        client_limits,
        StalledStreamGuard(config.limits.stream_idle_timeout_s),
    ]
    credentials = router_server_credentials(config.security)
    pool = WorkerPool(config, clock=clock)
    metrics = RouterMetrics()
    metrics.watch_pool(lambda: pool.workers)
    pool.departures.append(metrics.forget_worker)
    servicer = RouterServicer(pool, policy, config.limits, config.service_level, metrics)
    return Router(config, pool, policy, metrics, servicer, interceptors, credentials, client_limits)
