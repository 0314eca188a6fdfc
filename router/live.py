"""What the router measures of one worker from every token it relays.

Before any relayed traffic the worker's own warm-up self-measurement stands in;
from the first relayed token on, the router's live figures take over.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

from tierserve_client.v1 import router_pb2, worker_pb2

from tierserve.domain.latency import LatencyWindow
from tierserve.domain.prefill import PrefillFit, fit_prefill

# (prompt tokens, TTFT) pairs kept for the prefill fit.
PREFILL_SAMPLES = 64
# Live prompt lengths must span this factor before the router fits prefill from them alone.
MIN_LENGTH_SPREAD = 2.0
# Concurrency levels are counted up to this many streams; more share the last key.
MAX_STREAMS_KEY = 8


class Ewma:
    """Exponentially weighted moving average; None until the first sample."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None
        self.samples = 0

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)
        self.samples += 1


class LiveStats:
    """One worker's latency as the router sees it: moving averages, windows, prefill, TPOT by
    the number of streams generating on the worker's cores."""

    def __init__(self, window: int = 512, alpha: float = 0.2, clock: Callable[[], float] = time.monotonic):
        self.window = LatencyWindow(window, clock)
        self.alpha = alpha
        self.ttft = Ewma(alpha)
        self.tpot = Ewma(alpha)
        self.tokens_relayed = 0
        self._tpot_by_streams: dict[int, Ewma] = {}
        self._prefill: deque[tuple[int, float]] = deque(maxlen=PREFILL_SAMPLES)
        self._warmup_tpot_us = 0.0
        self._warmup_prefill: list[tuple[int, float]] = []

    def seed(self, info: worker_pb2.WorkerInfo) -> None:
        """Take the worker's own warm-up figures, used until relayed traffic replaces them."""
        warm = info.warmup_latency
        if warm.samples:
            self._warmup_tpot_us = float(warm.tpot_p50_us)
            self._warmup_prefill = [(p.prompt_tokens, float(p.ttft_us)) for p in info.warmup_prefill]
            if not self._warmup_prefill and info.warmup_prompt_tokens > 0:
                self._warmup_prefill = [(info.warmup_prompt_tokens, float(warm.ttft_p50_us))]

    def record_first_token(self, ttft_us: float) -> None:
        self.window.record_first_token(ttft_us)
        self.ttft.add(ttft_us)
        self.tokens_relayed += 1

    def record_token(self, latency_us: float, streams: int) -> None:
        self.window.record_token(latency_us)
        self.tpot.add(latency_us)
        key = min(max(streams, 1), MAX_STREAMS_KEY)
        self._tpot_by_streams.setdefault(key, Ewma(self.alpha)).add(latency_us)
        self.tokens_relayed += 1

    def record_prefill(self, prompt_tokens: int, ttft_us: float) -> None:
        if prompt_tokens > 0 and ttft_us > 0:
            self._prefill.append((prompt_tokens, ttft_us))

    @property
    def basis(self) -> str:
        if self.tokens_relayed:
            return "live"
        return "warm-up" if self._warmup_tpot_us else "none"

    def prefill(self) -> PrefillFit | None:
        """Live prefill once relayed prompts of different enough lengths support a line. Until
        then the warm-up line's cost per token, levelled to the live TTFTs when there are some
        (warm-up ran beside other workers' warm-ups, so its level is the less trustworthy part)."""
        warm = fit_prefill(self._warmup_prefill)
        live = list(self._prefill)
        lengths = [p for p, _ in live]
        # Lengths a few tokens apart fit noise, not a slope: ask for a factor of two between them.
        if (live and max(lengths) >= MIN_LENGTH_SPREAD * min(lengths)) or (live and warm is None):
            return fit_prefill(live)
        if not live or warm is None:
            return warm
        slope = warm.per_token_us
        base = statistics.fmean(t - slope * p for p, t in live)
        return PrefillFit(max(base, 0.0), slope)

    def tpot_us(self, streams: int) -> tuple[float | None, str]:
        """TPOT expected with `streams` generating on the worker's cores, and where it comes from.

        The figure measured at that concurrency when there is one. Else the figure at the
        highest concurrency measured below it (live, then the warm-up's one stream), scaled by
        how many more streams share the cores: no batching gain is assumed until it is measured.
        The one-stream figure unscaled, used before, predicted a solo TPOT for a batch whose
        steps the router had never seen, where a step of 8 can cost 3.7x a step of 1
        (docs/benchmarks/throughput-2026-12-02-epyc-zen3-avx2.md). Requests whose budgets allow
        the pessimistic figure still go there, and their tokens measure it."""
        key = min(max(streams, 1), MAX_STREAMS_KEY)
        measured = self._tpot_by_streams.get(key)
        if measured is not None and measured.value is not None:
            return measured.value, f"measured at {key} stream{'s' if key > 1 else ''}"
        below = [k for k, ewma in self._tpot_by_streams.items() if k < key and ewma.value is not None]
        if below:
            known = max(below)
            value = self._tpot_by_streams[known].value or 0.0
            source = f"measured at {known} stream{'s' if known > 1 else ''}"
        elif self._warmup_tpot_us:
            known, value, source = 1, self._warmup_tpot_us, "worker's warm-up figure"
        else:
            return None, "no measurement yet"
        if known == key:
            return value, source
        return value * key / known, f"{source}; {key} streams unmeasured, scaled by {key}/{known}"

    def to_proto(self) -> router_pb2.LiveFigures:
        fit = self.prefill()
        figures = router_pb2.LiveFigures(
            ttft_ewma_us=self.ttft.value or 0.0,
            tpot_ewma_us=self.tpot.value or 0.0,
            prefill_base_us=fit.base_us if fit else 0.0,
            prefill_per_token_us=fit.per_token_us if fit else 0.0,
            basis=self.basis,
            tokens_relayed=self.tokens_relayed,
        )
        for streams, ewma in sorted(self._tpot_by_streams.items()):
            figures.tpot_by_concurrency.add(streams=streams, tpot_us=ewma.value or 0.0, samples=ewma.samples)
        return figures


class PromptTokenEstimator:
    """Prompt tokens from characters, without a tokenizer in the router: a characters-per-token
    ratio reported by the workers' tokenizer, then learned from every summary's prompt_tokens."""

    DEFAULT_CHARS_PER_TOKEN = 4.0

    def __init__(self, alpha: float = 0.2) -> None:
        self._ratio = Ewma(alpha)
        self._reported: float | None = None

    def report(self, chars_per_token: float) -> None:
        if chars_per_token > 0:
            self._reported = chars_per_token

    def learn(self, prompt_chars: int, prompt_tokens: int) -> None:
        if prompt_chars > 0 and prompt_tokens > 0:
            self._ratio.add(prompt_chars / prompt_tokens)

    @property
    def chars_per_token(self) -> float:
        return self._ratio.value or self._reported or self.DEFAULT_CHARS_PER_TOKEN

    def estimate(self, prompt: str) -> int:
        return self.estimate_chars(len(prompt))

    def estimate_chars(self, prompt_chars: int) -> int:
        return max(1, round(prompt_chars / self.chars_per_token))
