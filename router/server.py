"""Run the router process: connect to the workers, serve clients, report healthy while any worker is."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from tierserve_client.v1 import router_pb2, router_pb2_grpc

from tierserve.domain.config import TierserveConfig
from tierserve.domain.cores import format_cpu_list
from tierserve.ops.pinning import OsAffinity, plan_pinning
from tierserve.router.metrics import RouterMetrics
from tierserve.router.policies.registry import make_policy
from tierserve.router.pool import WorkerPool
from tierserve.router.registration import router_interceptors
from tierserve.router.service import RouterServicer
from tierserve.rpc.metrics import serve_metrics
from tierserve.rpc.server import ServerHandle, serve_until_signalled, start_server
from tierserve.rpc.tls import router_server_credentials
from tierserve.rpc.tracing import configure_tracing

log = logging.getLogger(__name__)


def pin_router(cores: list[int]) -> None:
    """Run on the configured cores (`[router] cores`), if any."""
    if not cores:
        return
    affinity = OsAffinity()
    pinning = plan_pinning(cores, affinity.get())
    affinity.set(set(pinning.cpus))
    log.info("router pinned to CPUs %s", format_cpu_list(pinning.cpus))
    for notice in pinning.notices:
        log.warning("%s", notice)


async def serve_router(config: TierserveConfig, port_file: Path | None = None) -> None:
    configure_tracing(config.tracing, "tierserve-router")
    pin_router(config.router.cores)
    policy = make_policy(config.router.policy)
    handle: ServerHandle | None = None

    async def follow_pool_health(pool: WorkerPool) -> None:
        # The router can serve exactly while some worker can.
        if handle is not None:
            await handle.set_serving(pool.any_healthy())

    pool = WorkerPool(config, on_round=follow_pool_health)
    metrics = RouterMetrics()
    servicer = RouterServicer(pool, policy, config.limits, config.service_level, metrics)

    def register(server: grpc.aio.Server) -> list[str]:
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

    handle = await start_server(
        config.router.host,
        config.router.port,
        register,
        port_file,
        credentials=router_server_credentials(config.security),
        interceptors=router_interceptors(config.security),
    )
    endpoint = (
        serve_metrics(metrics.registry, config.metrics.host, config.router.metrics_port, port_file)
        if config.metrics.enabled
        else None
    )
    pool.start()
    log.info(
        "router on port %d, policy %s, workers: %s",
        handle.port,
        policy.name,
        ", ".join(f"{w.worker_id}={w.address}" for w in pool.workers),
    )
    try:
        await serve_until_signalled(handle, on_stop=pool.close)
    finally:
        if endpoint is not None:
            endpoint.close()
