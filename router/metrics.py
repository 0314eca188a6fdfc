"""The router's Prometheus metrics: requests, relayed latency, SLO results, routing decisions, and the
pool's load read at scrape time.

Every label value is bounded: tiers and workers come from the config, statuses are gRPC code names,
and a routing decision is counted by category (eligible, best_effort, pinned, rejected), never by
the policy's free-text reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from tierserve_client.v1 import generate_pb2, router_pb2

from tierserve.router.occupancy import batch_occupancy
from tierserve.router.pool import WorkerHandle
from tierserve.rpc.metrics import (
    NO_TIER,
    NO_WORKER,
    SLO_MET,
    SLO_MISSED,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    has_budget,
    status_label,
)

# Every value of the status label, and of the failover kinds.
STATUS_LABELS = tuple(dict.fromkeys([status_label(None), *(status_label(code) for code in grpc.StatusCode)]))
FAILOVER_KINDS = ("resumed", "retried")

# The door a request came in by: the `protocol` label of the request metrics. The HTTP API
# (router/http/) sets it in the task that serves each of its requests; gRPC calls keep the default.
GRPC = "grpc"
HTTP = "http"
request_protocol: ContextVar[str] = ContextVar("tierserve_request_protocol", default=GRPC)
PROTOCOLS = (GRPC, HTTP)

# Routing decision categories.
ELIGIBLE = "eligible"
BEST_EFFORT = "best_effort"
PINNED = "pinned"
REJECTED = "rejected"


def decision_category(pinned_tier: str, best_effort: bool) -> str:
    """The bounded label for a decision the policy made (rejections are counted apart)."""
    if best_effort:
        return BEST_EFFORT
    return PINNED if pinned_tier else ELIGIBLE


class PoolCollector(Collector):
    """Queue depth, in-flight requests, health, model load time and continuous batch per worker, read
    at scrape time so the figures are never stale (the batch: as of the worker's last Describe)."""

    def __init__(self, workers: Callable[[], Sequence[WorkerHandle]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "tier"]
        queued = GaugeMetricFamily(
            "tierserve_router_queue_depth",
            "Requests waiting behind the one generating, per worker",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "tierserve_router_in_flight", "Requests the router has in flight per worker", labels=labels
        )
        up = GaugeMetricFamily(
            "tierserve_router_worker_up", "1 when the worker reports SERVING to the router", labels=labels
        )
        load = GaugeMetricFamily(
            "tierserve_router_worker_model_load_seconds",
            "Model load time the worker reported (0 until it has)",
            labels=labels,
        )
        batch = BatchFamilies(labels)
        for worker in self._workers():
            key = [worker.worker_id, worker.tier]
            queued.add_metric(key, worker.load.queued)
            in_flight.add_metric(key, worker.in_flight)
            up.add_metric(key, 1.0 if worker.health == router_pb2.WORKER_HEALTH_SERVING else 0.0)
            load.add_metric(key, worker.info.load_time_ms / 1e3 if worker.info is not None else 0.0)
            if worker.info is not None and worker.info.HasField("batch"):
                batch.add(key, batch_occupancy(worker.info.batch, time.monotonic() - worker.described_at))
        yield from (queued, in_flight, up, load, *batch.families())


class BatchFamilies:
    """Each worker's continuous batch as it last reported it (Describe, polled with the health
    checks): a worker that has not answered yet has no series."""

    def __init__(self, labels: list[str]) -> None:
        def gauge(name: str, documentation: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"tierserve_router_worker_{name}", documentation, labels=labels)

        self.running = gauge("batch_running", "Streams decoding together on the worker")
        self.waiting = gauge("batch_waiting", "Requests waiting on the worker for a place in its batch")
        self.max_batch = gauge("batch_max", "Most streams the worker decodes together (1: no batching)")
        self.kv_used = gauge("kv_cache_tokens", "KV-cache positions the worker's batch holds")
        self.kv_budget = gauge("kv_cache_budget_tokens", "KV-cache positions the worker's batch may hold")
        self.age = gauge("batch_age_seconds", "How old the worker's batch figures are")

    def add(self, key: list[str], batch: router_pb2.BatchOccupancy) -> None:
        self.running.add_metric(key, batch.running)
        self.waiting.add_metric(key, batch.waiting)
        self.max_batch.add_metric(key, batch.max_batch)
        self.kv_used.add_metric(key, batch.kv_tokens_used)
        self.kv_budget.add_metric(key, batch.kv_tokens_budget)
        self.age.add_metric(key, batch.age_ms / 1e3)

    def families(self) -> tuple[GaugeMetricFamily, ...]:
        return (self.running, self.waiting, self.max_batch, self.kv_used, self.kv_budget, self.age)


class RouterMetrics:
    """The router's instruments, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        per_worker = ["tier", "worker"]
        self.requests = Counter(
            "tierserve_router_requests",
            "Generate requests by the worker's tier, the final status (tier none: never routed) and the "
            "protocol they came by (grpc, http)",
            [*per_worker, "status", "protocol"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "tierserve_router_ttft_seconds",
            "Time to first token as the router saw it, waiting included, by protocol (grpc, http)",
            [*per_worker, "protocol"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "tierserve_router_tpot_seconds",
            "Latency of every relayed token after the first, as measured by the worker",
            per_worker,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "tierserve_router_tokens", "Tokens relayed to clients", per_worker, registry=self.registry
        )
        self.slo = Counter(
            "tierserve_router_slo",
            "Requests with a latency budget by result (met, missed; best effort counts as missed)",
            [*per_worker, "result"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "tierserve_router_routing_decisions",
            "Routing decisions by policy and category (eligible, best_effort, pinned, rejected)",
            ["policy", "reason", "tier"],
            registry=self.registry,
        )

        self.failovers = Counter(
            "tierserve_router_failovers",
            "Requests moved off a failed worker, by that worker, its status and whether tokens had been "
            "streamed (resumed) or not (retried)",
            [*per_worker, "status", "kind"],
            registry=self.registry,
        )

    def watch_pool(self, workers: Callable[[], Sequence[WorkerHandle]]) -> None:
        self.registry.register(PoolCollector(workers))

    def decided(self, policy: str, pinned_tier: str, best_effort: bool, tier: str) -> None:
        self.decisions.labels(policy, decision_category(pinned_tier, best_effort), tier).inc()

    def refused(self, policy: str, code: grpc.StatusCode, routed: bool) -> None:
        """A request that never reached a worker; `routed`: the policy refused it (not validation)."""
        if routed:
            self.decisions.labels(policy, REJECTED, NO_TIER).inc()
        self.requests.labels(NO_TIER, NO_WORKER, status_label(code), request_protocol.get()).inc()

    def token(self, tier: str, worker: str, token: generate_pb2.Token, seen_ttft_s: float | None) -> None:
        """One relayed token; the first with the TTFT the router saw."""
        self.tokens.labels(tier, worker).inc()
        if seen_ttft_s is not None:
            self.ttft.labels(tier, worker, request_protocol.get()).observe(seen_ttft_s)
        elif token.index > 0:
            self.tpot.labels(tier, worker).observe(token.latency_us / 1e6)

    def completed(self, tier: str, worker: str, request: generate_pb2.GenerateRequest, met: bool) -> None:
        if has_budget(request):
            self.slo.labels(tier, worker, SLO_MET if met else SLO_MISSED).inc()

    def failed_over(self, tier: str, worker: str, code: grpc.StatusCode, resumed: bool) -> None:
        kind = FAILOVER_KINDS[0] if resumed else FAILOVER_KINDS[1]
        self.failovers.labels(tier, worker, status_label(code), kind).inc()

    def forget_worker(self, worker: str, tier: str) -> None:
        """Drop every series of a worker that left the pool (DNS churn, an expired registration):
        the series stay as many as the workers the pool has, however many came and went."""
        for status in STATUS_LABELS:
            for protocol in PROTOCOLS:
                self.requests.remove(tier, worker, status, protocol)
            for kind in FAILOVER_KINDS:
                self.failovers.remove(tier, worker, status, kind)
        for result in (SLO_MET, SLO_MISSED):
            self.slo.remove(tier, worker, result)
        for protocol in PROTOCOLS:
            self.ttft.remove(tier, worker, protocol)
        for per_worker in (self.tpot, self.tokens):
            per_worker.remove(tier, worker)

    def finished(self, tier: str, worker: str, code: grpc.StatusCode | None) -> None:
        self.requests.labels(tier, worker, status_label(code), request_protocol.get()).inc()
