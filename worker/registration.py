"""Self-registration: the worker tells its router where it is, and repeats that as a heartbeat,
so the router adds it on the first call and drops it once the calls stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from tierserve_client import ClientOptions
from tierserve_client.v1 import router_pb2, router_pb2_grpc

from tierserve.domain.config import ConfigError, SecurityConfig, WorkerConfig
from tierserve.rpc.tls import read_pem

log = logging.getLogger(__name__)

# A heartbeat that takes longer than this is counted as failed (and retried next interval).
REGISTER_TIMEOUT_S = 5.0


def advertised_address(config: WorkerConfig, bound_port: int) -> str:
    """What the router dials: advertise_address, else our host and the port we really bound."""
    return config.advertise_address or f"{config.host}:{bound_port}"


def registration_token(security: SecurityConfig) -> str:
    """The first token of registration_token_file (`TOKEN NAME IDS` lines, as the router's; a worker
    needs only the token); empty without the file."""
    if not security.registration_token_file:
        return ""
    text = read_pem(security.registration_token_file, "registration_token_file").decode()
    lines = (line.split("#", 1)[0].split() for line in text.splitlines())
    token = next((fields[0] for fields in lines if fields), "")
    if not token:
        raise ConfigError(
            f"[security] registration_token_file: no token in {security.registration_token_file}"
        )
    return token


def registration_options(security: SecurityConfig, worker_name: str, router_address: str) -> ClientOptions:
    """How a worker reaches its router, as the pool's other clients do: TLS verified by `ca` when the
    router serves TLS, the worker's registration certificate when the router requires client
    certificates, and its registration token. Unreadable files stop the worker at start-up."""
    if not security.router_tls:
        return ClientOptions(router_address, token=registration_token(security))
    cert = key = None
    if security.client_ca:
        if not security.registration_cert:
            raise ConfigError(
                f"worker {worker_name} registers with {router_address}, which requires client "
                "certificates (client_ca): set [security] registration_cert and registration_key"
            )
        cert_path, key_path = (
            path.replace("{name}", worker_name)
            for path in (security.registration_cert, security.registration_key)
        )
        cert, key = read_pem(cert_path, "registration_cert"), read_pem(key_path, "registration_key")
    return ClientOptions(
        router_address,
        tls=True,
        root_certificates=read_pem(security.ca, "ca") if security.ca else None,
        certificate_chain=cert,
        private_key=key,
        token=registration_token(security),
    )


def router_channel(options: ClientOptions, interval_s: float) -> grpc.aio.Channel:
    # Reconnect at least once a heartbeat interval (gRPC's default backs off up to 120 s), so a
    # router back after a long outage or a mended link has the worker again within an interval.
    backoff_ms = max(100, round(interval_s * 1000))
    channel_options = [
        *options.channel_options(),
        ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
    ]
    if options.secure:
        return grpc.aio.secure_channel(options.address, options.credentials(), options=channel_options)
    return grpc.aio.insecure_channel(options.address, options=channel_options)


async def heartbeat(options: ClientOptions, request: router_pb2.RegisterRequest, interval_s: float) -> None:
    """Register now and then every interval_s until cancelled; a failed call is logged (once per
    outage) and retried at the next interval, so a router that restarts picks the worker up again."""
    router_address = options.address
    async with router_channel(options, interval_s) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        failing = False
        while True:
            try:
                reply = await stub.Register(
                    request, timeout=min(REGISTER_TIMEOUT_S, interval_s * 2), metadata=options.metadata()
                )
                # Also after an outage: the call that re-registered may have timed out here after
                # the router took it, and the next one then finds the worker already registered.
                if reply.added or failing:
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


def start_heartbeat(
    config: WorkerConfig, bound_port: int, security: SecurityConfig | None = None
) -> asyncio.Task[None] | None:
    """The heartbeat task when the worker registers itself (`register_with`), else None; over the
    pool's [security] (TLS, client certificate, registration token) when it configures them."""
    if not config.register_with:
        return None
    options = registration_options(security or SecurityConfig(), config.name, config.register_with)
    request = router_pb2.RegisterRequest(
        worker_id=config.name, address=advertised_address(config, bound_port), tier=config.tier
    )
    return asyncio.create_task(
        heartbeat(options, request, config.heartbeat_interval_s), name="register-heartbeat"
    )


async def stop_heartbeat(task: asyncio.Task[None] | None) -> None:
    """Stop heartbeating: the router drops this worker when its registration expires."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
