"""Bearer-token authentication and per-client concurrency limits for the Router service.

Every Router call must carry `authorization: Bearer <token>` naming a token of the tokens file:
none is UNAUTHENTICATED, an unknown one PERMISSION_DENIED. Each client (token) may have a bounded
number of Generate streams open (router/limits.py; counted once the request has arrived); past it
RESOURCE_EXHAUSTED. Health and reflection stay open, so probes and balancers work without a token.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tierserve.domain.config import ConfigError
from tierserve.router.limits import GENERATE_METHOD, OpenStreams, holding_a_place

PROTECTED_PREFIX = "/tierserve.v1.Router/"
LIMITED_METHOD = GENERATE_METHOD


@dataclass(frozen=True)
class TokenEntry:
    name: str
    # Generate streams open at once; 0: no limit.
    max_concurrent: int


def token_digest(token: str) -> bytes:
    # Looked up by digest: the comparison never runs over the secret itself.
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: Path, default_limit: int) -> dict[bytes, TokenEntry]:
    """`TOKEN [NAME] [MAX_CONCURRENT]` per line; `#` starts a comment."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"[security] tokens_file: cannot read {path}: {error.strerror}") from None
    tokens: dict[bytes, TokenEntry] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 3 or (len(fields) == 3 and not fields[2].isdigit()):
            raise ConfigError(f"{path}:{number}: expected `TOKEN [NAME] [MAX_CONCURRENT]`")
        name = fields[1] if len(fields) > 1 else f"client-{number}"
        limit = int(fields[2]) if len(fields) == 3 else default_limit
        tokens[token_digest(fields[0])] = TokenEntry(name, limit)
    if not tokens:
        raise ConfigError(f"{path}: no tokens (every caller would be refused)")
    return tokens


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def refusing(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    message: str,
    trailing: tuple[tuple[str, str], ...] = (),
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends every call with `code`."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message, trailing_metadata=trailing)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message, trailing_metadata=trailing)
        yield  # pragma: no cover - abort raises

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, tokens: dict[bytes, TokenEntry]) -> None:
        self._tokens = tokens
        # Open Generate streams per client (token) name, counted while their handlers run.
        self.generate = OpenStreams("Generate streams", 0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        token = bearer_token(details.invocation_metadata)
        if not token:
            return refusing(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token: send metadata `authorization: Bearer <token>`",
            )
        entry = self._tokens.get(token_digest(token))
        if entry is None:
            return refusing(handler, grpc.StatusCode.PERMISSION_DENIED, "unknown token")
        if details.method != LIMITED_METHOD or not entry.max_concurrent:
            return handler
        return holding_a_place(handler, self.generate, lambda _: entry.name, entry.max_concurrent)
