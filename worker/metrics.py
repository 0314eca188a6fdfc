"""A worker's Prometheus metrics: requests, its own TTFT/TPOT and queue time, SLO results, and its
queue, in-flight requests and model load time read at scrape time.

Every series carries the worker's tier and name, so one dashboard can sum or split the workers it
scrapes without relabelling.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from tierserve_client.v1 import generate_pb2

from tierserve.rpc.metrics import (
    QUEUE_BUCKETS,
    SLO_MET,
    SLO_MISSED,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    has_budget,
    status_label,
)
from tierserve.worker.state import WorkerState


class WorkerStateCollector(Collector):
    """Queue depth, in-flight requests, load and warm-up time, from the worker's state at scrape time."""

    def __init__(self, state: WorkerState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        labels = ["tier", "worker"]
        key = [self._state.config.tier, self._state.config.name]
        report = self._state.load_report
        in_flight, queued = self._state.load_figures()
        batch = self._state.batch_state()
        figures = (
            ("tierserve_worker_queue_depth", "Requests waiting for the model", queued),
            ("tierserve_worker_in_flight", "Requests in the worker: generating or waiting", in_flight),
            ("tierserve_worker_batch_running", "Streams decoding together now", batch.running),
            ("tierserve_worker_batch_max", "Most streams decoding together", batch.max_batch),
            (
                "tierserve_worker_kv_cache_tokens",
                "KV-cache positions held now",
                batch.kv_tokens_used,
            ),
            (
                "tierserve_worker_kv_cache_budget_tokens",
                "KV-cache positions the batch may hold",
                batch.kv_tokens_budget,
            ),
            (
                "tierserve_worker_model_load_seconds",
                "Time to load and optimise the model (0 while loading)",
                report.load_time_ms / 1e3 if report is not None else 0.0,
            ),
            (
                "tierserve_worker_warmup_seconds",
                "Time to warm up and self-measure (0 while loading)",
                report.warmup_time_ms / 1e3 if report is not None else 0.0,
            ),
            ("tierserve_worker_ready", "1 once the model is loaded and serving", float(report is not None)),
        )
        for name, documentation, value in figures:
            family = GaugeMetricFamily(name, documentation, labels=labels)
            family.add_metric(key, value)
            yield family
        holds = CounterMetricFamily(
            "tierserve_worker_batch_holds",
            "Requests the batch held while first in its queue, by reason (each reason once a request)",
            labels=[*labels, "reason"],
        )
        engine = self._state.batch
        for reason, count in (engine.occupancy().holds if engine is not None else {}).items():
            holds.add_metric([*key, reason], count)
        yield holds


class WorkerMetrics:
    """One worker's instruments, in a registry of their own."""

    def __init__(self, state: WorkerState, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._key = (state.config.tier, state.config.name)
        per_worker = ["tier", "worker"]
        self.requests = Counter(
            "tierserve_worker_requests",
            "Generate requests by final status",
            [*per_worker, "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "tierserve_worker_ttft_seconds",
            "Time to first token from the start of generation (prefill)",
            per_worker,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "tierserve_worker_tpot_seconds",
            "Latency of every token after the first",
            per_worker,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "tierserve_worker_queue_time_seconds",
            "Time a request waited for the model",
            per_worker,
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "tierserve_worker_tokens", "Tokens generated", per_worker, registry=self.registry
        )
        self.slo = Counter(
            "tierserve_worker_slo",
            "Requests with a latency budget by result (met, missed), waiting included",
            [*per_worker, "result"],
            registry=self.registry,
        )
        self.registry.register(WorkerStateCollector(state))

    def token(self, index: int, latency_us: int) -> None:
        self.tokens.labels(*self._key).inc()
        histogram = self.ttft if index == 0 else self.tpot
        histogram.labels(*self._key).observe(latency_us / 1e6)

    def completed(self, request: generate_pb2.GenerateRequest, summary: generate_pb2.Summary) -> None:
        self.queue_time.labels(*self._key).observe(summary.queue_time_us / 1e6)
        if has_budget(request):
            self.slo.labels(*self._key, SLO_MET if summary.budget_met else SLO_MISSED).inc()

    def finished(self, code: grpc.StatusCode | None) -> None:
        self.requests.labels(*self._key, status_label(code)).inc()
