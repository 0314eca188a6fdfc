"""Self-registered workers: who announced itself, where, with which credential, and until when the
router keeps it; and who may announce one.

A worker's Register call is also its heartbeat; each one pushes its expiry `ttl_s` ahead. Register is
authenticated (a registration token, a worker's client certificate, or both, as [security]
configures) unless the config opens it explicitly; each credential is bound to the worker ids it may
claim, and an id stays with the credential that registered it until that registration expires. The
clock is injected so tests can step time instead of sleeping.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tierserve_client.v1 import router_pb2

from tierserve.domain.config import ConfigError, SecurityConfig, TierserveConfig
from tierserve.domain.errors import InvalidRequest, Overloaded, PermissionDenied
from tierserve.domain.tiers import TIER_NAMES, is_known_tier
from tierserve.router.auth import TokenAuthInterceptor, bearer_token, load_tokens, token_digest
from tierserve.rpc.identity import named_workers, peer_names

log = logging.getLogger(__name__)

# As [[workers]] name in the config: the id shows in logs, metrics labels and summaries, so it is
# short and plain (no spaces, newlines or control characters).
WORKER_ID = re.compile(r"[A-Za-z0-9._@:-]+")
MAX_WORKER_ID_CHARS = 128
# A DNS name (253) or a bracketed IPv6 address, a colon and a port.
MAX_ADDRESS_CHARS = 260
HOST = re.compile(r"[A-Za-z0-9._-]+")
# In a registration token file's IDS: an id, or an id prefix followed by `*` (`*` alone: any id).
ID_PATTERN = re.compile(r"[A-Za-z0-9._@:-]*\*?")
REGISTER_METHOD = "/tierserve.v1.Router/Register"


def _shown(value: str, limit: int = 48) -> str:
    """`value` quoted for a message, escaped and cut short: it came from the caller."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _valid_host(host: str) -> bool:
    """A host name or IPv4 address, or an IPv6 address in brackets."""
    if host.startswith("[") and host.endswith("]"):
        if "%" in host:  # a zone index may hold any character, and no other host can dial it
            return False
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return HOST.fullmatch(host) is not None


def registration_from_request(request: router_pb2.RegisterRequest) -> tuple[str, str, str]:
    """(worker id, address, tier), or InvalidRequest naming the field that is wrong."""
    worker_id, address = request.worker_id, request.address
    if len(worker_id) > MAX_WORKER_ID_CHARS:
        raise InvalidRequest("worker_id", f"at most {MAX_WORKER_ID_CHARS} characters, got {len(worker_id)}")
    if not WORKER_ID.fullmatch(worker_id):
        raise InvalidRequest("worker_id", f"must be letters, digits and . _ - @ :, got {_shown(worker_id)}")
    if len(address) > MAX_ADDRESS_CHARS:
        raise InvalidRequest("address", f"at most {MAX_ADDRESS_CHARS} characters, got {len(address)}")
    host, sep, port = address.rpartition(":")
    if (
        not sep
        or not _valid_host(host)
        or not port.isascii()
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        raise InvalidRequest(
            "address", f"expected host:port (host letters, digits . _ - or [IPv6]), got {_shown(address)}"
        )
    if not is_known_tier(request.tier):
        raise InvalidRequest(
            "tier", f"unknown tier {_shown(request.tier)}; known tiers: {', '.join(TIER_NAMES)}"
        )
    return worker_id, address, request.tier


@dataclass(frozen=True)
class IdClaims:
    """The worker ids one credential may register: exact ids and id prefixes."""

    ids: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> IdClaims:
        """From `fp32-0`, `fp32-*` (a prefix) and `*` (any id); ValueError names a bad pattern."""
        ids, prefixes = set(), []
        for pattern in patterns:
            if not pattern or not ID_PATTERN.fullmatch(pattern) or len(pattern) > MAX_WORKER_ID_CHARS:
                raise ValueError(f"not a worker id or `prefix*`: {_shown(pattern)}")
            if pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                ids.add(pattern)
        return cls(frozenset(ids), tuple(prefixes))

    def allows(self, worker_id: str) -> bool:
        return worker_id in self.ids or any(worker_id.startswith(prefix) for prefix in self.prefixes)

    def __str__(self) -> str:
        return ",".join([*sorted(self.ids), *(f"{prefix}*" for prefix in self.prefixes)]) or "no ids"


@dataclass(frozen=True)
class Registrant:
    """Who calls Register, once authenticated: `holder` names its credentials (the same on every
    heartbeat), and each credential's claims must allow the id it registers."""

    holder: str
    claims: tuple[IdClaims, ...]

    def check_claim(self, worker_id: str) -> None:
        for claims in self.claims:
            if not claims.allows(worker_id):
                raise PermissionDenied(
                    f"worker_id: {self.holder} may register {claims}, not {_shown(worker_id)}"
                )


# [security] allow_open_registration, and a caller that brings no credential.
OPEN_REGISTRANT = Registrant("an unauthenticated caller (open registration)", (IdClaims(prefixes=("",)),))


@dataclass(frozen=True)
class RegistrationToken:
    name: str
    claims: IdClaims


def load_registration_tokens(path: Path) -> dict[bytes, RegistrationToken]:
    """`TOKEN NAME IDS` per line (`#` starts a comment): IDS, comma-separated, are the worker ids the
    token may register (`prefix*`: every id starting with prefix; `*`: any)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(
            f"[security] registration_token_file: cannot read {path}: {error.strerror}"
        ) from None
    tokens: dict[bytes, RegistrationToken] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ConfigError(
                f"{path}:{number}: expected `TOKEN NAME IDS`, IDS the worker ids this token may register "
                "(comma-separated; `prefix*` for a prefix, `*` for any)"
            )
        try:
            claims = IdClaims.parse(fields[2].split(","))
        except ValueError as error:
            raise ConfigError(f"{path}:{number}: {error}") from None
        tokens[token_digest(fields[0])] = RegistrationToken(fields[1], claims)
    if not tokens:
        raise ConfigError(f"{path}: no tokens (every worker would be refused)")
    return tokens


def certificate_claims(template: str, names: frozenset[str]) -> IdClaims | None:
    """The ids a client certificate may register: the workers it names as `template` (worker_server_name)
    spells them; None when it names none (an API client's certificate)."""
    patterns = []
    for pattern in named_workers(template, names):
        try:
            IdClaims.parse([pattern])
        except ValueError:
            continue  # a name no worker id can match
        patterns.append(pattern)
    return IdClaims.parse(patterns) if patterns else None


@dataclass
class Registration:
    worker_id: str
    address: str
    tier: str
    expires_at: float
    # Registrant.holder of the credential that registered it: only it may refresh or move it.
    holder: str


class Registrations:
    """The live registrations, by worker id, at most `capacity` of them."""

    def __init__(
        self, ttl_s: float, clock: Callable[[], float] = time.monotonic, capacity: int = 256
    ) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._clock = clock
        self._by_id: dict[str, Registration] = {}

    def get(self, worker_id: str) -> Registration | None:
        return self._by_id.get(worker_id)

    def heartbeat(self, worker_id: str, address: str, tier: str, registrant: Registrant) -> bool:
        """Record a registration; True when it is new (first time, or a new address or tier).
        PermissionDenied when the registrant may not claim the id, or another credential holds it;
        Overloaded when the table is full."""
        registrant.check_claim(worker_id)
        now = self._clock()
        known = self._by_id.get(worker_id)
        if known is not None and known.holder != registrant.holder and known.expires_at > now:
            raise PermissionDenied(
                f"worker_id: {_shown(worker_id)} is registered with another credential; it is free "
                "once that registration expires"
            )
        if known is None and len(self._by_id) >= self.capacity:
            raise Overloaded(
                f"the router holds {len(self._by_id)} registrations, its limit ([router] max_registrations)",
                retry_after_ms=round(self.ttl_s * 1000),
            )
        self._by_id[worker_id] = Registration(worker_id, address, tier, now + self.ttl_s, registrant.holder)
        return known is None or (known.address, known.tier) != (address, tier)

    def expired(self) -> list[str]:
        """Ids whose expiry has passed without a heartbeat."""
        now = self._clock()
        return [r.worker_id for r in self._by_id.values() if r.expires_at <= now]

    def forget(self, worker_id: str) -> None:
        self._by_id.pop(worker_id, None)


# The Register call being served: set by RegistrationAuthInterceptor once it has authenticated the
# caller, read by the servicer (an interceptor cannot pass anything else to the method).
_registrant: ContextVar[Registrant | None] = ContextVar("registrant", default=None)


def current_registrant() -> Registrant:
    """The authenticated caller of the Register call being served."""
    registrant = _registrant.get()
    if registrant is None:
        raise PermissionDenied("Register was not authenticated")
    return registrant


Refusal = tuple[grpc.StatusCode, str]


class RegistrationAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates Register: with `tokens` (registration_token_file) it needs one of them, with
    `certificates` (client_ca) a client certificate that names a worker; none configured, it is
    refused unless `open`. A client's token or certificate is PERMISSION_DENIED, so a client cannot
    add a worker and receive other clients' prompts. Every other call goes to `clients`, the
    client-token check, when tokens_file is set."""

    def __init__(
        self,
        tokens: dict[bytes, RegistrationToken],
        clients: TokenAuthInterceptor | None,
        certificates: bool = False,
        worker_names: str = "",
        open_registration: bool = False,
    ) -> None:
        self._tokens = tokens
        self.clients = clients
        self._certificates = certificates
        self._worker_names = worker_names
        self._open = open_registration

    def authenticate(self, metadata: Any, peer: frozenset[str] | None) -> Registrant | Refusal:
        holders: list[str] = []
        claims: list[IdClaims] = []
        token = bearer_token(metadata)
        if token:
            entry = self._tokens.get(token_digest(token))
            if entry is None:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "not a registration token (see [security] registration_token_file)",
                )
            holders.append(f"registration token {entry.name}")
            claims.append(entry.claims)
        elif self._tokens:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "Register needs a registration token: metadata `authorization: Bearer <token>`",
            )
        if self._certificates:
            named = certificate_claims(self._worker_names, peer) if peer else None
            if named is None:
                shown = ", ".join(sorted(peer)) if peer else "nothing"
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"this client certificate names {shown}, no worker ({self._worker_names!r}): "
                    "only a worker's certificate may register",
                )
            holders.append(f"certificate for {named}")
            claims.append(named)
        if not holders:
            if self._open:
                return OPEN_REGISTRANT
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "Register needs a registration token ([security] registration_token_file) or a worker's "
                "client certificate (client_ca); this router has neither and does not allow open "
                "registration",
            )
        return Registrant(" and ".join(holders), tuple(claims))

    def _authenticated(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary

        async def register(request: Any, context: grpc.aio.ServicerContext) -> Any:
            outcome = self.authenticate(context.invocation_metadata(), peer_names(context))
            if not isinstance(outcome, Registrant):
                return await context.abort(*outcome)  # raises
            reset = _registrant.set(outcome)
            try:
                return await inner(request, context)
            finally:
                _registrant.reset(reset)

        return grpc.unary_unary_rpc_method_handler(
            register,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

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
        return self._authenticated(handler)


def requires_certificates(security: SecurityConfig) -> bool:
    """Whether every caller of the router shows a client certificate, so Register can check it."""
    return bool(security.client_ca and security.router_tls)


def registration_notices(config: TierserveConfig) -> list[str]:
    """What an operator must hear at start about who may register workers."""
    security = config.security
    if not config.router.registration_ttl_s:
        return []
    if security.registration_token_file or requires_certificates(security):
        return []
    if security.allow_open_registration:
        return [
            "registration is open ([security] allow_open_registration): anyone who can reach this router "
            "may add a worker and receive prompts; set registration_token_file or client_ca instead"
        ]
    return [
        "[router] registration_ttl_s is set but [security] has no registration credential "
        "(registration_token_file, or client_ca with router_cert for workers' certificates): "
        "every Register is refused"
    ]


def router_interceptors(config: TierserveConfig) -> list[grpc.aio.ServerInterceptor]:
    """The router's authentication: client tokens (tokens_file) for every Router call but Register;
    for Register, registration tokens (registration_token_file) and workers' client certificates
    (client_ca) as configured. Warns, at start, when registration is open or cannot succeed."""
    security: SecurityConfig = config.security
    for notice in registration_notices(config):
        log.warning("%s", notice)
    clients = (
        TokenAuthInterceptor(load_tokens(Path(security.tokens_file), security.max_concurrent_per_client))
        if security.tokens_file
        else None
    )
    tokens = (
        load_registration_tokens(Path(security.registration_token_file))
        if security.registration_token_file
        else {}
    )
    return [
        RegistrationAuthInterceptor(
            tokens,
            clients,
            certificates=requires_certificates(security),
            worker_names=security.worker_server_name,
            open_registration=security.allow_open_registration,
        )
    ]
