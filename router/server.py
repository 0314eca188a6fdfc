"""Run the router process: connect to the workers, serve clients, report healthy while any worker is."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from router.policy import make_policy
from router.pool import WorkerPool
from router.service import RouterServicer
from tierserve.config import TierserveConfig
from tierserve.grpcserver import ServerHandle, serve_until_signalled, start_server
from tierserve.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


async def serve_router(config: TierserveConfig, port_file: Path | None = None) -> None:
    policy = make_policy(config.router.policy)
    handle: ServerHandle | None = None

    async def follow_pool_health(pool: WorkerPool) -> None:
        # The router can serve exactly while some worker can.
        if handle is not None:
            await handle.set_serving(pool.any_healthy())

    pool = WorkerPool(config, on_round=follow_pool_health)
    servicer = RouterServicer(pool, policy, config.limits, config.service_level)

    def register(server: grpc.aio.Server) -> list[str]:
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

    handle = await start_server(config.router.host, config.router.port, register, port_file)
    pool.start()
    log.info(
        "router on port %d, policy %s, workers: %s",
        handle.port,
        policy.name,
        ", ".join(f"{w.worker_id}={w.address}" for w in pool.workers),
    )
    await serve_until_signalled(handle, on_stop=pool.close)
