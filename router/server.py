"""Run the router process: connect to the workers, serve clients, report healthy while any worker is."""

from __future__ import annotations

import logging
from pathlib import Path

from tierserve.domain.config import TierserveConfig
from tierserve.domain.cores import format_cpu_list
from tierserve.ops.pinning import OsAffinity, plan_pinning
from tierserve.router.app import build_router
from tierserve.rpc.metrics import serve_metrics
from tierserve.rpc.server import serve_until_signalled
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
    router = build_router(config)
    handle = await router.start(port_file)
    endpoint = (
        serve_metrics(router.metrics.registry, config.metrics.host, config.router.metrics_port, port_file)
        if config.metrics.enabled
        else None
    )
    log.info(
        "router on port %d, policy %s, workers: %s",
        handle.port,
        router.policy.name,
        ", ".join(f"{w.worker_id}={w.address}" for w in router.pool.workers),
    )
    try:
        await serve_until_signalled(handle, on_stop=router.pool.close)
    finally:
        if endpoint is not None:
            endpoint.close()
