"""The HTTP API's one table from gRPC status to HTTP status, and errors shaped as OpenAI's:
`{"error": {"message", "type", "param", "code"}}`.

The router's handlers end a refused request with a gRPC status (router/http/inprocess.py records
it); the same status a gRPC caller would get becomes the HTTP status here, its message unchanged,
its retry hint a `Retry-After` header (and `retry-after-ms`, which the `openai` SDKs read first).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from tierserve_client.options import retry_hint_ms

# HTTP status and OpenAI error type per gRPC status; anything else is a 500 server_error.
STATUS_TABLE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    # The request cannot be served as the pool is configured (an accuracy tolerance no tier meets,
    # chat messages on a model without a chat template): the caller must change it.
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    # The client went away; it will not read this (nginx's "client closed request").
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.ABORTED: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
SERVER_ERROR = (500, "server_error")
# The retry hint of a 429 that carried none: a second.
DEFAULT_RETRY_MS = 1000
# "field: problem", as every InvalidRequest message reads (tierserve/domain/errors.py).
FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]-]*): ")


@dataclass(frozen=True)
class ApiError:
    """One error reply: its HTTP status, OpenAI's error object, and headers (the retry hint)."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def retry_headers(retry_after_ms: int) -> dict[str, str]:
    """`Retry-After` in whole seconds (at least 1, as HTTP counts them) and the exact milliseconds."""
    return {
        "Retry-After": str(max(1, math.ceil(retry_after_ms / 1000))),
        "retry-after-ms": str(retry_after_ms),
    }


def invalid(field_name: str, problem: str, status: int = 400, code: str = "invalid_argument") -> ApiError:
    return ApiError(status, f"{field_name}: {problem}", "invalid_request_error", field_name, code)


def from_status(
    code: grpc.StatusCode | None,
    details: str,
    trailing_metadata: Iterable[tuple[str, object]] = (),
    rename: Mapping[str, str] | None = None,
) -> ApiError:
    """The reply for a call that ended with `code`. An invalid field is named in `param` (with its
    OpenAI name, from `rename`); a retry hint becomes `Retry-After`."""
    code = code or grpc.StatusCode.UNKNOWN
    status, kind = STATUS_TABLE.get(code, SERVER_ERROR)
    param = None
    if code == grpc.StatusCode.INVALID_ARGUMENT and (match := FIELD_PREFIX.match(details)):
        proto_name = match.group(1)
        param = (rename or {}).get(proto_name, proto_name)
        details = f"{param}: {details[match.end() :]}"
    hint = retry_hint_ms(trailing_metadata)
    if hint is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint = DEFAULT_RETRY_MS
    headers = retry_headers(hint) if hint is not None else {}
    return ApiError(status, details or code.name.lower(), kind, param, code.name.lower(), headers)


def internal(what: str) -> ApiError:
    return ApiError(500, f"internal error ({what}); see the router's log", "server_error", None, "internal")
