"""Self-registered workers: who announced itself, where, and until when the router keeps it, and
who may announce one (a registration token, when tokens are on).

A worker's Register call is also its heartbeat; each one pushes its expiry `ttl_s` ahead. The
clock is injected so tests can step time instead of sleeping.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from tierserve_client.v1 import router_pb2

from tierserve.domain.config import SecurityConfig
from tierserve.domain.errors import InvalidRequest
from tierserve.domain.tiers import TIER_NAMES, is_known_tier
from tierserve.router.auth import (
    TokenAuthInterceptor,
    TokenEntry,
    bearer_token,
    load_tokens,
    refusing,
    token_digest,
)

# As [[workers]] name in the config: the id shows in logs, metrics labels and summaries.
WORKER_ID = re.compile(r"^[A-Za-z0-9._@:-]+$")
REGISTER_METHOD = "/tierserve.v1.Router/Register"


@dataclass
class Registration:
    worker_id: str
    address: str
    tier: str
    expires_at: float


def registration_from_request(request: router_pb2.RegisterRequest) -> tuple[str, str, str]:
    """(worker id, address, tier), or InvalidRequest naming the field that is wrong."""
    if not WORKER_ID.match(request.worker_id):
        raise InvalidRequest("worker_id", f"must be letters, digits and . _ - @ :, got {request.worker_id!r}")
    host, sep, port = request.address.rpartition(":")
    if not host or not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest("address", f"expected host:port, got {request.address!r}")
    if not is_known_tier(request.tier):
        raise InvalidRequest("tier", f"unknown tier {request.tier!r}; known tiers: {', '.join(TIER_NAMES)}")
    return request.worker_id, request.address, request.tier


class Registrations:
    """The live registrations, by worker id."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._by_id: dict[str, Registration] = {}

    def get(self, worker_id: str) -> Registration | None:
        return self._by_id.get(worker_id)

    def heartbeat(self, worker_id: str, address: str, tier: str) -> bool:
        """Record a registration; True when it is new (first time, or a new address or tier)."""
        expires_at = self._clock() + self.ttl_s
        known = self._by_id.get(worker_id)
        self._by_id[worker_id] = Registration(worker_id, address, tier, expires_at)
        return known is None or (known.address, known.tier) != (address, tier)

    def expired(self) -> list[str]:
        """Ids whose expiry has passed without a heartbeat."""
        now = self._clock()
        return [r.worker_id for r in self._by_id.values() if r.expires_at <= now]

    def forget(self, worker_id: str) -> None:
        self._by_id.pop(worker_id, None)


class RegistrationAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Register takes only a registration token (none: UNAUTHENTICATED, a client's or an unknown
    one: PERMISSION_DENIED), so a client cannot add a worker and receive other clients' prompts;
    every other call goes to `clients`, the client-token check, when tokens_file is set."""

    def __init__(self, tokens: dict[bytes, TokenEntry], clients: TokenAuthInterceptor | None) -> None:
        self._tokens = tokens
        self.clients = clients

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method != REGISTER_METHOD:
            if self.clients is None:
                return await continuation(details)
            return await self.clients.intercept_service(continuation, details)
        handler = await continuation(details)
        if handler is None:
            return handler
        token = bearer_token(details.invocation_metadata)
        if not token:
            message = "Register needs a registration token: metadata `authorization: Bearer <token>`"
            return refusing(handler, grpc.StatusCode.UNAUTHENTICATED, message)
        if token_digest(token) not in self._tokens:
            message = "not a registration token (see [security] registration_token_file)"
            return refusing(handler, grpc.StatusCode.PERMISSION_DENIED, message)
        return handler


def router_interceptors(security: SecurityConfig) -> list[grpc.aio.ServerInterceptor]:
    """The router's authentication: client tokens (tokens_file) for every Router call but Register,
    registration tokens (registration_token_file) for Register. Neither file: none."""
    clients = (
        TokenAuthInterceptor(load_tokens(Path(security.tokens_file), security.max_concurrent_per_client))
        if security.tokens_file
        else None
    )
    if not security.registration_token_file:
        # Tokens on but none for workers: every Register is refused (an empty set matches nothing).
        return [RegistrationAuthInterceptor({}, clients)] if clients is not None else []
    tokens = load_tokens(Path(security.registration_token_file), 0)
    return [RegistrationAuthInterceptor(tokens, clients)]
