"""The health service quotes an unknown service name short, so a long one is still NOT_FOUND."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tierserve.rpc.health import HealthServicer


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


@pytest.mark.parametrize("name", ["nope", "x" * 20_000])
def test_an_unknown_service_is_not_found_with_its_name_quoted_short(name: str) -> None:
    context = _Context()
    with pytest.raises(_Aborted):
        asyncio.run(HealthServicer().Check(health_pb2.HealthCheckRequest(service=name), context))
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert len(context.details) < 200 and name[:10] in context.details
