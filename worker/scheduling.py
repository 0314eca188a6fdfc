"""Who gets the model next: the waiting request whose first-token deadline comes first.

A worker generates one request at a time on all of its cores. Serving the waiting requests
first come, first served makes a request with a tight first-token budget wait behind every
request with a loose one that arrived before it; earliest deadline first lets it go ahead
while the loose ones still have slack, which is what keeps both within budget (deadlines:
tierserve/domain/deadlines.py). Equal deadlines keep their arrival order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(order=True)
class _Waiter:
    deadline: float
    sequence: int
    future: asyncio.Future[None] = field(compare=False)


class DeadlineSlot:
    """One place at the model, handed to waiters earliest deadline first (an asyncio lock whose
    queue is ordered by deadline instead of arrival)."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[_Waiter] = []
        self._sequence = itertools.count()

    @property
    def held(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.future.done())

    async def acquire(self, deadline: float) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        waiter = _Waiter(deadline, next(self._sequence), asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Handed the slot just as it was cancelled: pass it on, or it is lost.
                self.release()
            else:
                self._drop(waiter)
            raise

    def release(self) -> None:
        """Give the slot to the waiter with the earliest deadline, or free it."""
        while self._waiters:
            waiter = heapq.heappop(self._waiters)
            if not waiter.future.done():
                waiter.future.set_result(None)
                return  # still held, now by that waiter
        self._held = False

    def _drop(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            heapq.heapify(self._waiters)
