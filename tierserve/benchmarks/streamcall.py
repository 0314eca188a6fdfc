"""One streamed Generate call, timed by the client: when each token arrived, and what the summary said.

Both benchmarks that talk to a live pool (routing, overhead) time calls this one way, so their figures
mean the same thing: TTFT is from sending the request to receiving the first token (queueing and
routing included), and TPOT is the mean gap between tokens as they arrived.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import grpc
from tierserve_client.options import retry_hint_ms
from tierserve_client.v1 import generate_pb2, router_pb2_grpc, worker_pb2_grpc

# Either stub: both serve the same Generate.
GenerateStub = router_pb2_grpc.RouterStub | worker_pb2_grpc.WorkerStub


@dataclass
class CallResult:
    """A call as the client saw it. Times are seconds on the caller's perf_counter clock."""

    sent_s: float
    # Arrival time of every token, in order.
    token_times_s: list[float] = field(default_factory=list)
    done_s: float = 0.0
    # "OK", or the gRPC status code's name (RESOURCE_EXHAUSTED, UNAVAILABLE, ...).
    status: str = "OK"
    error: str = ""
    # The `retry-after-ms` hint sent with a RESOURCE_EXHAUSTED (None: no hint, or another status).
    retry_after_ms: int | None = None
    tier: str = ""
    worker_id: str = ""
    budget_met: bool | None = None
    generated_tokens: int = 0
    # The router's prediction for this request (0 when it made none), to compare with what happened.
    predicted_ttft_ms: float = 0.0
    predicted_tpot_ms: float = 0.0
    best_effort: bool = False
    # The worker's own time to the first token (its queue + prefill, from the summary), so a
    # benchmark can tell what happened outside the worker from the model's run-to-run noise.
    worker_ttft_ms: float | None = None
    # The generated text as the summary gives it (greedy runs of one prompt can be compared).
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK" and self.budget_met is not None

    def ttft_ms(self) -> float | None:
        return (self.token_times_s[0] - self.sent_s) * 1e3 if self.token_times_s else None

    def token_gaps_ms(self) -> list[float]:
        """Gaps between consecutive tokens as they arrived (the first token's latency excluded)."""
        times = self.token_times_s
        return [(b - a) * 1e3 for a, b in itertools.pairwise(times)]

    def outside_worker_ttft_ms(self) -> float | None:
        """TTFT the worker did not spend: transport, and the router when there is one."""
        ttft = self.ttft_ms()
        return None if ttft is None or self.worker_ttft_ms is None else ttft - self.worker_ttft_ms

    def tpot_mean_ms(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        times = self.token_times_s
        if len(times) < 2:
            return None
        return (times[-1] - times[0]) * 1e3 / (len(times) - 1)


async def timed_generate(
    stub: GenerateStub,
    request: generate_pb2.GenerateRequest,
    timeout_s: float | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> CallResult:
    """Send one request (with `metadata`, e.g. a bearer token) and time its stream; a status error is
    recorded, not raised."""
    result = CallResult(sent_s=time.perf_counter())
    try:
        async for response in stub.Generate(request, timeout=timeout_s, metadata=metadata or None):
            if response.HasField("token"):
                result.token_times_s.append(time.perf_counter())
            else:
                summary = response.summary
                result.tier, result.worker_id = summary.tier, summary.worker_id
                result.budget_met, result.generated_tokens = summary.budget_met, summary.generated_tokens
                result.predicted_ttft_ms = summary.predicted_ttft_us / 1e3
                result.predicted_tpot_ms = summary.predicted_tpot_us / 1e3
                result.best_effort = summary.best_effort
                result.text = summary.text
                if not summary.failovers:  # a resumed summary's TTFT is not one worker's
                    result.worker_ttft_ms = (summary.queue_time_us + summary.ttft_us) / 1e3
    except grpc.aio.AioRpcError as error:
        result.status, result.error = error.code().name, error.details() or ""
        result.retry_after_ms = retry_hint_ms(error.trailing_metadata())
    result.done_s = time.perf_counter()
    if result.status == "OK" and result.budget_met is None:
        result.status, result.error = "NO_SUMMARY", "the stream ended without a summary"
    return result
