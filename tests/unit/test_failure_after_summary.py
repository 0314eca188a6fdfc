"""A worker that dies after sending its summary, before the stream's status: the client already has
the whole stream, so the router ends it there, with no failover (a resume would send tokens after
the summary: a seam the default-model failover test once caught)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from tierserve_client.v1 import generate_pb2

from tests.unit.fake_pool import FakeWorker, running_pool


@dataclass
class DiesAfterSummary(FakeWorker):
    """Stops early (as at an end-of-sequence token), sends its summary, then fails."""

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        short = generate_pb2.GenerateRequest()
        short.CopyFrom(request)
        short.max_new_tokens = 2
        async for response in super().Generate(short, context):
            yield response
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} died after its summary")


def test_a_worker_failing_after_its_summary_ends_the_stream_without_a_failover() -> None:
    async def scenario() -> None:
        # fp32 is the one the slo policy prefers; bf16 is there to (wrongly) fail over to.
        other = FakeWorker("bf16-0", "bf16", cores=[1])
        async with running_pool([DiesAfterSummary("fp32-0", "fp32"), other]) as pool:
            request = generate_pb2.GenerateRequest(prompt="hello there", max_new_tokens=6)
            responses = [r async for r in pool.stub.Generate(request, timeout=10)]
        kinds = [r.WhichOneof("kind") for r in responses]
        assert kinds == ["token", "token", "summary"]
        assert [r.token.index for r in responses[:-1]] == [0, 1]
        summary = responses[-1].summary
        assert summary.worker_id == "fp32-0" and summary.failovers == 0 and summary.generated_tokens == 2
        assert other.requests == []

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
