"""The asyncio client: the same calls as `Client`, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc

from tierserve_client.client import build_request
from tierserve_client.options import ClientOptions, retry_hint_ms
from tierserve_client.types import GenerateParams, GenerateResult, Prompt, Summary, Token
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc


class AsyncTokenStream(AsyncIterator[Token]):
    """Tokens as they arrive (`async for`); `summary` is set once the stream has ended. Retries as
    `TokenStream` does: only while nothing has been streamed."""

    def __init__(
        self,
        start: Callable[[], Any],
        options: ClientOptions,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._start = start
        self._options = options
        self._sleep = sleep
        # The current call (cancellable) and the iterator over its responses.
        self._call: Any = None
        self._responses: AsyncIterator[generate_pb2.GenerateResponse] | None = None
        self._started = False
        self.attempts = 0
        self.summary: Summary | None = None

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> Token:
        while True:
            if self._responses is None:
                self.attempts += 1
                self._call = self._start()
                # The dunder calls, not aiter()/anext(): those builtins are Python 3.10+.
                self._responses = self._call.__aiter__()
            try:
                response = await self._responses.__anext__()
            except grpc.aio.AioRpcError as error:
                delay = None
                if not self._started:
                    hint = retry_hint_ms(error.trailing_metadata())
                    delay = self._options.retry.delay_s(self.attempts, error.code(), hint)
                if delay is None:
                    raise
                self._responses = None
                await self._sleep(delay)
                continue
            except StopAsyncIteration:
                raise RuntimeError("the stream ended without a summary") from None
            self._started = True
            if response.HasField("token"):
                return Token.from_proto(response.token)
            self.summary = Summary.from_proto(response.summary)
            raise StopAsyncIteration

    def cancel(self) -> None:
        """Stop early: the router cancels the worker's generation too. A pending or later read
        raises asyncio.CancelledError (grpc.aio's behaviour)."""
        if self._call is not None:
            self._call.cancel()


class AsyncClient:
    """An asyncio connection to the router; `async with AsyncClient(...) as client:` or `await close()`."""

    def __init__(
        self,
        options: ClientOptions | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.options = options or ClientOptions()
        self._sleep = sleep
        if self.options.secure:
            self._channel = grpc.aio.secure_channel(
                self.options.address, self.options.credentials(), options=self.options.channel_options()
            )
        else:
            self._channel = grpc.aio.insecure_channel(
                self.options.address, options=self.options.channel_options()
            )
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def stream(
        self,
        prompt: Prompt | generate_pb2.GenerateRequest,
        params: GenerateParams | None = None,
        timeout_s: float | None = None,
    ) -> AsyncTokenStream:
        request = build_request(prompt, params)
        timeout = timeout_s if timeout_s is not None else self.options.timeout_s

        def start() -> Any:
            return self._stub.Generate(request, timeout=timeout, metadata=self.options.metadata())

        return AsyncTokenStream(start, self.options, self._sleep)

    async def generate(
        self,
        prompt: Prompt | generate_pb2.GenerateRequest,
        params: GenerateParams | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        stream = self.stream(prompt, params, timeout_s)
        tokens = [token async for token in stream]
        if stream.summary is None:
            raise RuntimeError("the stream ended without a summary")
        return GenerateResult(stream.summary.text, tokens, stream.summary)

    async def list_workers(self, timeout_s: float = 5.0) -> router_pb2.ListWorkersResponse:
        reply: router_pb2.ListWorkersResponse = await self._stub.ListWorkers(
            router_pb2.ListWorkersRequest(), timeout=timeout_s, metadata=self.options.metadata()
        )
        return reply

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()
