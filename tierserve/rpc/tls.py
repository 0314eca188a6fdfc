"""gRPC credentials from the [security] config: TLS to the router, mutual TLS to the workers, and
the names each side must show (the router checks every worker's, workers check the router's).

Files are read once, at start-up; a missing or unreadable file stops the process with its name.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from tierserve.domain.config import ConfigError, SecurityConfig
from tierserve.rpc.identity import WORKER_METHODS, CallerNameInterceptor, worker_name


def read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as error:
        raise ConfigError(f"[security] {what}: cannot read {path}: {error.strerror}") from None


def router_server_credentials(security: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS for the router's clients (None: plaintext); with `client_ca`, clients need a certificate."""
    if not security.router_tls:
        return None
    pair = (read_pem(security.router_key, "router_key"), read_pem(security.router_cert, "router_cert"))
    client_ca = read_pem(security.client_ca, "client_ca") if security.client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def worker_server_credentials(security: SecurityConfig, name: str) -> grpc.ServerCredentials | None:
    """Mutual TLS for a worker: only callers with a client certificate signed by the pool CA."""
    if not security.worker_tls:
        return None
    cert, key = security.worker_cert_for(name)
    return grpc.ssl_server_credentials(
        [(read_pem(key, "worker_key"), read_pem(cert, "worker_cert"))],
        root_certificates=read_pem(security.ca, "ca"),
        require_client_auth=True,
    )


def worker_channel_credentials(security: SecurityConfig) -> grpc.ChannelCredentials | None:
    """The router's side of mutual TLS to the workers (None: plaintext)."""
    if not security.worker_tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(security.ca, "ca"),
        private_key=read_pem(security.router_client_key, "router_client_key"),
        certificate_chain=read_pem(security.router_client_cert, "router_client_cert"),
    )


def worker_channel_options(security: SecurityConfig, name: str) -> list[tuple[str, object]]:
    """The router's channel to worker `name` verifies the worker's certificate against the name that
    worker's certificates carry (worker_server_name), not the dialled host, which every worker on a
    host shares."""
    if security.worker_tls and security.worker_server_name:
        return [("grpc.ssl_target_name_override", worker_name(security.worker_server_name, name))]
    return []


def worker_interceptors(security: SecurityConfig) -> list[grpc.aio.ServerInterceptor]:
    """A worker's check of its caller beyond the handshake: Worker calls only from the router's
    certificate (router_client_name)."""
    if not security.worker_tls or not security.router_client_name:
        return []
    return [CallerNameInterceptor(WORKER_METHODS, security.router_client_name, "router")]


def first_token(security: SecurityConfig) -> str:
    """The first token of the tokens file: what local tools (the launcher) use to reach the router."""
    if not security.tokens_file:
        return ""
    for line in read_pem(security.tokens_file, "tokens_file").decode().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            return fields[0]
    return ""
