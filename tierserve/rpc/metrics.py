"""What the router's and the workers' Prometheus metrics share: buckets, label values, the HTTP endpoint.

Each process keeps its metrics in its own `CollectorRegistry` (no global state, so tests can run
several servers in one process) and serves it at `http://<host>:<port>/metrics`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from tierserve_client.v1 import generate_pb2

from tierserve.rpc.server import write_port_file

log = logging.getLogger(__name__)

# Seconds. TTFT spans a short prompt on a fast tier to a long prompt behind a queue.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds. TPOT of a small model on a few cores is milliseconds; of a large one, a second or so.
TPOT_BUCKETS = (0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
QUEUE_BUCKETS = (0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Label values for requests that never reached a worker.
NO_TIER = "none"
NO_WORKER = "none"
# SLO results; only requests that carry a latency budget are counted.
SLO_MET = "met"
SLO_MISSED = "missed"


def status_label(code: grpc.StatusCode | None) -> str:
    """A request's final status as a short, bounded label: "ok", "resource_exhausted", ..."""
    return "ok" if code is None else str(code.name).lower()


def has_budget(request: generate_pb2.GenerateRequest) -> bool:
    """SLO results count only requests that carried a latency budget (defaults applied)."""
    return request.max_token_latency_ms > 0 or request.max_first_token_latency_ms > 0


def metrics_port_file(port_file: Path) -> Path:
    """Where a process writes its metrics port: beside its gRPC port file (router.port ->
    router.metrics.port)."""
    return port_file.with_suffix(".metrics.port")


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server (a daemon thread); `close` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, port_file: Path | None = None
) -> MetricsEndpoint:
    """Serve `registry` on host:port (0: a free port); write the bound port beside `port_file`."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    endpoint = MetricsEndpoint(server, thread)
    if port_file is not None:
        write_port_file(metrics_port_file(port_file), endpoint.port)
    log.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
