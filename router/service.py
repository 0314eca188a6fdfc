"""The Router gRPC service: validate, apply the service level, choose a worker, relay its
stream while measuring every token, report the pool."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from router.metrics import RouterMetrics
from router.policy import RouteRequest, RoutingDecision, RoutingPolicy
from router.pool import WorkerHandle, WorkerPool
from router.prediction import Ticket
from tierserve.config import LimitsConfig, ServiceLevelConfig
from tierserve.errors import InvalidRequest, Overloaded, TierserveError, status_for
from tierserve.requests import apply_service_level, validate_generate_request, within_budget
from tierserve.tracing import start_request_span
from tierserve.v1 import generate_pb2, router_pb2, router_pb2_grpc

DEFAULT_WATCH_INTERVAL_MS = 1000
MIN_WATCH_INTERVAL_MS = 100
# Trailing metadata key of the retry hint sent with RESOURCE_EXHAUSTED, in milliseconds.
RETRY_AFTER_KEY = "retry-after-ms"
# Worker statuses caused by the request itself: relayed with the worker's message unchanged.
CLIENT_FAULT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def route_request(request: generate_pb2.GenerateRequest, prompt_tokens: int, new_tokens: int) -> RouteRequest:
    """The policy's view of a request whose service level has been applied."""
    return RouteRequest(
        tier=request.tier,
        max_quality_loss_pct=(
            request.max_quality_loss_pct if request.HasField("max_quality_loss_pct") else None
        ),
        max_first_token_latency_ms=request.max_first_token_latency_ms,
        max_token_latency_ms=request.max_token_latency_ms,
        strict=request.strict,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
    )


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        pool: WorkerPool,
        policy: RoutingPolicy,
        limits: LimitsConfig,
        service_level: ServiceLevelConfig | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._limits = limits
        self._service_level = service_level or ServiceLevelConfig()
        self.metrics = metrics if metrics is not None else RouterMetrics()
        self.metrics.watch_pool(lambda: self._pool.workers)

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        arrival = time.perf_counter()
        span = start_request_span(
            "tierserve.Router/Generate",
            context.invocation_metadata(),
            {"tierserve.request_id": request.request_id, "tierserve.pinned_tier": request.tier},
        )
        try:
            params = validate_generate_request(request, self._limits)
            apply_service_level(request, self._service_level)
            prompt_tokens = self._pool.prompt_tokens.estimate(request.prompt)
            route = route_request(request, prompt_tokens, params.max_new_tokens)
            decision = self._policy.choose(route, self._pool.workers)
        except Overloaded as error:
            self.metrics.refused(self._policy.name, status_for(error)[0], routed=True)
            span.end(*status_for(error))
            await context.abort(
                *status_for(error), trailing_metadata=((RETRY_AFTER_KEY, str(error.retry_after_ms)),)
            )
        except TierserveError as error:
            self.metrics.refused(
                self._policy.name, status_for(error)[0], routed=not isinstance(error, InvalidRequest)
            )
            span.end(*status_for(error))
            await context.abort(*status_for(error))
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        worker = self._pool.by_id(decision.worker_id)
        self.metrics.decided(self._policy.name, request.tier, decision.best_effort, worker.tier)
        span.set(
            {
                "tierserve.request_id": request.request_id,
                "tierserve.worker_id": worker.worker_id,
                "tierserve.tier": worker.tier,
                "tierserve.policy": self._policy.name,
                "tierserve.best_effort": decision.best_effort,
            }
        )
        # Reserved before the first await: the next request's admission already counts this one.
        ticket = worker.begin(route.prompt_tokens, route.new_tokens)
        # Until the stream completes or a status is set, the client has left.
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED
        try:
            relay = self._relay(worker, ticket, request, decision, arrival, context, span.outgoing_metadata())
            async for response in relay:
                yield response
            code = None
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            worker.end(ticket)
            self.metrics.finished(worker.tier, worker.worker_id, code)
            span.end(code)

    async def _relay(
        self,
        worker: WorkerHandle,
        ticket: Ticket,
        request: generate_pb2.GenerateRequest,
        decision: RoutingDecision,
        arrival: float,
        context: grpc.aio.ServicerContext,
        trace_metadata: tuple[tuple[str, str], ...] = (),
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        # The trace context makes the worker's span a child of this request's span.
        call = worker.stub.Generate(
            request, timeout=context.time_remaining(), metadata=trace_metadata or None
        )
        first_token_at: float | None = None
        try:
            async for response in call:
                if response.HasField("token"):
                    worker.record_token(ticket, response.token)
                    seen_ttft_s = None
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        seen_ttft_s = first_token_at - arrival
                    self.metrics.token(worker.tier, worker.worker_id, response.token, seen_ttft_s)
                else:
                    seen_ttft_us = (
                        (first_token_at - arrival) * 1e6
                        if first_token_at is not None
                        else response.summary.queue_time_us + response.summary.ttft_us
                    )
                    self._complete(worker, request, decision, response.summary, seen_ttft_us)
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

    def _complete(
        self,
        worker: WorkerHandle,
        request: generate_pb2.GenerateRequest,
        decision: RoutingDecision,
        summary: generate_pb2.Summary,
        seen_ttft_us: float,
    ) -> None:
        """Add the routing decision to the summary, judge the budget as the client saw it, and learn
        prefill cost and characters per token from the worker's counts."""
        summary.routing_reason = decision.reason
        summary.policy = self._policy.name
        summary.best_effort = decision.best_effort
        prediction = decision.prediction
        if prediction is not None and prediction.known:
            summary.predicted_queue_us = int(prediction.wait_us)
            summary.predicted_ttft_us = int(prediction.ttft_us)
            summary.predicted_tpot_us = int(prediction.tpot_us)
        # Best effort means the router already knew it could not promise the budget: reported as
        # not met (the contract), whatever the stream then happened to achieve.
        summary.budget_met = not decision.best_effort and within_budget(
            request, seen_ttft_us, summary.tpot_mean_us
        )
        self.metrics.completed(worker.tier, worker.worker_id, request, summary.budget_met)
        if prediction is not None and summary.generated_tokens:
            worker.errors.record(prediction, seen_ttft_us, summary.tpot_mean_us)
        worker.live.record_prefill(summary.prompt_tokens, summary.ttft_us)
        self._pool.prompt_tokens.learn(len(request.prompt), summary.prompt_tokens)

    async def ListWorkers(
        self, request: router_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListWorkersResponse:
        return router_pb2.ListWorkersResponse(workers=self._pool.snapshot(), policy=self._policy.name)

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
            yield router_pb2.PoolStats(
                timestamp_us=int(time.time() * 1e6), workers=self._pool.snapshot(), policy=self._policy.name
            )
            await asyncio.sleep(interval_ms / 1e3)
