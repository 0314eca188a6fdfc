"""Optional OpenTelemetry tracing: one span per request on the router and one on the worker, the
worker's a child of the router's through the W3C `traceparent` gRPC metadata.

Everything here is a no-op unless the `otel` extra is installed (`pip install 'tierserve[otel]'`);
spans are exported only when `[tracing] exporter` names an exporter (or the application configured
an OpenTelemetry TracerProvider itself).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from tierserve.domain.config import TracingConfig
from tierserve.domain.errors import StartupError

log = logging.getLogger(__name__)

try:  # the optional extra
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    AVAILABLE = False

TRACER_NAME = "tierserve"
Attributes = Mapping[str, str | int | float | bool]


class RequestSpan:
    """One request's span, or nothing when tracing is off; safe to use either way."""

    def __init__(self, span: Any = None) -> None:
        self._span = span

    @property
    def recording(self) -> bool:
        return self._span is not None and bool(self._span.is_recording())

    def set(self, attributes: Attributes) -> None:
        if self._span is not None:
            self._span.set_attributes(dict(attributes))

    def outgoing_metadata(self) -> tuple[tuple[str, str], ...]:
        """`traceparent` (and `tracestate`) naming this span as the parent of the next hop."""
        if self._span is None:
            return ()
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self._span))
        return tuple(carrier.items())

    def end(self, code: grpc.StatusCode | None, message: str = "") -> None:
        """Close the span with the request's final gRPC status (None: OK)."""
        if self._span is None:
            return
        self._span.set_attribute("rpc.grpc.status_code", 0 if code is None else int(code.value[0]))
        if code is not None and code != grpc.StatusCode.CANCELLED:
            self._span.set_status(Status(StatusCode.ERROR, message or code.name))
        self._span.end()
        self._span = None


def start_request_span(
    name: str, incoming_metadata: Iterable[tuple[str, Any]] | None, attributes: Attributes
) -> RequestSpan:
    """A server span for one request, continuing the caller's trace when its metadata carries one.

    The span is not made current: the request's code runs in an async generator across many
    awaits, so the span is passed explicitly instead of through the context."""
    if not AVAILABLE:
        return RequestSpan()
    carrier = {key: value for key, value in incoming_metadata or () if isinstance(value, str)}
    parent = propagate.extract(carrier)
    tracer = trace.get_tracer(TRACER_NAME)
    span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes))
    return RequestSpan(span)


def configure_tracing(config: TracingConfig, service_name: str) -> None:
    """Install an SDK TracerProvider exporting as configured; nothing for exporter "none"."""
    if config.exporter == "none":
        return
    if not AVAILABLE:
        raise StartupError(
            f"[tracing] exporter = {config.exporter!r} needs the otel extra: pip install 'tierserve[otel]'"
        )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if config.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError as error:
            raise StartupError(
                "[tracing] exporter = 'otlp' needs opentelemetry-exporter-otlp-proto-grpc installed"
            ) from error
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans (%s) as %s", config.exporter, service_name)
