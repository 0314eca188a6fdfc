"""The Python SDK, sync and asyncio: typed tokens and summaries through a real router over fake workers,
retries on RESOURCE_EXHAUSTED with the server's hint, the bearer token, and TLS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from tierserve_client import AsyncClient, Client, ClientOptions, GenerateParams, RetryPolicy
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc

from tests.unit.fake_pool import FakeWorker, running_pool
from tierserve.cli import main
from tierserve.rpc.server import start_server


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


def test_stream_and_generate_through_the_router() -> None:
    async def scenario() -> None:
        workers = [FakeWorker("fp32-0", "fp32", ttft_us=21_000, tpot_us=9_000)]
        async with running_pool(workers) as pool:

            def use_sync_client() -> None:
                with Client(ClientOptions(pool.address)) as client:
                    stream = client.stream("hello there", GenerateParams(max_new_tokens=3))
                    tokens = list(stream)
                    assert [t.index for t in tokens] == [0, 1, 2]
                    assert [t.latency_us for t in tokens] == [21_000, 9_000, 9_000]
                    assert tokens[1].latency_ms == 9.0 and tokens[0].text == " x"
                    assert stream.summary is not None and stream.summary.worker_id == "fp32-0"
                    assert stream.summary.policy == "slo" and stream.attempts == 1
                    result = client.generate("hi", GenerateParams(max_new_tokens=2, tier="fp32"))
                    assert result.text == " x x" and len(result.tokens) == 2
                    assert result.summary.tier == "fp32" and result.summary.generated_tokens == 2
                    assert result.summary.finish_reason == "unspecified"  # the fake sets none

            await asyncio.to_thread(use_sync_client)
            async with AsyncClient(ClientOptions(pool.address)) as client:
                stream = client.stream("hello", GenerateParams(max_new_tokens=2))
                tokens = [token async for token in stream]
                assert [t.latency_us for t in tokens] == [21_000, 9_000]
                assert stream.summary is not None and stream.summary.text == " x x"
                result = await client.generate("hello", GenerateParams(max_new_tokens=1))
                assert result.summary.generated_tokens == 1

    run(scenario)


@dataclass
class RefusingRouter(router_pb2_grpc.RouterServicer):
    """Refuses the first `refusals` calls as overloaded (with `hint_ms` unless None), then streams."""

    refusals: int
    hint_ms: int | None = 250
    # Fail after this many tokens instead of finishing (None: finish).
    fail_after_tokens: int | None = None
    calls: list[dict[str, str]] = field(default_factory=list)

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        self.calls.append({m.key: m.value for m in context.invocation_metadata() or ()})
        if len(self.calls) <= self.refusals:
            trailing = () if self.hint_ms is None else (("retry-after-ms", str(self.hint_ms)),)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", trailing_metadata=trailing)
        for index in range(2):
            if self.fail_after_tokens == index:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded mid-stream")
            yield generate_pb2.GenerateResponse(
                token=generate_pb2.Token(text="a", index=index, latency_us=1000 + index)
            )
        yield generate_pb2.GenerateResponse(summary=generate_pb2.Summary(text="aa", worker_id="w"))

    async def ListWorkers(
        self, request: router_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListWorkersResponse:
        return router_pb2.ListWorkersResponse(policy="refusing")

    async def WatchStats(
        self, request: router_pb2.WatchStatsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.PoolStats]:
        yield router_pb2.PoolStats(policy="refusing")

    async def Register(
        self, request: router_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RegisterResponse:
        return router_pb2.RegisterResponse()


async def serve(router: RefusingRouter, **secure: bytes) -> tuple[grpc.aio.Server, str]:
    if secure:
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServicer_to_server(router, server)
        credentials = grpc.ssl_server_credentials([(secure["key"], secure["cert"])])
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        return server, f"127.0.0.1:{port}"

    def register(server: grpc.aio.Server) -> list[str]:
        router_pb2_grpc.add_RouterServicer_to_server(router, server)
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

    handle = await start_server("127.0.0.1", 0, register)
    return handle.server, f"127.0.0.1:{handle.port}"


def test_sync_client_retries_with_the_servers_hint_and_sends_the_token() -> None:
    async def scenario() -> None:
        router = RefusingRouter(refusals=2, hint_ms=250)
        server, address = await serve(router)
        waits: list[float] = []
        try:
            options = ClientOptions(address, token="s3cret", retry=RetryPolicy(max_attempts=3))
            with Client(options, sleep=waits.append) as client:
                result = await asyncio.to_thread(client.generate, "hi")
        finally:
            await server.stop(0)
        assert result.text == "aa" and [t.latency_us for t in result.tokens] == [1000, 1001]
        assert len(router.calls) == 3 and all(c["authorization"] == "Bearer s3cret" for c in router.calls)
        assert len(waits) == 2 and all(0.25 <= w <= 0.25 * 1.2 for w in waits)

    run(scenario)


def test_async_client_backs_off_without_a_hint_and_gives_up() -> None:
    async def scenario() -> None:
        router = RefusingRouter(refusals=10, hint_ms=None)
        server, address = await serve(router)
        waits: list[float] = []

        async def record(delay: float) -> None:
            waits.append(delay)

        policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, multiplier=2.0, jitter=0.0)
        try:
            async with AsyncClient(ClientOptions(address, retry=policy), sleep=record) as client:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generate("hi")
        finally:
            await server.stop(0)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(router.calls) == 3 and "authorization" not in router.calls[0]
        assert waits == pytest.approx([0.1, 0.2])

    run(scenario)


def test_no_retry_once_tokens_were_streamed() -> None:
    async def scenario() -> None:
        router = RefusingRouter(refusals=0, fail_after_tokens=1)
        server, address = await serve(router)
        try:
            async with AsyncClient(ClientOptions(address), sleep=lambda _: asyncio.sleep(0)) as client:
                stream = client.stream("hi")
                first = await anext(stream)
                with pytest.raises(grpc.aio.AioRpcError):
                    await anext(stream)
        finally:
            await server.stop(0)
        assert first.latency_us == 1000 and len(router.calls) == 1 and stream.attempts == 1

    run(scenario)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=tierserve.test", "-addext", "subjectAltName=DNS:tierserve.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_root_certificates(tmp_path: Path) -> None:
    key, cert = make_certificate(tmp_path)

    async def scenario() -> None:
        router = RefusingRouter(refusals=0)
        server, address = await serve(router, key=key.read_bytes(), cert=cert.read_bytes())
        try:
            options = ClientOptions(address, root_certificates=cert, server_name="tierserve.test", token="t")
            async with AsyncClient(options) as client:
                assert (await client.generate("hi")).text == "aa"
            async with AsyncClient(ClientOptions(address, retry=RetryPolicy(max_attempts=1))) as plain:
                with pytest.raises(grpc.aio.AioRpcError):
                    await plain.generate("hi", timeout_s=2)
        finally:
            await server.stop(0)
        assert router.calls[0]["authorization"] == "Bearer t"

    run(scenario)


def test_cli_generate_streams_through_the_sdk(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> None:
        async with running_pool([FakeWorker("fp32-0", "fp32", ttft_us=21_000)]) as pool:
            argv = ["generate", "hello", "--address", pool.address, "--max-new-tokens", "2", "--retries", "0"]
            assert await asyncio.to_thread(main, argv) == 0

    run(scenario)
    out = capsys.readouterr().out
    assert "21.0 ms" in out and "' x'" in out  # the first token with its latency
    assert "fp32-0 / fp32" in out  # the summary table


def test_cancel_stops_the_stream_and_the_router_counts_it_cancelled() -> None:
    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32")
        async with running_pool([fake]) as pool:
            assert pool.servicer is not None
            requests = pool.servicer.metrics.requests
            fake.gate.clear()  # the worker holds the stream before its first token
            async with AsyncClient(ClientOptions(pool.address)) as client:
                stream = client.stream("hi", GenerateParams(max_new_tokens=4))
                first = asyncio.ensure_future(anext(stream))
                await fake.arrivals.get()
                stream.cancel()
                # grpc.aio ends a cancelled call's pending read with asyncio.CancelledError.
                with pytest.raises(asyncio.CancelledError):
                    await first
            for _ in range(200):  # the router notices the cancellation asynchronously
                if requests.labels("fp32", "fp32-0", "cancelled", "grpc")._value.get() == 1:
                    break
                await asyncio.sleep(0.01)
            assert requests.labels("fp32", "fp32-0", "cancelled", "grpc")._value.get() == 1
            assert pool.pool.by_id("fp32-0").outstanding == 0
            fake.gate.set()

    run(scenario)
