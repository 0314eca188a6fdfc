"""The Router gRPC service: validate, apply the service level, choose a worker, relay its
stream while measuring every token, report the pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc

from tierserve.domain.config import LimitsConfig, ServiceLevelConfig
from tierserve.domain.errors import InvalidRequest, Overloaded, TierserveError, status_for
from tierserve.domain.requests import apply_service_level, prompt_chars, validate_generate_request
from tierserve.router.failover import (
    StreamProgress,
    WorkerStreamFailed,
    is_worker_down,
    is_worker_fault,
    resume_refusal,
)
from tierserve.router.metrics import RouterMetrics, request_protocol
from tierserve.router.policies.registry import RouteRequest, RoutingDecision, RoutingPolicy
from tierserve.router.pool import WorkerHandle, WorkerPool
from tierserve.router.prediction import Ticket
from tierserve.router.registration import current_registrant, registration_from_request
from tierserve.router.summary import closing_summary, complete_summary
from tierserve.rpc.departures import departure_code
from tierserve.rpc.tracing import RequestSpan, start_request_span

log = logging.getLogger(__name__)

DEFAULT_WATCH_INTERVAL_MS = 1000
MIN_WATCH_INTERVAL_MS = 100
# Trailing metadata key of the retry hint sent with RESOURCE_EXHAUSTED, in milliseconds.
RETRY_AFTER_KEY = "retry-after-ms"


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
        service_level: ServiceLevelConfig,
        metrics: RouterMetrics,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self._limits = limits
        self._service_level = service_level
        self.metrics = metrics

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        arrival = time.perf_counter()
        span = start_request_span(
            "tierserve.Router/Generate",
            context.invocation_metadata(),
            {
                "tierserve.request_id": request.request_id,
                "tierserve.pinned_tier": request.tier,
                # grpc or http (the OpenAI-compatible API calls this servicer in-process).
                "tierserve.protocol": request_protocol.get(),
            },
        )
        try:
            params = validate_generate_request(request, self._limits)
            apply_service_level(request, self._service_level)
            prompt_tokens = self._pool.prompt_tokens.estimate_chars(prompt_chars(request))
            route = route_request(request, prompt_tokens, params.max_new_tokens)
            self._pool.check_pinned_tier(request.tier)
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
        progress = StreamProgress(request, params.max_new_tokens)
        # Until the stream completes or a status is set, the client has left.
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED
        try:
            while True:
                try:
                    attempt = self._attempt(decision, route, progress, arrival, context, span)
                    # Closed at once when the client leaves, so the worker's place is freed now.
                    async with contextlib.aclosing(attempt):
                        async for response in attempt:
                            yield response
                    code = None
                    return
                except WorkerStreamFailed as failure:
                    if progress.summary_sent:
                        # The worker failed after its summary, before its status: the client has
                        # the whole stream, and a resume would send tokens after the summary.
                        log.info("request %s: complete, then %s", progress.request.request_id, failure)
                        code = None
                        return
                    progress.failed(failure)
                    if progress.complete:
                        # Failed after its last token: close the stream, never resume past its end.
                        total_us = int((time.perf_counter() - arrival) * 1e6)
                        yield generate_pb2.GenerateResponse(summary=closing_summary(progress, total_us))
                        code = None
                        return
                    decision, route = await self._fail_over(failure, progress, route, context)
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            if code == grpc.StatusCode.CANCELLED and progress.summary_sent:
                # The client has the whole stream; it may close before the status arrives.
                code = None
            elif code == grpc.StatusCode.CANCELLED:
                code = departure_code(context)
            span.end(code)

    async def _attempt(
        self,
        decision: RoutingDecision,
        route: RouteRequest,
        progress: StreamProgress,
        arrival: float,
        context: grpc.aio.ServicerContext,
        span: RequestSpan,
    ) -> AsyncGenerator[generate_pb2.GenerateResponse, None]:
        """Relay one worker's stream to the client, counting what the client received."""
        worker = self._pool.by_id(decision.worker_id)
        self.metrics.decided(self._policy.name, progress.request.tier, decision.best_effort, worker.tier)
        span.set(
            {
                "tierserve.request_id": progress.request.request_id,
                "tierserve.worker_id": worker.worker_id,
                "tierserve.tier": worker.tier,
                "tierserve.policy": self._policy.name,
                "tierserve.best_effort": decision.best_effort,
                "tierserve.failovers": progress.failovers,
            }
        )
        # Reserved before the first await: the next request's admission already counts this one.
        ticket = worker.begin(
            route.prompt_tokens,
            route.new_tokens,
            route.max_first_token_latency_ms,
            route.max_token_latency_ms,
        )
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED
        try:
            relay = self._relay(
                worker, ticket, progress, decision, arrival, context, span.outgoing_metadata()
            )
            async with contextlib.aclosing(relay):
                async for response in relay:
                    since_arrival_us = (time.perf_counter() - arrival) * 1e6
                    if response.HasField("token"):
                        progress.relay_token(response.token, since_arrival_us)
                    else:
                        summary = response.summary
                        complete_summary(
                            summary, progress, int(since_arrival_us), self._policy.name, decision
                        )
                        self.metrics.completed(
                            worker.tier, worker.worker_id, progress.request, summary.budget_met
                        )
                        progress.sent_summary()
                    yield response
            code = None
        except WorkerStreamFailed as failure:
            code = failure.code
            if not progress.summary_sent:
                # Counted while this request still holds the worker: a worker that leaves the pool
                # takes its metric series along once it has no requests, and none may come back.
                self.metrics.failed_over(
                    worker.tier, worker.worker_id, failure.code, progress.tokens_sent > 0
                )
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            worker.end(ticket)
            if code == grpc.StatusCode.CANCELLED and progress.summary_sent:
                # Complete: the SDKs stop reading at the summary and may close before the status.
                code = None
            elif code == grpc.StatusCode.CANCELLED and context.cancelled():
                code = departure_code(context)
            self.metrics.finished(worker.tier, worker.worker_id, code)

    async def _fail_over(
        self,
        failure: WorkerStreamFailed,
        progress: StreamProgress,
        route: RouteRequest,
        context: grpc.aio.ServicerContext,
    ) -> tuple[RoutingDecision, RouteRequest]:
        """Choose another worker for a request whose worker failed, or end it with the failure."""
        log.warning(
            "request %s: %s; %d tokens streamed, failing over",
            progress.request.request_id,
            failure,
            progress.tokens_sent,
        )
        if not progress.can_fail_over():
            await context.abort(failure.code, str(failure))
        resumed = progress.worker_request()
        refusal = resume_refusal(resumed, self._limits)
        if refusal is not None:
            await context.abort(
                failure.code, f"{failure}; the stream cannot be resumed within the limits: {refusal}"
            )
        route = route_request(
            resumed, self._pool.prompt_tokens.estimate_chars(prompt_chars(resumed)), progress.remaining_tokens
        )
        others = [w for w in self._pool.workers if w.worker_id not in progress.failed_workers]
        try:
            return self._policy.choose(route, others), route
        except TierserveError as error:
            # The failure is what the client needs to know; why no other worker could take over follows.
            await context.abort(failure.code, f"{failure}; no other worker could take over: {error}")
        raise AssertionError("unreachable: abort raises")

    async def _relay(
        self,
        worker: WorkerHandle,
        ticket: Ticket,
        progress: StreamProgress,
        decision: RoutingDecision,
        arrival: float,
        context: grpc.aio.ServicerContext,
        trace_metadata: tuple[tuple[str, str], ...] = (),
    ) -> AsyncGenerator[generate_pb2.GenerateResponse, None]:
        request = progress.worker_request()
        started = time.perf_counter()
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
                        # A resumed stream's first token is not the client's first token.
                        seen_ttft_s = None if progress.offset else first_token_at - arrival
                    self.metrics.token(worker.tier, worker.worker_id, response.token, seen_ttft_s)
                else:
                    # This worker's TTFT as the router saw it, to learn how far the prediction was off.
                    seen_ttft_us = (
                        (first_token_at - started) * 1e6
                        if first_token_at is not None
                        else response.summary.queue_time_us + response.summary.ttft_us
                    )
                    worker.learn(response.summary, decision.prediction, seen_ttft_us)
                    self._pool.prompt_tokens.learn(prompt_chars(request), response.summary.prompt_tokens)
                yield response
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
            client_left = context.cancelled()
            if is_worker_fault(code, client_left):
                worker.mark_failed(f"{code.name}: {details}", down=is_worker_down(code, client_left))
                raise WorkerStreamFailed(worker.worker_id, code, details) from None
            if progress.offset and code == grpc.StatusCode.INVALID_ARGUMENT and progress.last_failure_code:
                # The client's request was accepted; the continuation the router made of it was not.
                failures = "; ".join(progress.failure_reasons)
                await context.abort(
                    progress.last_failure_code,
                    f"failed over ({failures}); resuming on {worker.worker_id} was refused: {details}",
                )
            await context.abort(code, details)
        finally:
            # Reached also when our client leaves: cancel upstream so the worker stops generating.
            call.cancel()

    async def ListWorkers(
        self, request: router_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListWorkersResponse:
        return router_pb2.ListWorkersResponse(workers=self._pool.snapshot(), policy=self._policy.name)

    async def Register(
        self, request: router_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RegisterResponse:
        try:
            # The interceptor authenticated the caller (router/registration.py).
            added = self._pool.register(*registration_from_request(request), current_registrant())
        except TierserveError as error:
            await context.abort(*status_for(error))
        return router_pb2.RegisterResponse(added=added, ttl_s=self._pool.registrations.ttl_s)

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
