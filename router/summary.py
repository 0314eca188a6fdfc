"""The summary a client receives, completed in one place.

The last worker's summary describes that worker's part of the stream; the router completes it with
its routing decision, judges the budget as the client saw it, and, when the request failed over,
makes it describe the whole stream the client received. A worker that failed after its last token
sent no summary: the router writes one itself.
"""

from __future__ import annotations

from tierserve_client.v1 import generate_pb2

from tierserve.domain.requests import within_budget
from tierserve.router.failover import StreamProgress
from tierserve.router.policies.base import RoutingDecision

CLOSED_BY_ROUTER = "summary by the router: its worker failed after the last token"


def complete_summary(
    summary: generate_pb2.Summary,
    progress: StreamProgress,
    total_time_us: int,
    policy: str,
    decision: RoutingDecision,
) -> None:
    """Complete the last worker's summary, in place, `total_time_us` after the request arrived."""
    # No token reached the client: its first-token latency is the worker's wait and TTFT.
    client_ttft_us = progress.client_ttft_us or summary.queue_time_us + summary.ttft_us
    summary.routing_reason = decision.reason
    summary.policy = policy
    summary.best_effort = decision.best_effort
    prediction = decision.prediction
    if prediction is not None and prediction.known:
        summary.predicted_queue_us = int(prediction.wait_us)
        summary.predicted_ttft_us = int(prediction.ttft_us)
        summary.predicted_tpot_us = int(prediction.tpot_us)
    # Best effort means the router already knew it could not promise the budget: reported as not
    # met, whatever the stream then happened to achieve.
    summary.budget_met = not decision.best_effort and within_budget(
        progress.request, client_ttft_us, summary.tpot_mean_us
    )
    if not progress.failed_workers:
        return
    if progress.offset:
        # The resumed worker counted the streamed text as prompt and only its own tokens.
        summary.prompt_tokens = max(1, summary.prompt_tokens - progress.offset)
        summary.generated_tokens += progress.offset
        summary.ttft_us = progress.first_token_latency_us
    summary.text = progress.text_at_offset + summary.text
    _describe_failovers(summary, progress, total_time_us, progress.offset)


def closing_summary(progress: StreamProgress, total_time_us: int) -> generate_pb2.Summary:
    """The summary of a stream whose worker failed after its last token, before its own summary:
    the client has every token, so the router closes the stream itself."""
    summary = generate_pb2.Summary(
        worker_id=progress.failed_workers[-1],
        generated_tokens=progress.tokens_sent,
        ttft_us=progress.first_token_latency_us,
        # As the worker marked its last token; unmarked, the stream ended on its token budget.
        finish_reason=progress.finish_reason or generate_pb2.FINISH_REASON_LENGTH,
        routing_reason=CLOSED_BY_ROUTER,
        text=progress.text_sent,
    )
    # Nothing was resumed: the text is all there already.
    _describe_failovers(summary, progress, total_time_us, resumed_at=0)
    return summary


def _describe_failovers(
    summary: generate_pb2.Summary, progress: StreamProgress, total_time_us: int, resumed_at: int
) -> None:
    """Name the failed workers and the resume point; the request's own id and seed replace those
    of the last worker's (possibly resumed) request."""
    summary.failovers = progress.failovers
    summary.failed_workers.extend(progress.failed_workers)
    summary.resumed_after_tokens = resumed_at
    summary.request_id = progress.request.request_id
    summary.seed = progress.request.seed  # the resumed worker's was derived from it
    summary.total_time_us = total_time_us
    summary.routing_reason = (
        f"failover after {', '.join(progress.failure_reasons)}"
        f"{f' (resumed at token {resumed_at})' if resumed_at else ''}; {summary.routing_reason}"
    )
