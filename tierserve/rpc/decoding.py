"""Undecodable requests get INVALID_ARGUMENT, not UNKNOWN with a stack trace in the server log.

gRPC parses a request before the servicer runs and reports a parse failure as UNKNOWN ("Unexpected
DecodeError"), logging a traceback for every such call. This interceptor takes the request as
bytes and parses it itself, so bytes that are not the method's message are the caller's fault
and say so.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


async def _parse(
    parse: Callable[[bytes], Any], raw: bytes, method: str, context: grpc.aio.ServicerContext
) -> Any:
    try:
        return parse(raw)
    except DecodeError:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request: not a valid message for {method} ({len(raw)} bytes that do not parse)",
        )


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        parse, method = handler.request_deserializer, details.method
        serializer = handler.response_serializer
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            unary = handler.unary_unary

            async def unary_call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                return await unary(await _parse(parse, raw, method, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_call, response_serializer=serializer)
        stream = handler.unary_stream
        if stream is not None and inspect.isasyncgenfunction(stream):

            async def stream_call(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                request = await _parse(parse, raw, method, context)
                async for response in stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(stream_call, response_serializer=serializer)
        if stream is not None and inspect.iscoroutinefunction(stream):  # writes with context.write

            async def stream_writer(raw: bytes, context: grpc.aio.ServicerContext) -> None:
                await stream(await _parse(parse, raw, method, context), context)

            return grpc.unary_stream_rpc_method_handler(stream_writer, response_serializer=serializer)
        return handler
