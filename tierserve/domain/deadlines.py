"""First-token deadlines: the order in which a worker serves the requests waiting for its model
(earliest first), shared by the worker that keeps the order and the router that predicts it.

Requests without a first-token budget get a far deadline: they yield to budgeted requests, but
only for so long, so none waits for ever.
"""

from __future__ import annotations

# A request without a TTFT budget is due this long after it arrives.
NO_BUDGET_DEADLINE_S = 60.0


def first_token_deadline(arrival_s: float, max_first_token_latency_ms: float) -> float:
    """When the request's first token is due, on the clock `arrival_s` was read from."""
    if max_first_token_latency_ms > 0:
        return arrival_s + max_first_token_latency_ms / 1e3
    return arrival_s + NO_BUDGET_DEADLINE_S
