"""Prediction: what a request would get on a worker now — wait, TTFT and TPOT.

A worker serves one stream at a time; the next is the waiting request whose first
token is due first (tierserve/domain/deadlines.py). So a new request waits for the
remaining work of the request generating there and of every waiting request due
no later than itself: each one's prefill if it has not started, plus its
remaining tokens at the worker's TPOT. Remaining tokens count up to
max_new_tokens (an upper bound: a stream may end earlier at end of sequence).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from tierserve.domain.budgets import (
    attainable,
    breaks_token_budget,
    step_for_rows,
    tightest_attainable_budget,
)
from tierserve.domain.latency import percentile
from tierserve.router.live import LiveStats


@dataclass(eq=False)
class Ticket:
    """One request relayed to a worker and not yet finished."""

    prompt_tokens: int
    new_tokens: int
    # When its first token is due (time.monotonic() seconds): the worker's order of service.
    deadline: float = math.inf
    tokens: int = 0
    # Its per-token budget (0: none), and when its first token came (time.monotonic() seconds):
    # whether a newcomer's prefill would break it, as the worker's admission judges.
    token_budget_us: float = 0.0
    first_token_at: float = 0.0


@dataclass
class WorkerLoad:
    """The requests the router has in flight on one worker, in arrival order (the worker's order)."""

    tickets: list[Ticket] = field(default_factory=list)

    def begin(
        self, prompt_tokens: int, new_tokens: int, deadline: float = math.inf, token_budget_us: float = 0.0
    ) -> Ticket:
        ticket = Ticket(prompt_tokens, new_tokens, deadline, token_budget_us=token_budget_us)
        self.tickets.append(ticket)
        return ticket

    def service_order(self) -> list[Ticket]:
        """The order the worker serves them in: the one generating (the first with tokens, else
        the oldest: it may be in prefill), then the rest earliest deadline first, ties by arrival."""
        if not self.tickets:
            return []
        running = next((t for t in self.tickets if t.tokens), self.tickets[0])
        return [running, *sorted((t for t in self.tickets if t is not running), key=lambda t: t.deadline)]

    def ahead_of(self, deadline: float) -> list[Ticket]:
        """The tickets a request due at `deadline` would wait for: the one generating and every
        other due no later."""
        order = self.service_order()
        return order[:1] + [t for t in order[1:] if t.deadline <= deadline]

    def end(self, ticket: Ticket) -> None:
        self.tickets.remove(ticket)

    @property
    def outstanding(self) -> int:
        return len(self.tickets)

    @property
    def queued(self) -> int:
        """Requests waiting behind the one generating."""
        return max(0, len(self.tickets) - 1)

    @property
    def busy(self) -> bool:
        return bool(self.tickets)


@dataclass(frozen=True)
class Prediction:
    """Microseconds; TTFT includes the wait. Infinite when the worker has no figures yet."""

    wait_us: float
    ttft_us: float
    tpot_us: float
    # Where the TPOT figure comes from.
    basis: str = ""
    # Waiting requests this one would push past their first-token deadline by going ahead of them.
    displaces: int = 0

    @property
    def known(self) -> bool:
        return math.isfinite(self.ttft_us) and math.isfinite(self.tpot_us)

    def total_us(self, new_tokens: int) -> float:
        """Until the last token: what 'fastest' and 'lowest predicted latency' compare."""
        return self.ttft_us + max(new_tokens - 1, 0) * self.tpot_us


UNKNOWN = Prediction(math.inf, math.inf, math.inf, basis="no measurement yet")


def remaining_us(ticket: Ticket, stats: LiveStats, tpot_us: float) -> float:
    """Work left on a relayed request: its prefill if not started, then its remaining tokens."""
    left = max(ticket.new_tokens - ticket.tokens, 0)
    if ticket.tokens == 0:
        fit = stats.prefill()
        prefill = fit.ttft_us(ticket.prompt_tokens) if fit else tpot_us
        return prefill + max(left - 1, 0) * tpot_us
    return left * tpot_us


def late_tickets(order: list[Ticket], stats: LiveStats, tpot_us: float, now_s: float) -> list[Ticket]:
    """The waiting tickets of a service order whose first token is predicted after its deadline."""
    late, at_s = [], now_s
    for ticket in order:
        if ticket.tokens == 0:
            fit = stats.prefill()
            first_token_s = at_s + (fit.ttft_us(ticket.prompt_tokens) if fit else tpot_us) / 1e6
            if first_token_s > ticket.deadline:
                late.append(ticket)
        at_s += remaining_us(ticket, stats, tpot_us) / 1e6
    return late


def displaced(load: WorkerLoad, newcomer: Ticket, stats: LiveStats, tpot_us: float, now_s: float) -> int:
    """How many waiting requests go from on time to late if `newcomer` joins the queue (the
    running one keeps its place; newcomer goes behind every request due no later)."""
    order = load.service_order()
    if not order:
        return 0
    position = 1 + sum(1 for t in order[1:] if t.deadline <= newcomer.deadline)
    with_newcomer = [*order[:position], newcomer, *order[position:]]
    before = late_tickets(order, stats, tpot_us, now_s)
    after = late_tickets(with_newcomer, stats, tpot_us, now_s)
    return sum(1 for t in after if t is not newcomer and t not in before)


def predict(
    stats: LiveStats,
    load: WorkerLoad,
    streams: int,
    prompt_tokens: int,
    deadline: float = math.inf,
    new_tokens: int = 0,
    now_s: float = 0.0,
    batch_slots: int = 1,
    token_budget_us: float = 0.0,
    worker_steps_us: Mapping[int, float] | None = None,
) -> Prediction:
    """Wait, TTFT and TPOT for a request of `prompt_tokens` due at `deadline` arriving at this
    worker at `now_s`, with `streams` generating on its cores once it runs (itself included);
    given its `new_tokens`, also how many waiting requests it would make late. A worker that
    batches (`batch_slots` > 1) starts a request at once while it has a free slot and the TPOT
    at that batch occupancy (`streams`) is within the request's `token_budget_us` (0: none) and
    those of the requests ahead of it (judged on the worker's `worker_steps_us` when known): no
    wait, unless its prefill would push a running request past that one's own per-token budget:
    then it waits for those to finish. Otherwise it waits, as the worker's admission makes it
    (worker/batching/admission.py), until few enough requests run there for its budget."""
    tpot_us, basis = stats.tpot_us(streams)
    fit = stats.prefill()
    if tpot_us is None or fit is None:
        return UNKNOWN
    if batch_slots > 1:
        peers = streams - min(load.outstanding + 1, batch_slots)  # busy workers on the same cores
        ahead = [t.token_budget_us for t in load.tickets if t.tokens or t.deadline <= deadline]
        slots = budget_slots(stats, batch_slots, peers, token_budget_us, worker_steps_us, ahead)
        if load.outstanding < slots:
            prefill_us = fit.ttft_us(prompt_tokens)
            queued = queued_prefills(load.tickets, deadline)
            queued_us = sum(fit.ttft_us(t.prompt_tokens) for t in queued)
            behind = f"; behind {len(queued)} queued prefills" if queued else ""
            one_row_us = batch_step_us(stats, worker_steps_us, peers, 1)
            held_by = stalled_budgets(load.tickets, prefill_us, tpot_us, now_s, one_row_us)
            if not held_by:
                return Prediction(queued_us, queued_us + prefill_us, tpot_us, basis + behind)
            # The worker holds it until the rows its prefill would push past their budgets finish.
            wait_us = max(queued_us, *(remaining_us(t, stats, tpot_us) for t in held_by))
            return Prediction(
                wait_us,
                wait_us + prefill_us,
                tpot_us,
                f"{basis}; waits for {len(held_by)} running whose budget cannot absorb its prefill{behind}",
            )
        # It starts when enough running requests have finished: when the k-th to finish does.
        at_start, at_start_basis = stats.tpot_us(slots + peers)
        if at_start is not None:
            tpot_us, basis = at_start, at_start_basis
        wait_us = batch_wait_us(load.tickets, slots, deadline, lambda t: remaining_us(t, stats, tpot_us))
        return Prediction(wait_us, wait_us + fit.ttft_us(prompt_tokens), tpot_us, basis)
    wait_us = sum(remaining_us(ticket, stats, tpot_us) for ticket in load.ahead_of(deadline))
    harm = (
        displaced(load, Ticket(prompt_tokens, new_tokens, deadline), stats, tpot_us, now_s)
        if new_tokens
        else 0
    )
    return Prediction(wait_us, wait_us + fit.ttft_us(prompt_tokens), tpot_us, basis, harm)


def queued_prefills(tickets: list[Ticket], deadline: float) -> list[Ticket]:
    """The relayed requests whose prompts a batching worker prefills before a newcomer's, though a
    slot is free: it prefills one prompt at a time, earliest deadline first (worker/batching), so
    every one without a first token yet and due no later. In a burst the newcomer's first token
    waits for all of them; counting only its own prefill predicted TTFTs 2-4x short (a Zen 3)."""
    return [t for t in tickets if not t.tokens and t.deadline <= deadline]


def batch_wait_us(
    tickets: list[Ticket], slots: int, deadline: float, remaining: Callable[[Ticket], float]
) -> float:
    """When a newcomer due at `deadline` gets one of a batch's `slots`: the running requests (those
    making tokens) hold theirs until they finish; the waiting ones due no later start before it, each
    when fewer than `slots` run, and then hold a slot too (the worker admits earliest deadline
    first). Counting only the running ones' finishes would have the waiting ones run at no cost."""
    running = [remaining(t) for t in tickets if t.tokens]
    waiting = sorted(
        (t for t in tickets if not t.tokens and t.deadline <= deadline), key=lambda t: t.deadline
    )
    active = sorted(running)  # a heap of finish times
    now = 0.0
    for ticket in waiting:
        while len(active) >= slots:
            now = heapq.heappop(active)
        heapq.heappush(active, now + remaining(ticket))
    while len(active) >= slots:
        now = heapq.heappop(active)
    return now


def stalled_budgets(
    tickets: list[Ticket], prefill_us: float, tpot_us: float, now_s: float, one_row_us: float | None = None
) -> list[Ticket]:
    """The running tickets whose `attainable` per-token budget (one row's step, `one_row_us`, meets
    it) a newcomer's prefill would break: their time since the first token, the stall and their
    remaining tokens at `tpot_us` exceed their budget times their gaps (the worker's rule, shared:
    domain/budgets.py)."""
    return [
        ticket
        for ticket in tickets
        if attainable(ticket.token_budget_us, one_row_us)
        and breaks_token_budget(
            ticket.token_budget_us,
            ticket.tokens,
            ticket.new_tokens,
            max(now_s - ticket.first_token_at, 0.0) * 1e6,
            prefill_us,
            tpot_us,
        )
    ]


def budget_slots(
    stats: LiveStats,
    batch_slots: int,
    peers: int,
    token_budget_us: float,
    worker_steps_us: Mapping[int, float] | None = None,
    ahead_budgets_us: Sequence[float] = (),
) -> int:
    """How many requests may run in the batch, a newcomer included, with each step within the
    tightest per-token budget among them that one row's step meets (`tightest_attainable_budget`):
    the newcomer's `token_budget_us` and those of the requests that join before it,
    `ahead_budgets_us` (0: none; no budget at all: all `batch_slots`). At
    least 1: a request alone always starts. The worker admits one request at a time, so a batch of
    k is reached only through every size below it: the count stops at the first size over budget.

    The step at each size is the worker's own figure when it publishes them (`worker_steps_us`,
    what its admission decides with, so the router predicts the holds it makes; while the router
    used only the TPOTs it measured, a worker held requests for seconds that the router predicted
    would start at once: docs/benchmarks/routing-batching-side-by-side-2026-12-04-epyc-zen4.md),
    else the TPOT the router measured with that many streams, and `peers` busy workers, on the
    worker's cores."""
    tightest = tightest_attainable_budget(
        (token_budget_us, *ahead_budgets_us), batch_step_us(stats, worker_steps_us, peers, 1)
    )
    if not tightest:
        return batch_slots
    slots = 1
    while (
        slots < batch_slots
        and (step := batch_step_us(stats, worker_steps_us, peers, slots + 1)) is not None
        and step <= tightest
    ):
        slots += 1
    return slots


def batch_step_us(
    stats: LiveStats, worker_steps_us: Mapping[int, float] | None, peers: int, rows: int
) -> float | None:
    """A step of `rows` rows on a batching worker: from the worker's own step figures when it
    publishes them, else the TPOT the router measured with that many streams and `peers` busy
    workers on its cores."""
    if worker_steps_us:
        return step_for_rows(worker_steps_us, rows)
    return stats.tpot_us(rows + peers)[0]


def next_free_us(stats: LiveStats, load: WorkerLoad, streams: int) -> float:
    """When the request generating now should finish, freeing a place in the queue."""
    if not load.tickets:
        return 0.0
    tpot_us, _ = stats.tpot_us(streams)
    if tpot_us is None:
        return math.inf
    return remaining_us(load.tickets[0], stats, tpot_us)


# Completed requests whose prediction error is remembered, per worker.
ERROR_SAMPLES = 32
# Fewer than this many: no correction yet.
MIN_ERROR_SAMPLES = 4
# The correction is the median of actual/predicted: an unbiased prediction, so "predicted to meet the
# budget" means more likely to meet it than not. A pessimistic quantile (the 90th was tried) made the
# router refuse strict requests that would have met their budgets: in a routing run its corrected
# predictions were ~1.2x the actual TTFT at the median, and every refusal is a certain miss. The
# margin against being late lies in slo's preference for workers with headroom instead.
ERROR_QUANTILE = 0.5
# Bounds on the correction, so one pathological request cannot lock a worker out or in.
MIN_CORRECTION, MAX_CORRECTION = 0.5, 2.0
# Errors older than this are forgotten. A worker the correction steers traffic away from gets no
# new samples; without expiry an old, bad streak would keep it idle for good.
ERROR_MEMORY_S = 30.0


class PredictionErrors:
    """How far a worker's predictions have been off: actual over predicted TTFT and TPOT of its
    completed requests. The model behind `predict` ignores what it cannot see (other processes on
    the cores, requests that end early, arrivals after the decision); this learns its bias."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # (when, actual / predicted)
        self._ttft: deque[tuple[float, float]] = deque(maxlen=ERROR_SAMPLES)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=ERROR_SAMPLES)

    def record(self, predicted: Prediction, ttft_us: float, tpot_us: float) -> None:
        if not predicted.known:
            return
        now = self._clock()
        if predicted.ttft_us > 0 and ttft_us > 0:
            self._ttft.append((now, ttft_us / predicted.ttft_us))
        if predicted.tpot_us > 0 and tpot_us > 0:
            self._tpot.append((now, tpot_us / predicted.tpot_us))

    def _factor(self, samples: deque[tuple[float, float]]) -> float:
        horizon = self._clock() - ERROR_MEMORY_S
        while samples and samples[0][0] < horizon:
            samples.popleft()
        if len(samples) < MIN_ERROR_SAMPLES:
            return 1.0
        ratios = [ratio for _, ratio in samples]
        return min(max(percentile(ratios, ERROR_QUANTILE), MIN_CORRECTION), MAX_CORRECTION)

    @property
    def ttft_factor(self) -> float:
        return self._factor(self._ttft)

    @property
    def tpot_factor(self) -> float:
        return self._factor(self._tpot)

    def correct(self, prediction: Prediction) -> Prediction:
        if not prediction.known:
            return prediction
        ttft, tpot = self.ttft_factor, self.tpot_factor
        if ttft == 1.0 and tpot == 1.0:
            return prediction
        return replace(
            prediction,
            wait_us=prediction.wait_us * ttft,
            ttft_us=prediction.ttft_us * ttft,
            tpot_us=prediction.tpot_us * tpot,
            basis=f"{prediction.basis}; corrected by measured error x{ttft:.2f} TTFT, x{tpot:.2f} TPOT",
        )
