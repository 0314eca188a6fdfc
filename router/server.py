"""Run the router process: connect to the workers, serve clients, report healthy while any worker is,
and drain on SIGTERM/SIGINT before letting go of the workers."""

from __future__ import annotations

import logging
from pathlib import Path

from tierserve.domain.config import TierserveConfig
from tierserve.domain.cores import format_cpu_list
from tierserve.ops.pinning import OsAffinity, plan_pinning
from tierserve.router.app import Router, build_router
from tierserve.router.http.server import HttpApi, start_http_api
from tierserve.rpc.drain import StopSignals
from tierserve.rpc.metrics import serve_metrics
from tierserve.rpc.server import ServerHandle, serve_until_stopped
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


async def serve_until_drained(
    router: Router, handle: ServerHandle, signals: StopSignals, http: HttpApi | None = None
) -> None:
    """Serve until the first signal, then drain: NOT_SERVING and new Generate calls refused
    (UNAVAILABLE, retry hint) at once, the streams in flight given [router] drain_grace_s to finish
    (a second signal ends that), the server stopped, and only then the worker channels closed,
    which those streams relay from until their end."""

    async def let_go() -> None:
        # The HTTP API's requests passed the same drain gate, so the drain waited for them too;
        # any left are ended before the worker channels they relay from close.
        if http is not None:
            await http.close()
        await router.pool.close()

    await serve_until_stopped(handle, signals, grace_s=router.config.router.drain_grace_s, after_stop=let_go)


async def serve_router(config: TierserveConfig, port_file: Path | None = None) -> None:
    configure_tracing(config.tracing, "tierserve-router")
    pin_router(config.router.cores)
    router = build_router(config)
    handle = await router.start(port_file)
    # The OpenAI-compatible API, in this event loop, behind the gRPC server's drain gate too.
    http = await start_http_api(router, [handle.drain], port_file) if config.router.http_enabled else None
    endpoint = (
        serve_metrics(
            router.metrics.registry,
            config.metrics.host,
            config.router.metrics_port,
            port_file,
            max_connections=config.metrics.max_connections,
            timeout_s=config.metrics.connection_timeout_s,
        )
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
        await serve_until_drained(router, handle, StopSignals.install(), http)
    finally:
        if http is not None:
            await http.close()
        if endpoint is not None:
            endpoint.close()
