"""The worker's model slot goes to the waiting request due first, and the router predicts that order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.unit.test_live_prediction import warm_info
from tierserve.domain.deadlines import NO_BUDGET_DEADLINE_S, first_token_deadline
from tierserve.router.live import LiveStats
from tierserve.router.prediction import Ticket, WorkerLoad, displaced, predict
from tierserve.worker.scheduling import DeadlineSlot


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


async def take_turns(slot: DeadlineSlot, deadlines: dict[str, float]) -> list[str]:
    """Hold the slot, queue one waiter per deadline (in dict order), release: the order served."""
    served: list[str] = []

    async def wait(name: str, deadline: float) -> None:
        await slot.acquire(deadline)
        served.append(name)
        await asyncio.sleep(0)
        slot.release()

    await slot.acquire(0.0)
    tasks = [asyncio.create_task(wait(name, deadline)) for name, deadline in deadlines.items()]
    await asyncio.sleep(0)  # every waiter queued
    assert slot.waiting == len(deadlines)
    slot.release()
    await asyncio.gather(*tasks)
    return served


def test_waiters_are_served_earliest_deadline_first_and_ties_in_arrival_order() -> None:
    async def test() -> None:
        slot = DeadlineSlot()
        order = await take_turns(slot, {"loose": 3.0, "none": 60.0, "tight": 1.5, "tight-later": 1.5})
        assert order == ["tight", "tight-later", "loose", "none"]
        assert not slot.held and slot.waiting == 0

    run(test)


def test_a_cancelled_waiter_loses_its_place_and_the_slot_is_not_lost() -> None:
    async def test() -> None:
        slot = DeadlineSlot()
        await slot.acquire(0.0)
        cancelled = asyncio.create_task(slot.acquire(1.0))
        later = asyncio.create_task(slot.acquire(2.0))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        assert slot.waiting == 1
        slot.release()
        await asyncio.wait_for(later, timeout=1)
        assert slot.held
        slot.release()
        assert not slot.held

    run(test)


def test_a_waiter_cancelled_just_as_it_was_handed_the_slot_passes_it_on() -> None:
    async def test() -> None:
        slot = DeadlineSlot()
        await slot.acquire(0.0)
        first = asyncio.create_task(slot.acquire(1.0))
        second = asyncio.create_task(slot.acquire(2.0))
        await asyncio.sleep(0)
        slot.release()  # hands the slot to `first`, which has not run yet
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, timeout=1)  # `first` passed it on
        slot.release()
        assert not slot.held

    run(test)


def test_a_request_without_a_budget_is_due_far_but_not_never() -> None:
    assert first_token_deadline(10.0, 1500) == pytest.approx(11.5)
    assert first_token_deadline(10.0, 0) == pytest.approx(10.0 + NO_BUDGET_DEADLINE_S)


def test_a_tight_request_is_predicted_to_wait_only_for_the_running_one_and_earlier_deadlines() -> None:
    stats = LiveStats()
    stats.seed(warm_info(ttft_us=20_000, tpot_us=10_000, prompt_tokens=20))  # 1 ms per prompt token
    load = WorkerLoad()
    running = load.begin(prompt_tokens=50, new_tokens=30, deadline=100.0)
    running.tokens = 10  # 20 tokens to go: 200 ms
    load.begin(prompt_tokens=100, new_tokens=5, deadline=103.0)  # loose, waiting: 140 ms of work
    load.begin(prompt_tokens=20, new_tokens=11, deadline=101.0)  # tight, waiting: 20 + 100 = 120 ms
    tight = predict(stats, load, 1, prompt_tokens=30, deadline=101.5)
    assert tight.wait_us == pytest.approx(200_000 + 120_000)
    loose = predict(stats, load, 1, prompt_tokens=30, deadline=104.0)
    assert loose.wait_us == pytest.approx(200_000 + 140_000 + 120_000)
    # Nothing has a token yet: the oldest may be in prefill, so it counts whatever its deadline.
    fresh = WorkerLoad()
    fresh.begin(prompt_tokens=100, new_tokens=5, deadline=103.0)
    assert predict(stats, fresh, 1, prompt_tokens=30, deadline=101.0).wait_us == pytest.approx(140_000)


def test_going_ahead_counts_the_waiting_requests_it_would_make_late() -> None:
    stats = LiveStats()
    stats.seed(warm_info(ttft_us=20_000, tpot_us=10_000, prompt_tokens=20))  # 1 ms per prompt token
    load = WorkerLoad()
    running = load.begin(prompt_tokens=20, new_tokens=11, deadline=0.0)
    running.tokens = 1  # 100 ms to go
    # Waiting, due at 0.5 s: first token at 0.1 + 0.02 = 0.12 s now.
    load.begin(prompt_tokens=20, new_tokens=11, deadline=0.5)
    # A request due earlier with 0.5 s of work goes first: the waiting one's first token moves to 0.62 s.
    assert displaced(load, Ticket(20, 49, deadline=0.3), stats, 10_000, now_s=0.0) == 1
    # A short one does not push it past 0.5 s; one due later queues behind it and harms nothing.
    assert displaced(load, Ticket(20, 2, deadline=0.3), stats, 10_000, now_s=0.0) == 0
    assert displaced(load, Ticket(20, 49, deadline=0.9), stats, 10_000, now_s=0.0) == 0
    # Already late without the newcomer: not counted against it.
    assert displaced(load, Ticket(20, 49, deadline=0.3), stats, 10_000, now_s=1.0) == 0
    prediction = predict(stats, load, 1, prompt_tokens=20, deadline=0.3, new_tokens=49, now_s=0.0)
    assert prediction.displaces == 1
