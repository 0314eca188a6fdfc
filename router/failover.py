"""Failover of one request across workers: which worker errors are worth another worker, and how a
stream that already sent tokens resumes elsewhere without the client seeing a seam.

A request that fails before its first token is simply sent again. One that fails after tokens
were streamed is resumed: the next worker gets the same request with the text already streamed as
its `response_prefix` (appended to the prompt; for chat messages, after the template opens the
assistant's turn, so the text continues that turn), with the streamed tokens' ids (which it
continues from where they decode to that text, so its context is the one the first worker had), and
only the tokens still owed; its token indexes are shifted to continue the stream.

A continuation is checked against the limits before it is sent (the streamed text may have taken
it past one); one that breaks them, or that the next worker refuses, ends the request with the
failure it was to recover from, saying why. A stream is never resumed past its end: a worker that
fails after the last token asked for, or after the token it marked as the last (`finish_reason`:
end of sequence, a stop string, the context window), is closed with the router's own summary.

Sampling across a resume: a sampled request (temperature > 0) always has a seed, the caller's or one
the router draws (reported in the summary), and a stream resumed after n tokens samples the rest
with `resume_seed(seed, n)`. The random generator's state cannot move between processes, so the
resumed text is not the one an uninterrupted run would have made; but it is a fixed function of the
seed and the resume point, so the same request failing at the same token continues identically, and
the continuation never replays the random draws its first tokens were sampled with.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import grpc
from tierserve_client.v1 import generate_pb2

from tierserve.domain.config import LimitsConfig
from tierserve.domain.errors import InvalidRequest
from tierserve.domain.requests import validate_generate_request

# Each worker is tried at most once per request, and never more than this many times in all.
MAX_FAILOVERS = 3
# Statuses that say the worker is down: its process is dead, unreachable or stopping, or the
# connection to it broke. It leaves the rotation until a health check passes.
WORKER_DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
# Statuses of a worker that answered with an error: a crash inside it, which may be its own fault
# or the request's (one request's values can break a model's numerics). Another worker may take the
# request, but a worker that answers stays in rotation: one request must not take workers out.
# What the worker knows to be the request's fault it answers as such (INVALID_ARGUMENT), and the
# client's own faults are never retried.
WORKER_ERROR_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
WORKER_FAULT_CODES = WORKER_DOWN_CODES | WORKER_ERROR_CODES


SEED_BITS = 63  # seeds the workers draw themselves have as many bits
_MASK64 = (1 << 64) - 1


def resume_seed(seed: int, tokens_sent: int) -> int:
    """The seed a sampled stream resumed after `tokens_sent` tokens continues with: the request's
    seed and the resume point mixed by splitmix64, never 0 (which would ask for a random seed)."""
    z = (seed + 0x9E3779B97F4A7C15 * (tokens_sent + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> (64 - SEED_BITS)) or 1


class WorkerStreamFailed(Exception):
    """A worker's stream ended in a worker fault; the router may fail over."""

    def __init__(self, worker_id: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"worker {worker_id} failed: {code.name}: {details}")
        self.worker_id = worker_id
        self.code = code


def is_worker_fault(code: grpc.StatusCode, client_left: bool) -> bool:
    """Whether a worker's status calls for another worker. CANCELLED counts only when our own
    client is still there: then the worker's side cut the stream (e.g. it was stopped)."""
    if code == grpc.StatusCode.CANCELLED:
        return not client_left
    return code in WORKER_FAULT_CODES


def is_worker_down(code: grpc.StatusCode, client_left: bool) -> bool:
    """Whether a worker fault takes the worker out of rotation: it is down, not merely answering
    an error (which a request's own values may cause)."""
    if code == grpc.StatusCode.CANCELLED:
        return not client_left
    return code in WORKER_DOWN_CODES


def resume_refusal(request: generate_pb2.GenerateRequest, limits: LimitsConfig) -> str | None:
    """Why a resumed request may not be sent, or None: a continuation must keep the limits the
    original request was checked against (the text streamed so far may have taken it past one)."""
    try:
        validate_generate_request(request, limits)
    except InvalidRequest as error:
        return str(error)
    return None


@dataclass
class StreamProgress:
    """What the client has received so far, across every worker that served the request."""

    request: generate_pb2.GenerateRequest
    max_new_tokens: int
    tokens_sent: int = 0
    text_sent: str = ""
    # The ids of the tokens sent: a resumed worker continues from them rather than from the text
    # tokenized again, which can merge tokens the model made apart and change what follows.
    token_ids_sent: list[int] = field(default_factory=list)
    # The first token's latency as the first worker measured it (kept across a resume).
    first_token_latency_us: int = 0
    failed_workers: list[str] = field(default_factory=list)
    failure_reasons: list[str] = field(default_factory=list)
    # Tokens and text already streamed when the current worker took over.
    offset: int = 0
    text_at_offset: str = ""
    # When the client received its first token, microseconds after arrival (0: not yet).
    client_ttft_us: float = 0.0
    # The summary is on its way to the client: the stream is complete, whatever happens next.
    summary_sent: bool = False
    # Why generation ended, as the worker marked its last token (unspecified: not ended yet).
    finish_reason: generate_pb2.FinishReason.ValueType = generate_pb2.FINISH_REASON_UNSPECIFIED
    # The status of the last worker that failed this request.
    last_failure_code: grpc.StatusCode | None = None

    def __post_init__(self) -> None:
        # A sampled request gets its seed here rather than on a worker, so a resume can derive the
        # next seed from it and the summary reports the seed that replays the request.
        if self.request.temperature > 0 and not self.request.seed:
            self.request.seed = secrets.randbits(SEED_BITS) or 1

    @property
    def failovers(self) -> int:
        return len(self.failed_workers)

    @property
    def remaining_tokens(self) -> int:
        return self.max_new_tokens - self.tokens_sent

    @property
    def complete(self) -> bool:
        """Every token of the request reached the client (a worker that fails now failed after its
        last token, before its summary): the tokens asked for, or the last one the worker marked
        as ending generation (end of sequence, a stop string, the context window)."""
        return self.tokens_sent > 0 and (
            self.remaining_tokens <= 0 or self.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
        )

    def can_fail_over(self) -> bool:
        # A complete stream is closed, never resumed past its end.
        return self.failovers < MAX_FAILOVERS and not self.complete

    def failed(self, failure: WorkerStreamFailed) -> None:
        self.last_failure_code = failure.code
        self.failed_workers.append(failure.worker_id)
        self.failure_reasons.append(f"{failure.worker_id} {failure.code.name}")
        self.offset = self.tokens_sent
        self.text_at_offset = self.text_sent

    def worker_request(self) -> generate_pb2.GenerateRequest:
        """The request for the next worker: unchanged before any token, else a continuation."""
        if not self.tokens_sent:
            return self.request
        resumed = generate_pb2.GenerateRequest()
        resumed.CopyFrom(self.request)
        resumed.response_prefix = self.request.response_prefix + self.text_sent
        resumed.response_prefix_token_ids.extend(self.token_ids_sent)
        resumed.max_new_tokens = self.remaining_tokens
        if self.request.temperature > 0:
            resumed.seed = resume_seed(self.request.seed, self.tokens_sent)
        # Already committed to this request: the next worker serves it best effort rather than refuse.
        resumed.strict = False
        return resumed

    def relay_token(self, token: generate_pb2.Token, since_arrival_us: float) -> None:
        """Count a token on its way to the client, shifting its index past those already sent."""
        if self.tokens_sent == 0:
            self.first_token_latency_us = token.latency_us
            self.client_ttft_us = since_arrival_us
        token.index += self.offset
        self.tokens_sent += 1
        self.text_sent += token.text
        self.token_ids_sent.append(token.id)
        if token.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = token.finish_reason

    def sent_summary(self) -> None:
        """The summary is on its way to the client: nothing may follow it."""
        self.summary_sent = True
