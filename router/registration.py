"""Self-registered workers: who announced itself, where, and until when the router keeps it.

A worker's Register call is also its heartbeat; each one pushes its expiry `ttl_s` ahead. The
clock is injected so tests can step time instead of sleeping.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from tierserve.errors import InvalidRequest
from tierserve.tiers import TIER_NAMES, is_known_tier
from tierserve.v1 import router_pb2

# As [[workers]] name in the config: the id shows in logs, metrics labels and summaries.
WORKER_ID = re.compile(r"^[A-Za-z0-9._@:-]+$")


@dataclass
class Registration:
    worker_id: str
    address: str
    tier: str
    expires_at: float


def registration_from_request(request: router_pb2.RegisterRequest) -> tuple[str, str, str]:
    """(worker id, address, tier), or InvalidRequest naming the field that is wrong."""
    if not WORKER_ID.match(request.worker_id):
        raise InvalidRequest("worker_id", f"must be letters, digits and . _ - @ :, got {request.worker_id!r}")
    host, sep, port = request.address.rpartition(":")
    if not host or not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest("address", f"expected host:port, got {request.address!r}")
    if not is_known_tier(request.tier):
        raise InvalidRequest("tier", f"unknown tier {request.tier!r}; known tiers: {', '.join(TIER_NAMES)}")
    return request.worker_id, request.address, request.tier


class Registrations:
    """The live registrations, by worker id."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._by_id: dict[str, Registration] = {}

    def get(self, worker_id: str) -> Registration | None:
        return self._by_id.get(worker_id)

    def heartbeat(self, worker_id: str, address: str, tier: str) -> bool:
        """Record a registration; True when it is new (first time, or a new address or tier)."""
        expires_at = self._clock() + self.ttl_s
        known = self._by_id.get(worker_id)
        self._by_id[worker_id] = Registration(worker_id, address, tier, expires_at)
        return known is None or (known.address, known.tier) != (address, tier)

    def expired(self) -> list[str]:
        """Ids whose expiry has passed without a heartbeat."""
        now = self._clock()
        return [r.worker_id for r in self._by_id.values() if r.expires_at <= now]

    def forget(self, worker_id: str) -> None:
        self._by_id.pop(worker_id, None)
