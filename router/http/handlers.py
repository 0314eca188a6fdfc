"""The OpenAI-compatible endpoints: `POST /v1/chat/completions`, `POST /v1/completions`,
`GET /v1/models` (and `/v1/models/{id}`).

Each request is parsed (router/http/mapping.py), then handed to the Router servicer in-process
through the same interceptors a gRPC call passes (router/http/inprocess.py): authentication and
per-client limits, the stalled-stream guard, the drain gate. A streamed reply's status and headers
go out with its first token, so anything refused before that (invalid input, authentication,
overload, no healthy worker, the deadline) gets its own HTTP status; later, an error ends the
event stream with an error event. A client that disconnects cancels its handler (aiohttp's
handler cancellation), which closes the router's stream to the worker at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from aiohttp import web
from tierserve_client.v1 import generate_pb2, router_pb2

from tierserve.domain.errors import InvalidRequest
from tierserve.router.app import GENERATE_METHOD, Router
from tierserve.router.http.errors import ApiError, from_status, internal
from tierserve.router.http.inprocess import CallDetails, InProcessContext, intercepted, stream_of, unary_of
from tierserve.router.http.mapping import (
    ApiRequest,
    ChunkWriter,
    Endpoint,
    UnknownModel,
    error_event,
    model_object,
    parse_request,
    reply,
)
from tierserve.router.metrics import HTTP, request_protocol

log = logging.getLogger(__name__)

LIST_WORKERS_METHOD = f"/{router_pb2.DESCRIPTOR.services_by_name['Router'].full_name}/ListWorkers"
EVENT_STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Proxies (nginx) must pass every event on as it comes.
    "X-Accel-Buffering": "no",
}


class _NoSummary(Exception):
    """The router's stream ended without a summary (it never does; a bug if it did)."""


def _dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def json_reply(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(payload, status=status, headers=headers, dumps=_dumps)


def error_reply(error: ApiError) -> web.Response:
    return json_reply(error.body(), status=error.status, headers=dict(error.headers))


def caller_metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    """The caller's headers as the gRPC metadata a handler reads (authorization, traceparent, ...)."""
    return tuple((key.lower(), value) for key, value in request.headers.items())


def caller_peer(request: web.Request) -> str:
    """The caller's address as gRPC spells a peer ("ipv4:10.0.0.7:51234", "ipv6:[::1]:5000"), so
    per-client limits count a host's HTTP and gRPC streams together."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return f"unix:{peer}" if peer else "unknown"


def client_gone(request: web.Request) -> Callable[[], bool]:
    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


async def read_json(request: web.Request) -> Any:
    """The body as JSON; InvalidRequest("body") when it is not."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as error:
        raise InvalidRequest("body", f"too large: {error.text}") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest("body", f"is not valid JSON ({error})") from None


class _EventStream:
    """A streamed reply, opened (status 200 and headers sent) with its first event."""

    def __init__(self, request: web.Request, request_id: str) -> None:
        self._request = request
        self._headers = {**EVENT_STREAM_HEADERS, "X-Request-Id": request_id}
        self.response: web.StreamResponse | None = None

    async def send(self, data: bytes) -> None:
        if self.response is None:
            response = web.StreamResponse(headers=self._headers)
            await response.prepare(self._request)
            self.response = response
        await self.response.write(data)


class OpenAIHandlers:
    """The endpoints of one router: its servicer, behind its interceptors and `gates` (the gRPC
    server's drain gate, so a drain refuses both doors' new requests and waits for both)."""

    def __init__(self, router: Router, gates: Sequence[Any] = ()) -> None:
        self._interceptors = [*router.interceptors, *gates]
        self._generate = grpc.unary_stream_rpc_method_handler(router.servicer.Generate)
        self._list_workers = grpc.unary_unary_rpc_method_handler(router.servicer.ListWorkers)
        self._model = router.config.model.name
        self._metrics = router.metrics
        self._policy = router.policy.name
        self._created = int(time.time())

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model}", self.model),
        ]

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, Endpoint.CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, Endpoint.COMPLETIONS)

    async def models(self, request: web.Request) -> web.StreamResponse:
        listing = await self._list(request)
        if isinstance(listing, ApiError):
            return error_reply(listing)
        return json_reply({"object": "list", "data": [model_object(self._model, self._created, listing)]})

    async def model(self, request: web.Request) -> web.StreamResponse:
        listing = await self._list(request)
        if isinstance(listing, ApiError):
            return error_reply(listing)
        if request.match_info["model"] != self._model:
            return error_reply(self._unknown_model(request.match_info["model"]))
        return json_reply(model_object(self._model, self._created, listing))

    def _unknown_model(self, model: str) -> ApiError:
        message = f"the model {model!r} does not exist; this server serves {self._model!r}"
        return ApiError(404, message, "invalid_request_error", "model", "model_not_found")

    async def _list(self, request: web.Request) -> router_pb2.ListWorkersResponse | ApiError:
        metadata = caller_metadata(request)
        context = InProcessContext(metadata, caller_peer(request), gone=client_gone(request))
        handler = await intercepted(
            self._interceptors, CallDetails(LIST_WORKERS_METHOD, metadata), self._list_workers
        )
        try:
            listing: router_pb2.ListWorkersResponse = await unary_of(
                handler, router_pb2.ListWorkersRequest(), context
            )
        except grpc.aio.AbortError:
            return from_status(context.code(), context.details(), context.trailing_metadata())
        return listing

    async def _complete(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        # Counted as HTTP in the router's metrics and spans: everything below runs in this task.
        reset = request_protocol.set(HTTP)
        try:
            return await self._serve(request, endpoint)
        finally:
            request_protocol.reset(reset)

    async def _serve(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        try:
            body = await read_json(request)
            api = parse_request(
                endpoint, body, request.headers, self._model, uuid.uuid4().hex, int(time.time())
            )
        except InvalidRequest as error:
            # As the servicer counts the requests it finds invalid.
            self._metrics.refused(self._policy, grpc.StatusCode.INVALID_ARGUMENT, routed=False)
            return error_reply(
                ApiError(400, str(error), "invalid_request_error", error.field, "invalid_argument")
            )
        except UnknownModel as unknown:
            self._metrics.refused(self._policy, grpc.StatusCode.NOT_FOUND, routed=False)
            return error_reply(self._unknown_model(unknown.model))

        metadata = caller_metadata(request)
        deadline = None if api.timeout_s is None else time.monotonic() + api.timeout_s
        context = InProcessContext(metadata, caller_peer(request), deadline, client_gone(request))
        handler = await intercepted(
            self._interceptors, CallDetails(GENERATE_METHOD, metadata), self._generate
        )
        responses = stream_of(handler, api.request, context)
        events = _EventStream(request, api.request.request_id) if api.stream else None
        try:
            # Closed however this ends (the client leaving included): the worker's stream with it.
            async with contextlib.aclosing(responses):
                async with asyncio.timeout(api.timeout_s):
                    if events is None:
                        return await self._whole(api, responses)
                    await self._stream(api, responses, events)
            assert events.response is not None
            await events.response.write_eof()
            return events.response
        except grpc.aio.AbortError:
            rename = {"max_new_tokens": api.max_tokens_param}
            failure = from_status(context.code(), context.details(), context.trailing_metadata(), rename)
        except TimeoutError:
            assert api.timeout_s is not None
            failure = from_status(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {api.timeout_s * 1e3:g} ms exceeded"
            )
        except _NoSummary:
            failure = internal("the stream ended without a summary")
        except ConnectionError:
            # The client left while an event was being written; its stream to the worker is closed.
            return events.response if events is not None and events.response is not None else web.Response()
        if events is None or events.response is None:
            return error_reply(failure)
        with contextlib.suppress(ConnectionError):  # the client may be gone too
            await events.response.write(error_event(failure.body()["error"]))
            await events.response.write_eof()
        return events.response

    async def _whole(
        self, api: ApiRequest, responses: AsyncIterator[generate_pb2.GenerateResponse]
    ) -> web.Response:
        latencies: list[int] = []
        async for message in responses:
            if message.HasField("token"):
                latencies.append(message.token.latency_us)
            else:
                return json_reply(
                    reply(api, message.summary, latencies), headers={"X-Request-Id": api.request.request_id}
                )
        raise _NoSummary

    async def _stream(
        self, api: ApiRequest, responses: AsyncIterator[generate_pb2.GenerateResponse], events: _EventStream
    ) -> None:
        chunks = ChunkWriter(api)
        async for message in responses:
            if message.HasField("token"):
                await events.send(chunks.token(message.token))
            else:
                # The client has the whole stream: the router's stream is closed here, served.
                await events.send(chunks.closing(message.summary))
                return
        raise _NoSummary
