"""Prefill time as a line in the prompt's length: a fixed part (the forward's own overhead, the
first token's logits and sampling) plus a part per prompt token. The router fits it to relayed
TTFTs and a batching worker to its own prefill forwards, so both predict a prompt's cost alike.
One rate through the origin does not: a 12-token prompt's fixed part makes it 5x dearer per token
than a 200-token one (int4-woq on an AMX Xeon: 35 ms against 145 ms), and a worker whose running
rate had just seen short prompts held long ones for stalls they would not have caused."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillFit:
    """TTFT (from generation start) is about base + per_token * prompt tokens, microseconds."""

    base_us: float
    per_token_us: float

    def ttft_us(self, prompt_tokens: int) -> float:
        return self.base_us + self.per_token_us * prompt_tokens


def fit_prefill(samples: list[tuple[int, float]]) -> PrefillFit | None:
    """A least-squares line through (prompt tokens, TTFT); through the origin when the samples
    cannot support a line (one prompt length, or a fit with a negative part)."""
    if not samples:
        return None
    lengths = [float(p) for p, _ in samples]
    ttfts = [t for _, t in samples]
    if len(set(lengths)) >= 2:
        slope, intercept = statistics.linear_regression(lengths, ttfts)
        if slope >= 0 and intercept >= 0:
            return PrefillFit(intercept, slope)
    ratio = sum(p * t for p, t in zip(lengths, ttfts, strict=True)) / max(sum(p * p for p in lengths), 1.0)
    return PrefillFit(0.0, max(ratio, 0.0))
