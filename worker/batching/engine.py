"""Continuous batching on IPEX's traced decoder graph: requests join at a step boundary and
leave the step they finish.

One thread runs the loop. Each step it drops the rows that finished or were cancelled, admits
at most one waiting request (earliest first-token deadline first) if no other is prefilling and
a batch slot and the KV-cache budget allow, then runs one forward: one chunk (at most
`prefill_chunk_tokens` tokens) of the prefilling request's prompt and the next token of every
running row packed as one sequence, sampling each row's next token with that row's own settings.
After its last chunk the prefilling request samples its first token and becomes a row. So a long
prompt holds the running streams for one chunk per step, not for the whole prompt, and they make a
token in that step too. Decode reads the weights once per step for the whole batch, which is why a
batch costs little more per step than one stream. Where a row must get the same bits as alone and
the linears could change them (`BatchLimits.packed_prefill` off), the chunk runs alone and the
rows' decode forward after it.

Every forward, chunk or decode step, goes through the tier's traced graph with its attention over
a paged cache (`kernels.paged_kv`): each request owns blocks of one pool, so joining and leaving
copy nothing and no row is padded to the longest. Without chunking (`prefill_chunk_tokens` None,
where the start-up check found chunks wrong) each prompt is prefilled in one forward.
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
from functools import partial
from typing import Any

import torch

from tierserve.domain.errors import InvalidRequest, Overloaded
from tierserve.domain.requests import GenerationParams
from tierserve.worker.batching.admission import (
    PrefillTimes,
    RunningRow,
    StepTimes,
    keeps_running_budgets,
    within_budgets,
)
from tierserve.worker.batching.delivery import Publisher, StepOutbox
from tierserve.worker.batching.sampler import greedy_tokens, next_token, samples, seeded_generator
from tierserve.worker.engine import Engine, seed_for
from tierserve.worker.generation import GenerationOutcome, PreparedPrompt, TokenEvent, TokenSink
from tierserve.worker.kernels.decode_attention import DecodeKernel
from tierserve.worker.kernels.last_logits import prefill_graph
from tierserve.worker.kernels.paged_kv import (
    BlockPool,
    PagedRow,
    blocks_for,
    cache_shape,
    packed_forward,
    paged_forward,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 16
    # Positions of the KV cache the batch may hold, all rows together.
    kv_cache_tokens: int = 32768
    # Most prompt tokens one step prefills; None: a whole prompt in one forward.
    prefill_chunk_tokens: int | None = 256
    # A prompt chunk and the running rows' next tokens in one forward (the weights read once for
    # both). Off where a row must get the same bits in a batch as alone and a linear may round a
    # row differently in a product of hundreds of rows (IPEX's float32 lm_head by 4e-5 over 40 rows).
    packed_prefill: bool = True


@dataclass(eq=False)
class _Sequence:
    """One request in the engine: waiting, then a row of the batch."""

    prompt: PreparedPrompt
    params: GenerationParams
    sink: TokenSink
    seed: int
    cancelled: Callable[[], bool]
    deadline: float
    # Per-token budget in seconds (0: none): the batch it joins must keep its steps within it.
    token_budget_s: float = 0.0
    submitted_at: float = field(default_factory=time.perf_counter)
    future: Future[GenerationOutcome] = field(default_factory=Future)
    admitted_at: float = 0.0
    generator: torch.Generator | None = None
    next_token: int = 0
    position: int = 0
    # Its KV cache: the prompt's positions so far while prefilling, then every position.
    kv: PagedRow = field(default_factory=PagedRow)
    # Tokens made, and when the first one was (what admission reads of a running row's budget).
    made: int = 0
    first_token_at: float = 0.0
    # Why admission held it at the head of the queue, each reason once (`HOLD_REASONS`).
    held_for: set[str] = field(default_factory=set)

    def running_row(self, now: float) -> RunningRow:
        return RunningRow(
            self.token_budget_s, self.made, self.prompt.max_new_tokens, now - self.first_token_at
        )

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
    # Of `running`, the request whose prompt is being prefilled (0 or 1), and its prompt tokens
    # not prefilled yet.
    prefilling: int = 0
    prefill_tokens_left: int = 0
    # Requests admission held at the head of the queue, by reason (`HOLD_REASONS`), since start.
    holds: dict[str, int] = field(default_factory=dict)


# Why the request due first waits though it is first: no free slot, no KV-cache room, the bigger
# batch's step over a per-token budget (its own or a row's), or its prefill stall breaking a running
# row's budget (`admission`).
HOLD_REASONS = ("batch full", "kv cache full", "step over a budget", "prefill over a running budget")

# The holds a router cannot foresee from slots and the KV budget alone: logged per request at INFO
# (the others at DEBUG), so a request that came later than the router predicted can be explained.
BUDGET_HOLDS = HOLD_REASONS[2:]


def _log_hold(sequence: _Sequence, rows: int, steps_s: dict[int, float]) -> None:
    """Say why a request waited at the head of the queue, once it is admitted, with the decode
    steps by rows its admission predicted from (`StepTimes`): a step measured while another
    process loaded the memory holds every request after it until a bigger batch runs again."""
    budget = any(reason in BUDGET_HOLDS for reason in sequence.held_for)
    steps = ", ".join(f"{rows_}: {seconds * 1e3:.1f}" for rows_, seconds in steps_s.items())
    log.log(
        logging.INFO if budget else logging.DEBUG,
        "request %s admitted beside %d rows after %.0f ms in the queue; held for: %s; step ms by rows: %s",
        sequence.params.request_id,
        rows,
        sequence.queue_s * 1e3,
        ", ".join(sorted(sequence.held_for)),
        steps or "none yet",
    )


class BatchEngine:
    """Serves every request of one worker through one batch; thread-safe `submit`."""

    def __init__(
        self,
        engine: Engine,
        limits: BatchLimits,
        in_own_thread: bool = True,
        decode_kernel: DecodeKernel | None = None,
    ) -> None:
        """`in_own_thread`: step in a thread of its own, else only where the owner calls `run`
        or `run_until_idle` (a worker runs it on the thread that loaded the model: see `run`).
        `decode_kernel`: the decode steps' attention (`kernels.decode_attention`); None: IPEX's."""
        self.engine = engine
        self.limits = limits
        model = engine.loaded.model
        self._graph: Any = model.trace_graph
        self._run_context = engine.loaded.run_context
        self._waiting: list[tuple[float, int, _Sequence]] = []
        self._order = itertools.count()
        self._running: list[_Sequence] = []
        with torch.inference_mode(), self._run_context():
            shape = cache_shape(model)
            # Prompt chunks' forwards compute the lm_head at the last position only, where the
            # graph allows (kernels.last_logits).
            self._prefill_graph = prefill_graph(model)
        # Admission keeps the spans within kv_cache_tokens; a block per row more covers their
        # last partly used blocks.
        self._pool = BlockPool(shape, blocks_for(limits.kv_cache_tokens) + limits.max_batch, decode_kernel)
        # The one request whose prompt is being prefilled, chunk by chunk; not yet a batch row.
        self._prefilling: _Sequence | None = None
        # Measured decode steps by rows: what admission predicts a bigger batch's step from.
        self.step_times = StepTimes()
        # Measured prefill seconds per prompt token: the stall a newcomer puts on the rows.
        self.prefill_times = PrefillTimes()
        self._holds = {reason: 0 for reason in HOLD_REASONS}
        # Tokens of requests with a publisher, held until their step ends.
        self._outbox = StepOutbox()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        if in_own_thread:
            self.start_thread()

    def start_thread(self) -> None:
        """Step in a thread of the engine's own from now on."""
        self._thread = threading.Thread(target=self.run, name="batch-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Step until stopped, in the calling thread. A worker calls it on its model thread: with
        libgomp, once a second thread has run torch's parallel work, every thread's OpenMP
        workers stop spin-waiting between parallel regions (more threads than CPUs), and each of
        the hundreds of small regions in a decode step then waits to wake a sleeping worker. On a
        2-core Zen 4 that made bf16 decode steps 2.3x slower in any thread (14.7 ms against 35)."""
        self._loop(until_idle=False)

    def run_until_idle(self) -> None:
        """Step in the calling thread until nothing runs or waits (an engine without a thread of
        its own, e.g. the worker's start-up checks on its model thread)."""
        self._loop(until_idle=True)

    # --- the service side --------------------------------------------------------------------

    def submit(
        self,
        prompt: PreparedPrompt,
        params: GenerationParams,
        emit: Callable[[TokenEvent], None],
        cancelled: Callable[[], bool],
        deadline: float,
        token_budget_s: float = 0.0,
        publisher: Publisher | None = None,
    ) -> Ticket:
        """Queue a request; its ticket's future ends with the outcome (or the error).
        `token_budget_s`: its per-token budget (0: none), which admission keeps (admission.py).
        `publisher`: `emit` gets each step's tokens through it, after the step (see `delivery`),
        and before the future ends; None: `emit` is called on the model thread as tokens come."""
        seed = seed_for(params.sampling)
        sequence = _Sequence(
            prompt=prompt,
            params=params,
            sink=self.engine.token_sink(
                params, prompt, emit if publisher is None else self._outbox.sender(publisher, emit)
            ),
            seed=seed,
            cancelled=cancelled,
            deadline=deadline,
            token_budget_s=token_budget_s,
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

    @property
    def attends_with_tierserve_kernel(self) -> bool:
        """Whether decode steps attend with tierserve's kernel (else with IPEX's paged one)."""
        return self._pool.decode_kernel is not None

    @property
    def chunked_prefill(self) -> bool:
        """Whether long prompts are prefilled a chunk per step (else in one forward)."""
        return self.limits.prefill_chunk_tokens is not None

    def occupancy(self) -> BatchOccupancy:
        with self._wake:
            members = self._members()
            prefilling = self._prefilling
            return BatchOccupancy(
                running=len(members),
                waiting=len(self._waiting),
                max_batch=self.limits.max_batch,
                kv_tokens_used=sum(s.kv.length for s in members),
                kv_tokens_budget=self.limits.kv_cache_tokens,
                kv_bytes=self._pool.used_blocks * self._pool.block_bytes(),
                prefilling=int(prefilling is not None),
                prefill_tokens_left=(
                    prefilling.prompt.prompt_tokens - _prefilled(prefilling) if prefilling else 0
                ),
                holds=dict(self._holds),
            )

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- the model thread --------------------------------------------------------------------

    def _loop(self, until_idle: bool) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._members():
                    if until_idle:
                        return
                    self._wake.wait()
                if self._stopping and not self._members() and not self._waiting:
                    return
                self._drop_cancelled_waiters()
                if self._prefilling is None:
                    self._prefilling = self._next_admission()
                prefilling = self._prefilling
            # A failed forward fails the requests it carried, and only those: the prefilling
            # request's cache is its own, the rows' is the batch's.
            if prefilling is not None and self._packs(prefilling):
                self._guarded(
                    partial(self._packed_step, prefilling), "packed prefill and decode", prefilling, True
                )
            else:
                if prefilling is not None:
                    self._guarded(partial(self._prefill_step, prefilling), "prefill", prefilling, False)
                if self._running:
                    self._guarded(self._decode_step, "batched decode", None, True)

    def _guarded(
        self, forward: Callable[[], None], what: str, prefilling: _Sequence | None, carries_rows: bool
    ) -> None:
        """Run one step's `forward`; if it fails, fail the requests it carried: `prefilling`, and
        the rows if `carries_rows`."""
        try:
            with torch.inference_mode(), self._run_context():
                forward()
            # Each forward's tokens go out before the next forward: a prompt's first token must
            # not wait for the decode step that may follow its prefill in the same iteration.
            self._outbox.flush()
        except Exception as error:
            log.exception("%s forward failed", what)
            if prefilling is not None:
                self._end_prefill()
                if not prefilling.future.done():
                    self._fail(prefilling, error)
            if carries_rows:
                self._fail_rows(error)

    def _members(self) -> list[_Sequence]:
        """The requests holding a batch slot and KV-cache room: the rows, and the one prefilling."""
        return [*self._running, *([self._prefilling] if self._prefilling is not None else [])]

    def _drop_cancelled_waiters(self) -> None:
        """Cancelled waiters leave with their outcome, even while a prompt is prefilling (called
        locked)."""
        left = [entry for entry in self._waiting if entry[2].cancelled()]
        if left:
            self._waiting = [entry for entry in self._waiting if not entry[2].cancelled()]
            heapq.heapify(self._waiting)
            for _, _, sequence in left:
                sequence.admitted_at = time.perf_counter()
                self._finish(sequence)

    def _next_admission(self) -> _Sequence | None:
        """The waiting request due first, if a slot, the KV budget and the per-token budgets of
        the batch allow it (called locked). The first one that does not fit blocks the rest, so a
        big request (or a tight budget) is not starved by those behind it."""
        if not self._waiting:
            return None
        _, _, head = self._waiting[0]
        held_for = self._hold_reason(head)
        if held_for is not None:
            if held_for not in head.held_for:
                head.held_for.add(held_for)
                self._holds[held_for] += 1
            return None
        heapq.heappop(self._waiting)
        head.admitted_at = time.perf_counter()
        if head.held_for:
            _log_hold(head, len(self._members()), self.step_times.snapshot())
        head.sink.start()
        return head

    def _hold_reason(self, head: _Sequence) -> str | None:
        """Why the request due first may not join now (one of `HOLD_REASONS`), or None (called locked)."""
        members = self._members()
        if len(members) >= self.limits.max_batch:
            return HOLD_REASONS[0]
        if head.span + sum(s.span for s in members) > self.limits.kv_cache_tokens:
            return HOLD_REASONS[1]
        budgets = [s.token_budget_s for s in (head, *members)]
        if not within_budgets(self.step_times, len(members) + 1, budgets):
            return HOLD_REASONS[2]
        if not keeps_running_budgets(
            [s.running_row(time.perf_counter()) for s in self._running],
            self.step_times.predict(len(members) + 1),
            self.prefill_times.predict(head.prompt.prompt_tokens, self.limits.prefill_chunk_tokens),
            self.step_times.predict(1),
        ):
            return HOLD_REASONS[3]
        return None

    def _packs(self, prefilling: _Sequence) -> bool:
        """Whether this step runs the prefilling request's chunk and the rows in one forward."""
        return self.limits.packed_prefill and bool(self._running) and not prefilling.cancelled()

    def _prefill_step(self, sequence: _Sequence) -> None:
        """One chunk of `sequence`'s prompt; after the last, its first token, and it joins the
        batch. A cancelled request leaves before its next chunk."""
        if sequence.cancelled():
            self._end_prefill()
            self._finish(sequence)
            return
        start, end = self._next_chunk(sequence)
        try:
            began = time.perf_counter()
            logits = self._prefill_forward(
                sequence.kv, sequence.prompt.input_ids[:, start:end], _span(start, end)
            )
            self.prefill_times.record(end - start, time.perf_counter() - began)
        except Exception as error:
            self._end_prefill()
            self._fail(sequence, error)
            return
        if end == sequence.prompt.prompt_tokens:
            self._join(sequence, logits[0, -1])

    def _packed_step(self, sequence: _Sequence) -> None:
        """One chunk of `sequence`'s prompt and every row's next token in one forward: the rows
        make their tokens, then after its last chunk `sequence` joins them."""
        start, end = self._next_chunk(sequence)
        rows = list(self._running)
        started = time.perf_counter()
        graph, keep_from = (
            (self._graph, None) if self._prefill_graph is None else (self._prefill_graph, end - start - 1)
        )
        logits = packed_forward(
            graph,
            self._pool,
            sequence.kv,
            sequence.prompt.input_ids[:, start:end],
            _span(start, end),
            [s.kv for s in rows],
            torch.tensor([s.next_token for s in rows], dtype=torch.long),
            torch.tensor([s.position for s in rows], dtype=torch.long),
            keep_from=keep_from,
        )[0]
        finished = self._advance_rows(logits[-len(rows) :])
        elapsed = time.perf_counter() - started
        # The chunk's share of the forward: what it took beyond a decode step of these rows.
        self.prefill_times.record(
            end - start, max(0.0, elapsed - (self.step_times.predict(len(rows)) or 0.0))
        )
        self._retire(finished)
        if end == sequence.prompt.prompt_tokens:
            self._join(sequence, logits[-len(rows) - 1])

    def _next_chunk(self, sequence: _Sequence) -> tuple[int, int]:
        """The prompt positions the next chunk of a prefilling request covers."""
        start = _prefilled(sequence)
        return start, min(
            sequence.prompt.prompt_tokens, start + (self.limits.prefill_chunk_tokens or 1 << 62)
        )

    def _join(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        """A prompt prefilled: its first token from its last position's `logits`, and it becomes a
        row (or ends, if that token finished it)."""
        try:
            token = next_token(logits, sequence.params.sampling, sequence.generator)
        except Exception as error:
            self._end_prefill()
            self._fail(sequence, error)
            return
        sequence.position = sequence.prompt.prompt_tokens
        sequence.next_token = token
        sequence.made, sequence.first_token_at = 1, time.perf_counter()
        sequence.sink.push(token)
        done = sequence.sink.finished or sequence.cancelled()
        with self._wake:  # from prefilling to a row in one move: occupancy never loses it
            if not done:
                self._running.append(sequence)
            self._prefilling = None
        if done:
            self._pool.release(sequence.kv)
            self._finish(sequence)

    def _prefill_forward(self, row: PagedRow, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The logits of a prompt chunk's forward: of its last position where the graph could be
        trimmed, else of all (the caller reads the last)."""
        if self._prefill_graph is None:
            return paged_forward(self._graph, self._pool, [row], ids, positions)
        last = int(ids.shape[1]) - 1
        return paged_forward(self._prefill_graph, self._pool, [row], ids, positions, keep_from=last)

    @property
    def prefills_last_logits_only(self) -> bool:
        """Whether a prompt chunk's forward computes the lm_head at its last position only."""
        return self._prefill_graph is not None

    def _end_prefill(self) -> None:
        with self._wake:
            if self._prefilling is not None:
                self._pool.release(self._prefilling.kv)
            self._prefilling = None

    def _decode_step(self) -> None:
        started, rows = time.perf_counter(), len(self._running)
        ids = torch.tensor([[s.next_token] for s in self._running], dtype=torch.long)
        positions = torch.tensor([[s.position] for s in self._running], dtype=torch.long)
        logits = paged_forward(self._graph, self._pool, [s.kv for s in self._running], ids, positions)[:, -1]
        finished = self._advance_rows(logits)
        self.step_times.record(rows, time.perf_counter() - started)
        self._retire(finished)

    def _advance_rows(self, logits: torch.Tensor) -> list[_Sequence]:
        """Each row's next token from its row of `logits` [rows, vocab], pushed to its stream; the
        rows that finished."""
        greedy = greedy_tokens(logits)
        finished: list[_Sequence] = []
        for row, sequence in enumerate(self._running):
            sequence.position += 1
            sequence.made += 1
            sampling = sequence.params.sampling
            try:
                sequence.next_token = (
                    next_token(logits[row], sampling, sequence.generator)
                    if samples(sampling, sequence.generator)
                    else greedy[row]
                )
            except InvalidRequest as error:
                self._fail(sequence, error)
                finished.append(sequence)
                continue
            sequence.sink.push(sequence.next_token)
            if sequence.sink.finished or sequence.cancelled():
                finished.append(sequence)
        return finished

    def _retire(self, finished: list[_Sequence]) -> None:
        # Cancellation is seen within one step even for rows that made a token this step.
        finished += [s for s in self._running if s not in finished and s.cancelled()]
        if finished:
            # Out of the batch before their outcomes go out: a caller that has its summary never
            # sees its request still running.
            self._keep([s for s in self._running if s not in finished])
            for sequence in finished:
                if not sequence.future.done():
                    self._finish(sequence)

    def _finish(self, sequence: _Sequence) -> None:
        self._outbox.flush()  # its tokens reach its stream before its outcome
        sequence.future.set_result(
            sequence.sink.outcome(sequence.prompt, sequence.seed, sequence.cancelled())
        )

    def _fail(self, sequence: _Sequence, error: Exception) -> None:
        self._outbox.flush()
        sequence.future.set_exception(error)

    def _keep(self, remaining: list[_Sequence]) -> None:
        with self._wake:
            for sequence in self._running:
                if sequence not in remaining:
                    self._pool.release(sequence.kv)
            self._running = remaining

    def _fail_rows(self, error: Exception) -> None:
        with self._wake:
            running, self._running = self._running, []
            for sequence in running:
                self._pool.release(sequence.kv)
        for sequence in running:
            if not sequence.future.done():
                self._fail(sequence, error)


def _span(start: int, end: int) -> torch.Tensor:
    """Positions start..end-1 of one row, as the graph takes them."""
    return torch.arange(start, end).unsqueeze(0)


def _prefilled(sequence: _Sequence) -> int:
    """Prompt positions already in a prefilling sequence's cache."""
    return sequence.kv.length
