"""The Worker gRPC service: validate, queue for the model, stream tokens, end with a summary."""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from tierserve_client.v1 import generate_pb2, worker_pb2, worker_pb2_grpc

from tierserve.domain.config import LimitsConfig
from tierserve.domain.deadlines import first_token_deadline
from tierserve.domain.errors import TierserveError, status_for
from tierserve.domain.latency import percentile
from tierserve.domain.requests import validate_generate_request, within_budget
from tierserve.rpc.departures import departure_code
from tierserve.rpc.tracing import start_request_span
from tierserve.worker.batching.delivery import LoopPublisher
from tierserve.worker.engine import FinishReason, GenerationOutcome, TokenEvent
from tierserve.worker.metrics import WorkerMetrics
from tierserve.worker.state import WorkerState

log = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generate_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
    FinishReason.CONTEXT: generate_pb2.FINISH_REASON_CONTEXT,
    FinishReason.CANCELLED: generate_pb2.FINISH_REASON_UNSPECIFIED,
}


def budget_met(request: generate_pb2.GenerateRequest, outcome: GenerationOutcome, queue_s: float) -> bool:
    """The TTFT budget covers what the caller waits for the first token: queueing included."""
    return within_budget(request, queue_s * 1e6 + outcome.ttft_us, outcome.tpot_mean_us())


def build_summary(
    request: generate_pb2.GenerateRequest,
    state: WorkerState,
    outcome: GenerationOutcome,
    queue_s: float,
    total_s: float,
) -> generate_pb2.Summary:
    tpot = outcome.tpot_us
    return generate_pb2.Summary(
        request_id=request.request_id,
        worker_id=state.config.name,
        tier=state.config.tier,
        prompt_tokens=outcome.prompt_tokens,
        generated_tokens=outcome.generated_tokens,
        queue_time_us=int(queue_s * 1e6),
        ttft_us=outcome.ttft_us,
        tpot_mean_us=int(statistics.fmean(tpot)) if tpot else 0,
        tpot_p50_us=int(percentile(tpot, 0.5)),
        tpot_p95_us=int(percentile(tpot, 0.95)),
        budget_met=budget_met(request, outcome, queue_s),
        finish_reason=FINISH_REASONS[outcome.finish_reason],
        routing_reason="sent directly to the worker",
        seed=outcome.seed,
        total_time_us=int(total_s * 1e6),
        text=outcome.text,
    )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        state: WorkerState,
        limits: LimitsConfig,
        executor: ThreadPoolExecutor,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._state = state
        self._limits = limits
        self._executor = executor
        self.metrics = metrics if metrics is not None else WorkerMetrics(state)
        self._publishers: dict[asyncio.AbstractEventLoop, LoopPublisher] = {}

    def _publisher(self, loop: asyncio.AbstractEventLoop) -> LoopPublisher:
        """One publisher per loop, so a batch step hands all of its streams' tokens over at once."""
        return self._publishers.setdefault(loop, LoopPublisher(loop))

    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        return self._state.describe()

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        span = start_request_span(
            "tierserve.Worker/Generate",
            context.invocation_metadata(),
            {
                "tierserve.request_id": request.request_id,
                "tierserve.worker_id": self._state.config.name,
                "tierserve.tier": self._state.config.tier,
            },
        )
        # Until the stream completes or a status is set, the client has left.
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED
        summary_sent = False
        try:
            async for response in self._generate(request, context):
                if response.HasField("summary"):
                    summary_sent = True
                    span.set(
                        {
                            "tierserve.generated_tokens": response.summary.generated_tokens,
                            "tierserve.ttft_us": response.summary.ttft_us,
                            "tierserve.queue_time_us": response.summary.queue_time_us,
                        }
                    )
                yield response
            code = None
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            if code == grpc.StatusCode.CANCELLED and summary_sent:
                # Complete: the caller may close once it has the summary, before the status.
                code = None
            elif code == grpc.StatusCode.CANCELLED:
                code = departure_code(context)
            self.metrics.finished(code)
            span.end(code)

    async def _generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        arrival = time.perf_counter()
        try:
            params = validate_generate_request(request, self._limits)
            engine = self._state.require_engine()
            prompt = engine.prepare(params)
        except TierserveError as error:
            await context.abort(*status_for(error))
        if not request.request_id:
            request.request_id = uuid.uuid4().hex

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        cancel = threading.Event()

        def take(event: TokenEvent) -> None:  # on the loop
            # Counted here, not when streamed: tokens made after the client left count too, which
            # is how a cancellation's cost (at most one decode step) shows in the metrics.
            self.metrics.token(event.index, event.latency_us)
            events.put_nowait(event)

        def emit(event: TokenEvent) -> None:  # called from the generation thread
            loop.call_soon_threadsafe(take, event)

        deadline = first_token_deadline(arrival, request.max_first_token_latency_ms)
        result: list[GenerationOutcome] = []
        batch = self._state.batch
        if batch is not None:
            # Continuous batching: the request joins the running batch once a slot, the KV
            # budget and the batch's per-token budgets allow, earliest first-token deadline first.
            try:
                token_budget_s = request.max_token_latency_ms / 1e3
                ticket = batch.submit(
                    prompt, params, take, cancel.is_set, deadline, token_budget_s, self._publisher(loop)
                )
            except TierserveError as error:
                await context.abort(*status_for(error))
            generation = asyncio.wrap_future(ticket.future)
            self._state.in_flight += 1
            try:
                async for response in self._stream(request, context, generation, events, cancel, result):
                    yield response
            finally:
                self._state.in_flight -= 1
            queue_s = ticket.queue_s
        else:
            async with self._state.model_slot(deadline) as queue_s:
                if context.cancelled():
                    return
                generation = loop.run_in_executor(
                    self._executor, engine.generate, prompt, params, emit, cancel.is_set
                )
                async for response in self._stream(request, context, generation, events, cancel, result):
                    yield response
        outcome = result[0]
        summary = build_summary(request, self._state, outcome, queue_s, time.perf_counter() - arrival)
        self.metrics.completed(request, summary)
        yield generate_pb2.GenerateResponse(summary=summary)

    async def _stream(
        self,
        request: generate_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
        generation: asyncio.Future[GenerationOutcome],
        events: asyncio.Queue[TokenEvent | None],
        cancel: threading.Event,
        result: list[GenerationOutcome],
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """Stream the tokens of `generation` as they come, then put its outcome in `result`."""
        generation.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                self._record_live(event)
                yield generate_pb2.GenerateResponse(
                    token=generate_pb2.Token(
                        text=event.text,
                        id=event.token_id,
                        index=event.index,
                        latency_us=event.latency_us,
                        finish_reason=FINISH_REASONS[event.finish_reason]
                        if event.finish_reason
                        else generate_pb2.FINISH_REASON_UNSPECIFIED,
                    )
                )
            result.append(await generation)
        except Exception as error:
            log.exception("generation failed for request %s", request.request_id)
            await context.abort(*status_for(error))
        finally:
            # The client left or the stream failed: stop the model within one step, and keep the
            # request until it has (one at a time: the next request never shares the cores with it).
            cancel.set()
            await asyncio.wait([generation])

    def _record_live(self, event: TokenEvent) -> None:
        if event.index == 0:
            self._state.live.record_first_token(event.latency_us)
        else:
            self._state.live.record_token(event.latency_us)
