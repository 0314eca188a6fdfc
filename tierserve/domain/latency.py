"""A sliding window of latency samples, with the percentiles both worker and router report."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from tierserve_client.v1 import worker_pb2


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; 0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


class LatencyWindow:
    """The last `size` time-to-first-token and per-token latencies, and the token rate."""

    def __init__(self, size: int = 512, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttft_us: deque[float] = deque(maxlen=size)
        self._tpot_us: deque[float] = deque(maxlen=size)
        # (time, token count) of recent tokens, for tokens per second.
        self._token_times: deque[float] = deque(maxlen=size)
        self._clock = clock

    def record_first_token(self, ttft_us: float) -> None:
        self._ttft_us.append(ttft_us)
        self._token_times.append(self._clock())

    def record_token(self, latency_us: float) -> None:
        self._tpot_us.append(latency_us)
        self._token_times.append(self._clock())

    def tokens_per_second(self, horizon_s: float = 10.0) -> float:
        now = self._clock()
        recent = [t for t in self._token_times if now - t <= horizon_s]
        if len(recent) < 2:
            return 0.0
        span = max(recent[-1] - recent[0], 1e-6)
        return (len(recent) - 1) / span

    def to_proto(self) -> worker_pb2.LatencyStats:
        return worker_pb2.LatencyStats(
            ttft_p50_us=int(percentile(self._ttft_us, 0.50)),
            ttft_p95_us=int(percentile(self._ttft_us, 0.95)),
            tpot_p50_us=int(percentile(self._tpot_us, 0.50)),
            tpot_p95_us=int(percentile(self._tpot_us, 0.95)),
            samples=len(self._ttft_us) + len(self._tpot_us),
            tokens_per_second=self.tokens_per_second(),
        )
