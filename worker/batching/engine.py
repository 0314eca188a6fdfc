"""Continuous batching on IPEX's traced decoder graph: requests join at a step boundary and
leave the step they finish.

One thread runs the loop. Each step it drops the rows that finished or were cancelled,
admits at most one waiting request (earliest first-token deadline first) if a batch slot and
the KV-cache budget allow, prefills it alone and copies its cache into the batch
(`iakv_cache.BatchKvCache`), then runs one decode forward for every running row and samples each
row's next token with that row's own settings. Decode reads the weights once per step for the
whole batch, which is why a batch costs little more per step than one stream.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from tierserve.domain.errors import InvalidRequest, Overloaded
from tierserve.domain.requests import GenerationParams
from tierserve.worker.batching.sampler import next_token, seeded_generator
from tierserve.worker.engine import Engine, seed_for
from tierserve.worker.generation import GenerationOutcome, PreparedPrompt, TokenEvent, TokenSink
from tierserve.worker.kernels.iakv_cache import BatchKvCache, empty_past, layer_caches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 16
    # Positions of the KV cache the batch may hold, all rows together, padding included.
    kv_cache_tokens: int = 32768


@dataclass(eq=False)
class _Sequence:
    """One request in the engine: waiting, then a row of the batch."""

    prompt: PreparedPrompt
    params: GenerationParams
    sink: TokenSink
    seed: int
    cancelled: Callable[[], bool]
    deadline: float
    submitted_at: float = field(default_factory=time.perf_counter)
    future: Future[GenerationOutcome] = field(default_factory=Future)
    admitted_at: float = 0.0
    generator: torch.Generator | None = None
    next_token: int = 0
    position: int = 0

    @property
    def span(self) -> int:
        """The most cache positions this sequence can take: prompt plus every token it may make."""
        return self.prompt.prompt_tokens + self.prompt.max_new_tokens

    @property
    def queue_s(self) -> float:
        return self.admitted_at - self.submitted_at


@dataclass(frozen=True)
class Ticket:
    """A submitted request: its outcome, and how long it waited for a place in the batch."""

    sequence: _Sequence

    @property
    def future(self) -> Future[GenerationOutcome]:
        return self.sequence.future

    @property
    def queue_s(self) -> float:
        return self.sequence.queue_s


@dataclass(frozen=True)
class BatchOccupancy:
    running: int
    waiting: int
    max_batch: int
    kv_tokens_used: int
    kv_tokens_budget: int
    kv_bytes: int


class BatchEngine:
    """Serves every request of one worker through one batch; thread-safe `submit`."""

    def __init__(self, engine: Engine, limits: BatchLimits) -> None:
        self.engine = engine
        self.limits = limits
        model = engine.loaded.model
        self._graph: Any = model.trace_graph
        self._num_layers = int(model.config.num_hidden_layers)
        self._run_context = engine.loaded.run_context
        self._waiting: list[tuple[float, int, _Sequence]] = []
        self._order = itertools.count()
        self._running: list[_Sequence] = []
        self._cache: BatchKvCache | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    # --- the service side --------------------------------------------------------------------

    def submit(
        self,
        prompt: PreparedPrompt,
        params: GenerationParams,
        emit: Callable[[TokenEvent], None],
        cancelled: Callable[[], bool],
        deadline: float,
    ) -> Ticket:
        """Queue a request; its ticket's future ends with the outcome (or the error)."""
        seed = seed_for(params.sampling)
        sequence = _Sequence(
            prompt=prompt,
            params=params,
            sink=self.engine.token_sink(params, prompt, emit),
            seed=seed,
            cancelled=cancelled,
            deadline=deadline,
            generator=seeded_generator(seed) if seed else None,
        )
        if sequence.span > self.limits.kv_cache_tokens:
            raise InvalidRequest(
                "max_new_tokens",
                f"prompt ({prompt.prompt_tokens} tokens) plus max_new_tokens ({prompt.max_new_tokens}) "
                f"exceed this worker's KV cache of {self.limits.kv_cache_tokens} tokens",
            )
        with self._wake:
            if self._stopping:
                raise Overloaded("the worker is stopping", retry_after_ms=1000)
            heapq.heappush(self._waiting, (deadline, next(self._order), sequence))
            self._wake.notify()
        return Ticket(sequence)

    def occupancy(self) -> BatchOccupancy:
        with self._wake:
            cache = self._cache
            return BatchOccupancy(
                running=len(self._running),
                waiting=len(self._waiting),
                max_batch=self.limits.max_batch,
                kv_tokens_used=cache.batch * cache.length if cache is not None else 0,
                kv_tokens_budget=self.limits.kv_cache_tokens,
                kv_bytes=cache.bytes() if cache is not None else 0,
            )

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # --- the model thread --------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping and not self._running and not self._waiting:
                    return
                admitted = self._next_admission()
            try:
                with torch.inference_mode(), self._run_context():
                    if admitted is not None:
                        self._prefill(admitted)
                    if self._running:
                        self._decode_step()
            except Exception as error:  # a failed forward fails every row it carried
                log.exception("batched forward failed")
                self._fail_all(error)

    def _next_admission(self) -> _Sequence | None:
        """The waiting request due first, if a slot and the KV budget allow it (called locked).
        Cancelled waiters leave here; the first one that does not fit blocks the rest, so a big
        request is not starved by small ones behind it."""
        left = [entry for entry in self._waiting if entry[2].cancelled()]
        if left:
            self._waiting = [entry for entry in self._waiting if not entry[2].cancelled()]
            heapq.heapify(self._waiting)
            for _, _, sequence in left:
                sequence.admitted_at = time.perf_counter()
                sequence.future.set_result(
                    sequence.sink.outcome(sequence.prompt, sequence.seed, cancelled=True)
                )
        while self._waiting:
            _, _, head = self._waiting[0]
            if len(self._running) >= self.limits.max_batch:
                return None
            rows = len(self._running) + 1
            widest = max([head.span, *(s.span for s in self._running)])
            if rows * widest > self.limits.kv_cache_tokens:
                return None
            heapq.heappop(self._waiting)
            return head
        return None

    def _prefill(self, sequence: _Sequence) -> None:
        sequence.admitted_at = time.perf_counter()
        sequence.sink.start()
        ids = sequence.prompt.input_ids
        length = int(ids.shape[1])
        try:
            logits, past = self._forward(
                ids, torch.ones_like(ids), empty_past(self._num_layers, 1), torch.arange(length).unsqueeze(0)
            )
            token = next_token(logits[0, -1], sequence.params.sampling, sequence.generator)
        except Exception as error:
            sequence.future.set_exception(error)
            return
        sequence.position = length
        sequence.next_token = token
        sequence.sink.push(token)
        if sequence.sink.finished or sequence.cancelled():
            self._finish(sequence)
            return
        row = BatchKvCache.of_sequence(layer_caches(past), length)
        with self._wake:
            if self._cache is None:
                self._cache = row
            else:
                self._cache.join(row)
            self._running.append(sequence)

    def _decode_step(self) -> None:
        cache = self._cache
        assert cache is not None
        ids = torch.tensor([[s.next_token] for s in self._running], dtype=torch.long)
        positions = torch.tensor([[s.position] for s in self._running], dtype=torch.long)
        logits, past = self._forward(ids, cache.attention_mask(), cache.past_key_values(), positions)
        cache.advance(past, 1)
        finished: list[_Sequence] = []
        for row, sequence in enumerate(self._running):
            sequence.position += 1
            try:
                sequence.next_token = next_token(
                    logits[row, -1], sequence.params.sampling, sequence.generator
                )
            except InvalidRequest as error:
                sequence.future.set_exception(error)
                finished.append(sequence)
                continue
            sequence.sink.push(sequence.next_token)
            if sequence.sink.finished or sequence.cancelled():
                finished.append(sequence)
        # Cancellation is seen within one step even for rows that made a token this step.
        finished += [s for s in self._running if s not in finished and s.cancelled()]
        if finished:
            # Out of the batch before their outcomes go out: a caller that has its summary never
            # sees its request still running.
            self._keep([s for s in self._running if s not in finished])
            for sequence in finished:
                if not sequence.future.done():
                    self._finish(sequence)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, past: Any, positions: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        out = self._graph(input_ids=ids, attention_mask=mask, past_key_values=past, position_ids=positions)
        return out[0], out[1]

    def _finish(self, sequence: _Sequence) -> None:
        sequence.future.set_result(
            sequence.sink.outcome(sequence.prompt, sequence.seed, sequence.cancelled())
        )

    def _keep(self, remaining: list[_Sequence]) -> None:
        with self._wake:
            if not remaining:
                self._cache = None
            elif self._cache is not None:
                self._cache.keep([self._running.index(s) for s in remaining])
            self._running = remaining

    def _fail_all(self, error: Exception) -> None:
        with self._wake:
            running, self._running, self._cache = self._running, [], None
        for sequence in running:
            if not sequence.future.done():
                sequence.future.set_exception(error)
