"""How the SDK reaches the router: address, TLS, bearer token, retries."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

# Explicit message limits, the same on clients and servers: prompts are capped well below this by
# the servers' validation.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# The router's retry hint on RESOURCE_EXHAUSTED (trailing metadata, milliseconds).
RETRY_AFTER_KEY = "retry-after-ms"


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a request the server refused as overloaded (RESOURCE_EXHAUSTED) before it streamed
    anything: wait the server's `retry-after-ms` hint when it sends one, else back off exponentially;
    both with a little jitter so refused clients do not return in lockstep."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    # Up to this fraction is added at random to every wait.
    jitter: float = 0.2
    retry_on: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})

    def delay_s(self, attempt: int, code: grpc.StatusCode, hint_ms: int | None) -> float | None:
        """Seconds to wait before attempt `attempt + 1` (attempts count from 1); None: give up."""
        if code not in self.retry_on or attempt >= self.max_attempts:
            return None
        base = (
            hint_ms / 1e3
            if hint_ms is not None
            else self.initial_backoff_s * self.multiplier ** (attempt - 1)
        )
        return min(base, self.max_backoff_s) * (1.0 + random.uniform(0.0, self.jitter))


NO_RETRIES = RetryPolicy(max_attempts=1)


def retry_hint_ms(trailing_metadata: Iterable[tuple[str, object]] | None) -> int | None:
    """The `retry-after-ms` value of a status's trailing metadata, if present and a number."""
    for key, value in trailing_metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0, int(str(value)))
            except (TypeError, ValueError):
                return None
    return None


def _read(value: bytes | str | Path | None) -> bytes | None:
    """PEM given as bytes, or as a path to a file."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class ClientOptions:
    """Where the router is and how to talk to it.

    TLS is used when `tls` is set or any certificate is given: `root_certificates` verifies the server
    (None: the system's roots), `certificate_chain` and `private_key` present a client certificate
    (mutual TLS). Certificates are PEM bytes or paths to PEM files. `token` is sent on every call as
    `authorization: Bearer <token>`; send it over TLS only.
    """

    address: str = "127.0.0.1:50051"
    tls: bool = False
    root_certificates: bytes | str | Path | None = None
    certificate_chain: bytes | str | Path | None = None
    private_key: bytes | str | Path | None = None
    # Verify the server's certificate against this name instead of the address's host (tests).
    server_name: str = ""
    token: str = ""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Default deadline of a Generate call, seconds; None: no deadline.
    timeout_s: float | None = None

    @property
    def secure(self) -> bool:
        return self.tls or any(
            v is not None for v in (self.root_certificates, self.certificate_chain, self.private_key)
        )

    def channel_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = list(CHANNEL_OPTIONS)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.private_key),
            certificate_chain=_read(self.certificate_chain),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
