"""A worker's state with a fake engine in place of the model: three tokens at set latencies."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import cast

from tierserve.domain.config import ModelConfig, WorkerConfig
from tierserve.domain.latency import LatencyWindow
from tierserve.domain.requests import GenerationParams
from tierserve.ops.pinning import Pinning
from tierserve.worker.accuracy import AccuracyCard
from tierserve.worker.engine import Engine, FinishReason, GenerationOutcome, TokenEvent
from tierserve.worker.state import LoadReport, WorkerState


class FakeEngine:
    """Stands in for the model: three tokens at set latencies."""

    latencies_us: tuple[int, ...] = (40_000, 12_000, 14_000)
    context_tokens = 2048
    # What Describe reports of the loaded model.
    loaded = SimpleNamespace(backend="fake", kernel="fake kernel", dtype="torch.bfloat16")

    def prepare(self, params: GenerationParams) -> object:
        return params

    def generate(
        self,
        prompt: object,
        params: GenerationParams,
        emit: Callable[[TokenEvent], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> GenerationOutcome:
        for index, latency in enumerate(self.latencies_us):
            emit(TokenEvent(" y", 7, index, latency))
        return GenerationOutcome(3, FinishReason.LENGTH, 0, list(self.latencies_us), " y y y")


def worker_state() -> WorkerState:
    state = WorkerState(
        config=WorkerConfig(name="bf16-0", tier="bf16"),
        model=ModelConfig(),
        pinning=Pinning([0], 1),
        max_new_tokens_limit=64,
    )
    card = AccuracyCard(10.0, 0.0, 0.0, 1.0, 64, 10.0)
    report = LoadReport(
        "/model", load_time_ms=2500.0, warmup_time_ms=800.0, warmup_latency=LatencyWindow(), card=card
    )
    state.ready(cast(Engine, FakeEngine()), report)
    return state
