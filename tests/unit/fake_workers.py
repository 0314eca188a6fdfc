"""Fake workers for policy tests: fixed accuracy, load and predicted latency."""

from __future__ import annotations

from dataclasses import dataclass

from tierserve.router.prediction import Prediction


@dataclass
class FakeWorker:
    worker_id: str
    tier: str
    healthy: bool = True
    quality_loss_pct: float | None = 0.0
    # What the router would predict for a request here now, milliseconds (TTFT includes wait_ms).
    ttft_ms: float = 50.0
    tpot_ms: float = 20.0
    wait_ms: float = 0.0
    outstanding: int = 0
    queue_limit: int = 8
    next_free_ms: float = 100.0
    # Waiting requests a new one would make late here.
    displaces: int = 0

    @property
    def has_room(self) -> bool:
        return self.outstanding <= self.queue_limit

    def predict(
        self,
        prompt_tokens: int,
        first_token_budget_ms: float = 0.0,
        new_tokens: int = 0,
        token_budget_ms: float = 0.0,
    ) -> Prediction:
        return Prediction(
            self.wait_ms * 1e3, self.ttft_ms * 1e3, self.tpot_ms * 1e3, displaces=self.displaces
        )


def tiered_pool() -> list[FakeWorker]:
    """Five tiers with this machine's measured shape: fp32 slow and exact, bf16 fast and -0.00%,
    int8-sq fast and far off, the weight-only tiers fast and close."""
    return [
        FakeWorker("fp32-0", "fp32", quality_loss_pct=0.0, ttft_ms=70, tpot_ms=29),
        FakeWorker("bf16-0", "bf16", quality_loss_pct=-0.001, ttft_ms=38, tpot_ms=12.7),
        FakeWorker("int8-sq-0", "int8-sq", quality_loss_pct=24.5, ttft_ms=29, tpot_ms=12.1),
        FakeWorker("int8-woq-0", "int8-woq", quality_loss_pct=0.68, ttft_ms=99, tpot_ms=13.5),
        FakeWorker("int4-woq-0", "int4-woq", quality_loss_pct=0.25, ttft_ms=81, tpot_ms=9.4),
    ]
