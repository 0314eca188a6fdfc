"""What the router's and the workers' Prometheus metrics share: buckets, label values, the HTTP endpoint.

Each process keeps its metrics in its own `CollectorRegistry` (no global state, so tests can run
several servers in one process) and serves it at `http://<host>:<port>/metrics`, from a server
that bounds its connections: a few at once (more are closed at once), each closed when it has
not finished within a timeout, so idle or dripping connections cannot pile up threads.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import grpc
from prometheus_client import CollectorRegistry, make_wsgi_app
from tierserve_client.v1 import generate_pb2

from tierserve.rpc.server import write_port_file

log = logging.getLogger(__name__)

# Seconds. TTFT spans a short prompt on a fast tier to a long prompt behind a queue.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds. TPOT of a small model on a few cores is milliseconds; of a large one, a second or so.
TPOT_BUCKETS = (0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
QUEUE_BUCKETS = (0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Defaults of [metrics] max_connections and connection_timeout_s.
MAX_CONNECTIONS = 8
CONNECTION_TIMEOUT_S = 10.0

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


class _ScrapeHandler(WSGIRequestHandler):
    """One scrape connection, closed after `timeout` seconds in all (sending the request and reading
    the answer included), however slowly its bytes come; nothing is logged per request."""

    timeout = CONNECTION_TIMEOUT_S

    def setup(self) -> None:
        super().setup()  # each read and write also times out after `timeout`
        self._deadline = threading.Timer(self.timeout or CONNECTION_TIMEOUT_S, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):  # already closed
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class BoundedMetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `max_connections` at once: one more is closed at once."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, max_connections: int, timeout_s: float
    ) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(max_connections)
        handler = type("ScrapeHandler", (_ScrapeHandler,), {"timeout": timeout_s})
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # its thread never started
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or went away: its problem, not worth a traceback.
        log.debug("metrics connection from %s ended: %s", client_address, sys.exc_info()[1])


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
    registry: CollectorRegistry,
    host: str,
    port: int,
    port_file: Path | None = None,
    max_connections: int = MAX_CONNECTIONS,
    timeout_s: float = CONNECTION_TIMEOUT_S,
) -> MetricsEndpoint:
    """Serve `registry` on host:port (0: a free port), at most `max_connections` connections at
    once, each for at most `timeout_s`; write the bound port beside `port_file`."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server = BoundedMetricsServer((str(sockaddr[0]), port), family, max_connections, timeout_s)
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    endpoint = MetricsEndpoint(server, thread)
    if port_file is not None:
        write_port_file(metrics_port_file(port_file), endpoint.port)
    log.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
