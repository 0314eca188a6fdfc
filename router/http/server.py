"""The router's OpenAI-compatible HTTP API: an aiohttp server in the router's own event loop, beside
its grpc.aio server, calling the router's servicer in-process (no extra hop).

It listens on [router] http_host (empty: [router] host) and http_port (0: a free port), with TLS
from [security] router_cert/router_key when the gRPC port has it (and client certificates from
client_ca when those are required there), and writes its bound port beside the gRPC port file
(router.port -> router.http.port).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tierserve.domain.config import ConfigError, SecurityConfig
from tierserve.router.app import Router
from tierserve.router.http.errors import ApiError, internal
from tierserve.router.http.handlers import OpenAIHandlers, error_reply
from tierserve.rpc.server import write_port_file

log = logging.getLogger(__name__)

# An idle keep-alive connection is closed after this long (aiohttp's default is an hour).
KEEPALIVE_S = 75.0
# When the router stops: how long requests still running get before they are cancelled. The drain
# before it (rpc/server.py) already waited for them, as for gRPC calls.
SHUTDOWN_S = 1.0
# JSON escapes make a body longer than its text: "\ud83d\ude00" is 12 bytes for one character.
BODY_BYTES_PER_CHAR = 12
BODY_OVERHEAD_BYTES = 1 << 20


def http_port_file(port_file: Path) -> Path:
    """Where the router writes its HTTP port: beside its gRPC port file (router.port -> router.http.port)."""
    return port_file.with_suffix(".http.port")


def http_ssl_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """TLS for HTTP clients with the router's certificate (None: plaintext, as the gRPC port);
    with client_ca, clients must present a certificate it signed, as on the gRPC port."""
    if not security.router_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(
            str(Path(security.router_cert).expanduser()), str(Path(security.router_key).expanduser())
        )
        if security.client_ca:
            context.load_verify_locations(str(Path(security.client_ca).expanduser()))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"[security] router_cert/router_key/client_ca for HTTPS: {error}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method) in OpenAI's error shape, and anything
    unexpected as a 500 that names no internals (the traceback goes to the log)."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        kind = "not_found_error" if error.status == 404 else "invalid_request_error"
        message = f"{error.reason}: {request.method} {request.path}"
        return error_reply(
            ApiError(error.status, message, kind, None, error.reason.lower().replace(" ", "_"))
        )
    except ConnectionError:
        raise  # the client has gone: nothing to answer
    except Exception as error:
        log.exception("HTTP API: %s %s failed", request.method, request.path)
        return error_reply(internal(type(error).__name__))
    return response


@dataclass
class HttpApi:
    """The running HTTP API; `close` stops it."""

    runner: web.AppRunner
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        """The API's base URL, as an `openai` client takes it."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/v1"

    async def close(self) -> None:
        """Stop listening, end the requests still running (after SHUTDOWN_S); again: nothing."""
        if self.runner.server is not None:
            await self.runner.cleanup()


async def start_http_api(router: Router, gates: Sequence[Any] = (), port_file: Path | None = None) -> HttpApi:
    """Serve the OpenAI-compatible API for `router` in the running event loop; `gates` are the gRPC
    server's own outermost-last interceptors the HTTP door must pass too (its drain gate)."""
    config = router.config
    ssl_context = http_ssl_context(config.security)
    app = web.Application(
        client_max_size=BODY_BYTES_PER_CHAR * config.limits.max_prompt_chars + BODY_OVERHEAD_BYTES,
        middlewares=[openai_errors],
    )
    app.add_routes(OpenAIHandlers(router, gates).routes())
    runner = web.AppRunner(
        app,
        # A client that disconnects cancels its handler, and so its stream to the worker, at once.
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=KEEPALIVE_S,
        shutdown_timeout=SHUTDOWN_S,
    )
    await runner.setup()
    host = config.router.http_host or config.router.host
    site = web.TCPSite(runner, host, config.router.http_port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise OSError(
            f"HTTP API: could not listen on {host}:{config.router.http_port} ({error.strerror}); "
            "set [router] http_port (0: any free port) or http_enabled = false"
        ) from error
    port = int(runner.addresses[0][1])
    api = HttpApi(runner, host, port, ssl_context is not None)
    if port_file is not None:
        write_port_file(http_port_file(port_file), port)
    log.info("OpenAI-compatible HTTP API on %s", api.url)
    return api
