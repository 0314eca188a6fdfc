"""OpenTelemetry tracing: the client's trace continues through the router's span into the worker's span
(linked by `traceparent` metadata); without the extra, spans are no-ops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.unit.fake_engine import worker_state
from tierserve.domain.config import LimitsConfig, TierserveConfig
from tierserve.router.app import build_router
from tierserve.rpc import tracing
from tierserve.rpc.server import start_server
from tierserve.worker.service import WorkerServicer


@pytest.fixture
def exporter() -> Iterator[Any]:
    """Finished spans in memory. OpenTelemetry allows one global provider per process: installed
    once, its spans cleared around every test."""
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        trace.set_tracer_provider(provider)
    exporters = (getattr(p, "span_exporter", None) for p in provider._active_span_processor._span_processors)
    memory = next(e for e in exporters if isinstance(e, InMemorySpanExporter))
    memory.clear()
    yield memory
    memory.clear()


async def router_over_real_worker_service() -> None:
    """One Generate from a traced client through an in-process router and worker service."""
    executor = ThreadPoolExecutor(max_workers=1)
    worker = WorkerServicer(worker_state(), LimitsConfig(), executor)

    def register_worker(server: grpc.aio.Server) -> list[str]:
        worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
        return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

    worker_handle = await start_server("127.0.0.1", 0, register_worker)
    await worker_handle.set_serving(True)
    config = TierserveConfig.model_validate(
        {
            "router": {"port": 0, "health_interval_s": 0.05},
            "workers": [{"name": "bf16-0", "tier": "bf16", "address": f"127.0.0.1:{worker_handle.port}"}],
        }
    )
    router = build_router(config)
    router_handle = await router.start()
    await router.pool.first_round_done.wait()
    from opentelemetry import propagate, trace

    tracer = trace.get_tracer("test-client")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router_handle.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            with tracer.start_as_current_span("client"):
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                request = generate_pb2.GenerateRequest(prompt="hi", max_new_tokens=3, request_id="r-1")
                replies = [
                    r async for r in stub.Generate(request, metadata=tuple(carrier.items()), timeout=10)
                ]
        assert replies[-1].summary.worker_id == "bf16-0"
    finally:
        await router_handle.server.stop(0)
        await router.pool.close()
        await worker_handle.server.stop(0)
        executor.shutdown()


def test_router_and_worker_spans_continue_the_clients_trace(exporter: Any) -> None:
    asyncio.run(asyncio.wait_for(router_over_real_worker_service(), timeout=30))
    finished = {span.name: span for span in exporter.get_finished_spans()}
    client, router, worker = (
        finished["client"],
        finished["tierserve.Router/Generate"],
        finished["tierserve.Worker/Generate"],
    )
    assert router.context.trace_id == client.context.trace_id == worker.context.trace_id
    assert router.parent.span_id == client.context.span_id
    assert worker.parent.span_id == router.context.span_id
    assert router.attributes["tierserve.worker_id"] == "bf16-0"
    assert router.attributes["tierserve.request_id"] == "r-1"
    assert router.attributes["tierserve.protocol"] == "grpc"
    assert router.attributes["rpc.grpc.status_code"] == 0
    assert worker.attributes["tierserve.generated_tokens"] == 3
    assert worker.attributes["tierserve.tier"] == "bf16"


def test_an_http_request_gets_the_router_span_continuing_its_traceparent(exporter: Any) -> None:
    """The OpenAI-compatible API runs the same servicer: the same span, marked as HTTP, its parent the
    client's span named by the `traceparent` header."""
    import aiohttp
    from opentelemetry import propagate, trace

    from tests.unit.fake_pool import FakeWorker, running_pool

    async def scenario() -> None:
        async with running_pool([FakeWorker("bf16-0", "bf16")], http=True) as pool:
            with trace.get_tracer("test-client").start_as_current_span("http-client"):
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                body = {"model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": 2}
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(pool.http_url + "/completions", json=body, headers=carrier) as reply,
                ):
                    assert reply.status == 200

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    finished = {span.name: span for span in exporter.get_finished_spans()}
    client, router = finished["http-client"], finished["tierserve.Router/Generate"]
    assert router.parent.span_id == client.context.span_id
    assert router.attributes["tierserve.protocol"] == "http"
    assert router.attributes["tierserve.worker_id"] == "bf16-0"
    assert router.attributes["rpc.grpc.status_code"] == 0


def test_spans_are_no_ops_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "AVAILABLE", False)
    span = tracing.start_request_span("x", [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")], {})
    span.set({"a": 1})
    assert not span.recording and span.outgoing_metadata() == ()
    span.end(grpc.StatusCode.INTERNAL, "boom")  # nothing to end, nothing raised


# A process that configures OTLP export, ends one request span and flushes. Run apart: OpenTelemetry
# takes one global tracer provider per process, and this test's must export for real.
_OTLP_CHILD = """
import sys
from opentelemetry import trace
from tierserve.domain.config import TracingConfig
from tierserve.rpc.tracing import configure_tracing, start_request_span

configure_tracing(TracingConfig(exporter="otlp", otlp_endpoint=sys.argv[1]), "tierserve-test")
start_request_span("tierserve.Router/Generate", (), {"tierserve.tier": "bf16"}).end(None)
assert trace.get_tracer_provider().force_flush(10_000)
"""


def test_otlp_exporter_delivers_spans_to_a_collector(tmp_path: Any) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc", reason="the otel extra is not installed")
    import subprocess
    import sys

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[Any] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc,unused-ignore]
        def Export(self, request: Any, context: Any) -> Any:
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)  # type: ignore[no-untyped-call,unused-ignore]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        subprocess.run(
            [sys.executable, "-c", _OTLP_CHILD, f"127.0.0.1:{port}"], check=True, timeout=60, cwd=tmp_path
        )
    finally:
        server.stop(None)
    spans = [
        span
        for export in received
        for resource in export.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert [span.name for span in spans] == ["tierserve.Router/Generate"]
    services = {
        attribute.value.string_value
        for export in received
        for resource in export.resource_spans
        for attribute in resource.resource.attributes
        if attribute.key == "service.name"
    }
    assert services == {"tierserve-test"}
