"""The Router gRPC service: validate, choose a worker, relay its stream, report the pool."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from router.policy import RouteRequest, RoutingPolicy
from router.pool import WorkerHandle, WorkerPool
from tierserve.config import LimitsConfig
from tierserve.errors import InvalidRequest, TierserveError, status_for
from tierserve.requests import validate_generate_request
from tierserve.v1 import generate_pb2, router_pb2, router_pb2_grpc

DEFAULT_WATCH_INTERVAL_MS = 1000
MIN_WATCH_INTERVAL_MS = 100
# Worker statuses caused by the request itself: relayed with the worker's message unchanged.
CLIENT_FAULT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, pool: WorkerPool, policy: RoutingPolicy, limits: LimitsConfig) -> None:
        self._pool = pool
        self._policy = policy
        self._limits = limits

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            validate_generate_request(request, self._limits)
            route = RouteRequest(
                tier=request.tier,
                max_quality_loss_pct=(
                    request.max_quality_loss_pct if request.HasField("max_quality_loss_pct") else None
                ),
            )
            decision = self._policy.choose(route, self._pool.workers)
        except TierserveError as error:
            await context.abort(*status_for(error))
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        worker = self._pool.by_id(decision.worker_id)
        async for response in self._relay(worker, request, decision.reason, context):
            yield response

    async def _relay(
        self,
        worker: WorkerHandle,
        request: generate_pb2.GenerateRequest,
        reason: str,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        call = worker.stub.Generate(request, timeout=context.time_remaining())
        with worker.request():
            try:
                async for response in call:
                    if response.HasField("token"):
                        self._record(worker, response.token)
                    else:
                        response.summary.routing_reason = reason
                    yield response
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details() or ""
                if code not in CLIENT_FAULT_CODES:
                    worker.record_failure(f"{code.name}: {details}")
                    details = f"worker {worker.worker_id} failed: {details}"
                await context.abort(code, details)
            finally:
                # Reached also when our client leaves: cancel upstream so the worker stops generating.
                call.cancel()

    @staticmethod
    def _record(worker: WorkerHandle, token: generate_pb2.Token) -> None:
        if token.index == 0:
            worker.relayed.record_first_token(token.latency_us)
        else:
            worker.relayed.record_token(token.latency_us)

    async def ListWorkers(
        self, request: router_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListWorkersResponse:
        return router_pb2.ListWorkersResponse(workers=self._pool.snapshot())

    async def WatchStats(
        self, request: router_pb2.WatchStatsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.PoolStats]:
        interval_ms = request.interval_ms or DEFAULT_WATCH_INTERVAL_MS
        if interval_ms < MIN_WATCH_INTERVAL_MS:
            error = InvalidRequest(
                "interval_ms", f"must be at least {MIN_WATCH_INTERVAL_MS}, got {interval_ms}"
            )
            await context.abort(*status_for(error))
        while True:
            yield router_pb2.PoolStats(timestamp_us=int(time.time() * 1e6), workers=self._pool.snapshot())
            await asyncio.sleep(interval_ms / 1e3)
