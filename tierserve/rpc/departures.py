"""Why a caller left a stream before it completed, for metrics and spans: its deadline passed, or it
cancelled. Both end the same way on the server (the call is cancelled), so the deadline tells them apart."""

from __future__ import annotations

import grpc

# A stream cut this close to its deadline was cut by the deadline.
DEADLINE_PASSED_S = 0.005


def departure_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_PASSED_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
