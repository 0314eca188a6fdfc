"""What a running worker knows about itself: its engine once loaded, its pinning, its live figures."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import intel_extension_for_pytorch
import psutil
import torch
import transformers
from tierserve_client.v1 import worker_pb2

from tierserve.domain.config import ModelConfig, WorkerConfig
from tierserve.domain.errors import NoWorkerAvailable
from tierserve.domain.latency import LatencyWindow
from tierserve.ops.pinning import Pinning
from tierserve.worker.accuracy import AccuracyCard
from tierserve.worker.batching.engine import BatchEngine
from tierserve.worker.engine import Engine
from tierserve.worker.numa import NumaBinding
from tierserve.worker.scheduling import DeadlineSlot


@dataclass
class LoadReport:
    model_path: str
    load_time_ms: float
    warmup_time_ms: float
    warmup_latency: LatencyWindow
    card: AccuracyCard
    # What the card was scored through (`preparation.THROUGH_BATCH` or `THROUGH_GENERATE`).
    card_scored_through: str = ""
    # The self-measurement's prompt length (its TTFT is for this many tokens), and the
    # tokenizer's characters per token on it: the router estimates prompt tokens from these.
    warmup_prompt_tokens: int = 0
    chars_per_token: float = 0.0
    # (prompt tokens, TTFT in microseconds) at the self-measurement's prompt lengths.
    warmup_prefill: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class WorkerState:
    config: WorkerConfig
    model: ModelConfig
    pinning: Pinning
    max_new_tokens_limit: int
    numa: NumaBinding | None = None
    live: LatencyWindow = field(default_factory=LatencyWindow)
    engine: Engine | None = None
    # Set when requests share the model through continuous batching (the default).
    batch: BatchEngine | None = None
    load_report: LoadReport | None = None
    in_flight: int = 0
    queued: int = 0
    notices: list[str] = field(default_factory=list)
    # The model serves one request at a time with all of the worker's cores; the next is the
    # waiting request whose first token is due first.
    _model_slot: DeadlineSlot = field(default_factory=DeadlineSlot)

    def ready(self, engine: Engine, report: LoadReport) -> None:
        self.engine, self.load_report = engine, report

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise NoWorkerAvailable(f"worker {self.config.name} is still loading its model; retry shortly")
        return self.engine

    @contextlib.asynccontextmanager
    async def model_slot(self, deadline: float) -> AsyncIterator[float]:
        """Wait for the model, earliest `deadline` (time.perf_counter() seconds) first; yields the
        time spent waiting, in seconds."""
        started = time.perf_counter()
        self.queued += 1
        try:
            await self._model_slot.acquire(deadline)
        finally:
            self.queued -= 1
        self.in_flight += 1
        try:
            yield time.perf_counter() - started
        finally:
            self.in_flight -= 1
            self._model_slot.release()

    def load_figures(self) -> tuple[int, int]:
        """Requests in the worker (generating or waiting) and, of those, waiting for the model."""
        if self.batch is None:
            return self.in_flight, self.queued
        occupancy = self.batch.occupancy()
        return occupancy.running + occupancy.waiting, occupancy.waiting

    def batch_state(self) -> worker_pb2.BatchState:
        if self.batch is None:
            return worker_pb2.BatchState(
                enabled=False, running=self.in_flight - self.queued, waiting=self.queued, max_batch=1
            )
        occupancy = self.batch.occupancy()
        return worker_pb2.BatchState(
            enabled=True,
            running=occupancy.running,
            waiting=occupancy.waiting,
            max_batch=occupancy.max_batch,
            kv_tokens_used=occupancy.kv_tokens_used,
            kv_tokens_budget=occupancy.kv_tokens_budget,
            kv_cache_mb=occupancy.kv_bytes / 2**20,
            step_us_by_rows={rows: round(s * 1e6) for rows, s in self.batch.step_times.snapshot().items()},
        )

    def describe(self) -> worker_pb2.WorkerInfo:
        in_flight, queued = self.load_figures()
        info = worker_pb2.WorkerInfo(
            worker_id=self.config.name,
            tier=self.config.tier,
            model=self.model.name,
            cores=self.pinning.cpus,
            numa_node=self.numa.node if self.numa is not None else -1,
            affinity=sorted(os.sched_getaffinity(0)),
            threads=torch.get_num_threads(),
            max_new_tokens_limit=self.max_new_tokens_limit,
            rss_mb=psutil.Process().memory_info().rss / 2**20,
            live_latency=self.live.to_proto(),
            in_flight=in_flight,
            queued=queued,
            batch=self.batch_state(),
            notices=[*self.pinning.notices, *(self.numa.notices if self.numa else []), *self.notices],
            versions={
                "torch": torch.__version__,
                "intel-extension-for-pytorch": intel_extension_for_pytorch.__version__,
                "transformers": transformers.__version__,
            },
        )
        if self.numa is not None:
            info.memory_nodes.extend(self.numa.memory_nodes)
            info.numa_binding = self.numa.description
        if self.engine is not None:
            loaded = self.engine.loaded
            info.backend, info.kernel = loaded.backend, loaded.kernel
            info.dtype = str(loaded.dtype).removeprefix("torch.")
            info.max_context_tokens = self.engine.context_tokens
        if self.load_report is not None:
            info.model_path = self.load_report.model_path
            info.load_time_ms = self.load_report.load_time_ms
            info.warmup_time_ms = self.load_report.warmup_time_ms
            info.warmup_latency.CopyFrom(self.load_report.warmup_latency.to_proto())
            info.warmup_prompt_tokens = self.load_report.warmup_prompt_tokens
            info.chars_per_token = self.load_report.chars_per_token
            for tokens, ttft_us in self.load_report.warmup_prefill:
                info.warmup_prefill.add(prompt_tokens=tokens, ttft_us=ttft_us)
            info.accuracy.CopyFrom(self.load_report.card.to_proto())
        return info
