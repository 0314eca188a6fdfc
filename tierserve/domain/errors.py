"""Domain errors and the one table that maps them to gRPC status codes.

Servicers raise these; `status_for` turns any exception into a (code, message)
a client can act on. Anything unexpected becomes INTERNAL with a short message,
never a stack trace.
"""

from __future__ import annotations

import grpc


class StartupError(RuntimeError):
    """A process cannot start as configured (e.g. its cores are unusable); the message says what to change."""


class TierserveError(Exception):
    """Base of every error a client may see as a status."""


class InvalidRequest(TierserveError):
    """The request itself is wrong; `field` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NoWorkerAvailable(TierserveError):
    """No healthy worker can take the request now; retrying later may help."""


class Overloaded(TierserveError):
    """Too much work queued; retry after `retry_after_ms`."""

    def __init__(self, message: str, retry_after_ms: int = 1000) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unsatisfiable(TierserveError):
    """The pool cannot ever meet the request's constraints (e.g. accuracy tolerance)."""


class Unsupported(TierserveError):
    """The server cannot serve this kind of request as configured (e.g. chat messages on a model
    without a chat template); the same request will keep failing until its configuration changes."""


class PermissionDenied(TierserveError):
    """The caller is known but may not do this (e.g. register a worker id its credential is not
    bound to, or one another credential holds)."""


class WorkerFailed(TierserveError):
    """A worker answered with an error status; relayed with the worker's own code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_STATUS_TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoWorkerAvailable, grpc.StatusCode.UNAVAILABLE),
    (Unsatisfiable, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unsupported, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, WorkerFailed):
        return error.code, str(error)
    for error_type, code in _STATUS_TABLE:
        if isinstance(error, error_type):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
