"""grpc.health.v1 for every tierserve server, with watches that cannot hold the server up.

grpc's own asyncio health servicer writes each Watch update while holding the lock that status
changes take: one watcher that stops reading blocks every later `set`, and with it whatever sets
health (the router's worker checks, a drain's NOT_SERVING). It also drops the shared wake-up of a
service when any one of its watchers leaves, so the others miss later changes. Here a change only
sets an event; each watcher writes from its own task, and a stalled one stalls only itself (until
the stream idle timeout ends it, tierserve/rpc/stalls.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierserve.domain.requests import shown

# A grpc.health.v1 ServingStatus value.
ServingStatus = int
SERVING: ServingStatus = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: ServingStatus = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: ServingStatus = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Check and Watch over a status per service name ("" is the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, ServingStatus] = {"": SERVING}
        # Set (and replaced) on every change of a service some watcher waits on.
        self._changed: dict[str, asyncio.Event] = {}
        self._watchers: Counter[str] = Counter()
        self._shutting_down = False

    def status(self, service: str) -> ServingStatus:
        return self._status.get(service, SERVICE_UNKNOWN)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self._status:
            # Quoted short: a long name would overflow the status metadata (RESOURCE_EXHAUSTED).
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {shown(request.service)}")
        return health_pb2.HealthCheckResponse(status=self._status[request.service])

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        service = request.service
        self._watchers[service] += 1
        try:
            sent = None
            while True:
                status = self.status(service)
                if status != sent:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    sent = status
                    continue  # it may have changed while the message was on its way
                # Taken with no await since the status was read: no change is missed.
                await self._changed.setdefault(service, asyncio.Event()).wait()
        finally:
            self._watchers[service] -= 1
            if not self._watchers[service]:
                del self._watchers[service]
                self._changed.pop(service, None)

    async def set(self, service: str, status: ServingStatus) -> None:
        """Set a service's status (ignored once the server shuts down: it stays NOT_SERVING)."""
        if not self._shutting_down:
            self._set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on, for good."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in list(self._status):
            self._set(service, NOT_SERVING)

    def _set(self, service: str, status: ServingStatus) -> None:
        self._status[service] = status
        changed = self._changed.pop(service, None)
        if changed is not None:
            changed.set()
