"""The synchronous client: `stream()` yields tokens as they come, `generate()` waits for the whole text."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import grpc

from tierserve_client.options import ClientOptions, retry_hint_ms
from tierserve_client.types import GenerateParams, GenerateResult, Prompt, Summary, Token
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc


def build_request(
    prompt: Prompt | generate_pb2.GenerateRequest, params: GenerateParams | None
) -> generate_pb2.GenerateRequest:
    if isinstance(prompt, generate_pb2.GenerateRequest):
        return prompt
    return (params or GenerateParams()).to_request(prompt)


class TokenStream(Iterator[Token]):
    """Tokens of one generation as they arrive; `summary` is set once the stream has ended.

    A request the server refuses as overloaded is retried (see RetryPolicy) as long as nothing has
    been streamed yet; once a token has arrived an error is raised, never hidden by a retry."""

    def __init__(
        self,
        start: Callable[[], Iterator[generate_pb2.GenerateResponse]],
        options: ClientOptions,
        sleep: Callable[[float], None],
    ) -> None:
        self._start = start
        self._options = options
        self._sleep = sleep
        # The current call: an iterator of responses that can also be cancelled.
        self._responses: Any = None
        self._started = False
        self.attempts = 0
        self.summary: Summary | None = None

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Token:
        while True:
            if self._responses is None:
                self.attempts += 1
                self._responses = self._start()
            try:
                response = next(self._responses)
            except grpc.RpcError as error:
                delay = None if self._started else self._retry_delay(error)
                if delay is None:
                    raise
                self._responses = None
                self._sleep(delay)
                continue
            self._started = True
            if response.HasField("token"):
                return Token.from_proto(response.token)
            self.summary = Summary.from_proto(response.summary)
            raise StopIteration

    def cancel(self) -> None:
        """Stop early: the router cancels the worker's generation too."""
        if self._responses is not None:
            self._responses.cancel()

    def _retry_delay(self, error: grpc.RpcError) -> float | None:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        hint = retry_hint_ms(error.trailing_metadata()) if isinstance(error, grpc.Call) else None
        return self._options.retry.delay_s(self.attempts, code, hint)


class Client:
    """A connection to the router (or straight to a worker); use as a context manager or `close()`."""

    def __init__(
        self, options: ClientOptions | None = None, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.options = options or ClientOptions()
        self._sleep = sleep
        if self.options.secure:
            self._channel = grpc.secure_channel(
                self.options.address, self.options.credentials(), options=self.options.channel_options()
            )
        else:
            self._channel = grpc.insecure_channel(
                self.options.address, options=self.options.channel_options()
            )
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def stream(
        self,
        prompt: Prompt | generate_pb2.GenerateRequest,
        params: GenerateParams | None = None,
        timeout_s: float | None = None,
    ) -> TokenStream:
        request = build_request(prompt, params)
        timeout = timeout_s if timeout_s is not None else self.options.timeout_s

        def start() -> Iterator[generate_pb2.GenerateResponse]:
            responses: Iterator[generate_pb2.GenerateResponse] = self._stub.Generate(
                request, timeout=timeout, metadata=self.options.metadata()
            )
            return responses

        return TokenStream(start, self.options, self._sleep)

    def generate(
        self,
        prompt: Prompt | generate_pb2.GenerateRequest,
        params: GenerateParams | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        stream = self.stream(prompt, params, timeout_s)
        tokens = list(stream)
        if stream.summary is None:
            raise RuntimeError("the stream ended without a summary")
        return GenerateResult(stream.summary.text, tokens, stream.summary)

    def list_workers(self, timeout_s: float = 5.0) -> router_pb2.ListWorkersResponse:
        reply: router_pb2.ListWorkersResponse = self._stub.ListWorkers(
            router_pb2.ListWorkersRequest(), timeout=timeout_s, metadata=self.options.metadata()
        )
        return reply

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
