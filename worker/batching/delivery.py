"""Handing a batch step's tokens to the streams that send them, once per step.

A batch step makes a token for every row. Handed to the event loop one by one, each token wakes
the loop thread, which then takes the GIL from the model thread while that is still pushing the
step's other rows, and the loop's sending competes with the next forward for the worker's cores.
On an AMX Xeon with 2 cores, a bf16 worker serving 8 streams through the router spent 2.1 ms a
step pushing 8 rows, against 0.7 ms for the same engine driven in-process
(docs/benchmarks/batch-step-host-time-2026-12-04-xeon-amx.md). So a step's tokens travel
together: one hand-over per step and publisher.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from tierserve.worker.generation import TokenEvent

TokenCallback = Callable[[TokenEvent], None]
# One token and where it goes.
Delivery = tuple[TokenCallback, TokenEvent]


def deliver_each(deliveries: Sequence[Delivery]) -> None:
    for callback, event in deliveries:
        callback(event)


class Publisher(ABC):
    """Takes a step's deliveries from the model thread and runs their callbacks where they belong."""

    @abstractmethod
    def __call__(self, deliveries: list[Delivery]) -> None: ...


class LoopPublisher(Publisher):
    """Runs a step's callbacks on `loop`, in order, with one wake-up of its thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __call__(self, deliveries: list[Delivery]) -> None:
        self._loop.call_soon_threadsafe(deliver_each, deliveries)


class StepOutbox:
    """The tokens a step made, held until the step ends (or a request's outcome is set, which
    must reach its stream after its tokens). Used on the model thread only."""

    def __init__(self) -> None:
        self._held: list[tuple[Publisher, Delivery]] = []

    def sender(self, publisher: Publisher, callback: TokenCallback) -> TokenCallback:
        """A request's emit: its tokens wait here for `flush`, then go to `callback` via `publisher`."""

        def hold(event: TokenEvent) -> None:
            self._held.append((publisher, (callback, event)))

        return hold

    def flush(self) -> None:
        if not self._held:
            return
        held, self._held = self._held, []
        by_publisher: dict[Publisher, list[Delivery]] = {}
        for publisher, delivery in held:
            by_publisher.setdefault(publisher, []).append(delivery)
        for publisher, deliveries in by_publisher.items():
            publisher(deliveries)
