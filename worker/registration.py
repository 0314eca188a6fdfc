"""Self-registration: the worker tells its router where it is, and repeats that as a heartbeat,
so the router adds it on the first call and drops it once the calls stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from tierserve.config import WorkerConfig
from tierserve.grpcserver import CHANNEL_OPTIONS
from tierserve.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

# A heartbeat that takes longer than this is counted as failed (and retried next interval).
REGISTER_TIMEOUT_S = 5.0


def advertised_address(config: WorkerConfig, bound_port: int) -> str:
    """What the router dials: advertise_address, else our host and the port we really bound."""
    return config.advertise_address or f"{config.host}:{bound_port}"


async def heartbeat(router_address: str, request: router_pb2.RegisterRequest, interval_s: float) -> None:
    """Register now and then every interval_s until cancelled; a failed call is logged (once per
    outage) and retried at the next interval, so a router that restarts picks the worker up again."""
    async with grpc.aio.insecure_channel(router_address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        failing = False
        while True:
            try:
                reply = await stub.Register(request, timeout=min(REGISTER_TIMEOUT_S, interval_s * 2))
                if reply.added:
                    log.info(
                        "registered with router %s as %s at %s (expiry %.1f s)",
                        router_address, request.worker_id, request.address, reply.ttl_s,
                    )  # fmt: skip
                failing = False
            except grpc.aio.AioRpcError as error:
                if not failing:
                    log.warning(
                        "registration with router %s failed (%s: %s); retrying every %.1f s",
                        router_address, error.code().name, error.details(), interval_s,
                    )  # fmt: skip
                failing = True
            await asyncio.sleep(interval_s)


def start_heartbeat(config: WorkerConfig, bound_port: int) -> asyncio.Task[None] | None:
    """The heartbeat task when the worker registers itself (`register_with`), else None."""
    if not config.register_with:
        return None
    request = router_pb2.RegisterRequest(
        worker_id=config.name, address=advertised_address(config, bound_port), tier=config.tier
    )
    return asyncio.create_task(
        heartbeat(config.register_with, request, config.heartbeat_interval_s), name="register-heartbeat"
    )


async def stop_heartbeat(task: asyncio.Task[None] | None) -> None:
    """Stop heartbeating: the router drops this worker when its registration expires."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
