"""The router's view of its workers: channels, health, descriptions, live figures and load."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2, worker_pb2, worker_pb2_grpc

from tierserve.domain.config import TierserveConfig
from tierserve.domain.deadlines import first_token_deadline
from tierserve.domain.errors import InvalidRequest, NoWorkerAvailable, Unsatisfiable
from tierserve.router.discovery import LookupFailed, is_dns_target, resolve
from tierserve.router.live import LiveStats, PromptTokenEstimator
from tierserve.router.occupancy import batch_occupancy
from tierserve.router.prediction import (
    Prediction,
    PredictionErrors,
    Ticket,
    WorkerLoad,
    next_free_us,
    predict,
)
from tierserve.router.registration import Registrant, Registrations
from tierserve.rpc.server import keepalive_options
from tierserve.rpc.tls import worker_channel_credentials, worker_channel_options

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
# A DNS lookup that takes longer has failed (the last known workers stay).
DNS_TIMEOUT_S = 5.0
# Describe again every this many health rounds, for the worker's own live figures.
DESCRIBE_EVERY = 5


@dataclass(eq=False)
class WorkerHandle:
    """One worker: how to reach it, what the router has measured of it, and what it has in flight."""

    worker_id: str
    tier: str
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    live: LiveStats
    queue_limit: int
    health: router_pb2.WorkerHealth.ValueType = router_pb2.WORKER_HEALTH_UNSPECIFIED
    info: worker_pb2.WorkerInfo | None = None
    load: WorkerLoad = field(default_factory=WorkerLoad)
    errors: PredictionErrors = field(default_factory=PredictionErrors)
    # Workers sharing at least one core with this one (their streams slow this one's tokens).
    peers: list[WorkerHandle] = field(default_factory=list, repr=False)
    requests_total: int = 0
    requests_failed: int = 0
    last_error: str = ""
    # Joined by Register (and leaves when its heartbeats stop), not from the configuration.
    registered: bool = False
    # When `info` was last answered (monotonic seconds): how old its batch figures are.
    described_at: float = 0.0
    _rounds: int = field(default=0, repr=False)

    @property
    def healthy(self) -> bool:
        return self.health == router_pb2.WORKER_HEALTH_SERVING

    @property
    def quality_loss_pct(self) -> float | None:
        if self.info is None or not self.info.accuracy.measured:
            return None
        return float(self.info.accuracy.perplexity_delta_pct)

    @property
    def in_flight(self) -> int:
        return self.load.outstanding

    @property
    def outstanding(self) -> int:
        return self.load.outstanding

    @property
    def batch_slots(self) -> int:
        """Streams the worker decodes together (1 when it serves one request at a time)."""
        if self.info is None or not self.info.batch.enabled:
            return 1
        return max(1, int(self.info.batch.max_batch))

    @property
    def worker_steps_us(self) -> dict[int, float]:
        """The decode step by rows the worker's batch admission decides with, microseconds, as of
        its last Describe (empty before its first step, or when it does not batch)."""
        if self.info is None or not self.info.batch.enabled:
            return {}
        return {int(rows): float(us) for rows, us in self.info.batch.step_us_by_rows.items()}

    @property
    def has_room(self) -> bool:
        # Up to batch_slots generate together; up to queue_limit wait behind them.
        return self.load.outstanding < self.batch_slots + self.queue_limit

    def streams_on_cores(self, joining: bool = True) -> int:
        """Streams that would generate on this worker's cores with this one running here (its
        batch, then the busy workers sharing its cores); `joining`: the request is not yet among
        the outstanding ones."""
        in_batch = min(self.load.outstanding + (1 if joining else 0), self.batch_slots)
        return max(in_batch, 1) + sum(1 for peer in self.peers if peer.load.busy)

    @property
    def next_free_ms(self) -> float:
        return next_free_us(self.live, self.load, self.streams_on_cores()) / 1e3

    def predict(
        self,
        prompt_tokens: int,
        first_token_budget_ms: float = 0.0,
        new_tokens: int = 0,
        token_budget_ms: float = 0.0,
    ) -> Prediction:
        now = time.monotonic()
        deadline = first_token_deadline(now, first_token_budget_ms)
        raw = predict(
            self.live,
            self.load,
            self.streams_on_cores(),
            prompt_tokens,
            deadline,
            new_tokens,
            now,
            batch_slots=self.batch_slots,
            token_budget_us=token_budget_ms * 1e3,
            worker_steps_us=self.worker_steps_us,
        )
        return self.errors.correct(raw)

    def begin(
        self,
        prompt_tokens: int,
        new_tokens: int,
        first_token_budget_ms: float = 0.0,
        token_budget_ms: float = 0.0,
    ) -> Ticket:
        """Reserve a place: call right after routing, before any await, so admission is not raced."""
        self.requests_total += 1
        deadline = first_token_deadline(time.monotonic(), first_token_budget_ms)
        return self.load.begin(prompt_tokens, new_tokens, deadline, token_budget_ms * 1e3)

    def end(self, ticket: Ticket) -> None:
        self.load.end(ticket)

    def record_token(self, ticket: Ticket, token: generate_pb2.Token) -> None:
        ticket.tokens += 1
        if ticket.tokens == 1:
            ticket.first_token_at = time.monotonic()
        if token.index == 0:
            self.live.record_first_token(token.latency_us)
        else:
            self.live.record_token(token.latency_us, self.streams_on_cores(joining=False))

    def mark_failed(self, reason: str, down: bool = True) -> None:
        """A request failed here through the worker's fault. When the worker is `down` (dead,
        unreachable, stopping), out of rotation until its next health check passes; a worker that
        answered with an error stays in (the request's own values may have caused it)."""
        self.requests_failed += 1
        self.last_error = reason
        if down:
            self.health = router_pb2.WORKER_HEALTH_UNREACHABLE

    def learn(
        self, summary: generate_pb2.Summary, prediction: Prediction | None, seen_ttft_us: float
    ) -> None:
        """Learn from a request this worker finished (its own summary, before the router completes
        it): how far the prediction was off, and the prefill cost of its prompt."""
        if prediction is not None and summary.generated_tokens:
            self.errors.record(prediction, seen_ttft_us, summary.tpot_mean_us)
        self.live.record_prefill(summary.prompt_tokens, summary.ttft_us)

    def to_proto(self) -> router_pb2.WorkerStatus:
        live = self.live.to_proto()
        now = self.predict(1)
        live.predicted_wait_us = now.wait_us if now.known else 0.0
        status = router_pb2.WorkerStatus(
            worker_id=self.worker_id,
            address=self.address,
            health=self.health,
            relayed_latency=self.live.window.to_proto(),
            in_flight=self.in_flight,
            requests_total=self.requests_total,
            requests_failed=self.requests_failed,
            last_error=self.last_error,
            queued=self.load.queued,
            queue_limit=self.queue_limit,
            live=live,
            registered=self.registered,
        )
        if self.info is not None:
            status.info.CopyFrom(self.info)
            if self.info.HasField("batch"):
                status.batch.CopyFrom(batch_occupancy(self.info.batch, time.monotonic() - self.described_at))
        else:
            status.info.worker_id, status.info.tier = self.worker_id, self.tier
        return status


def worker_channel_args(config: TierserveConfig) -> list[tuple[str, object]]:
    """Options of every router-to-worker channel: message limits, keepalive (so a cut link fails
    the worker's streams within seconds and they fail over). Each channel adds its worker's TLS name."""
    return [
        *CHANNEL_OPTIONS,
        *keepalive_options(config.router.keepalive_time_s, config.router.keepalive_timeout_s),
    ]


def link_peers(workers: list[WorkerHandle]) -> None:
    """Workers whose cores overlap slow each other down; no cores listed means every CPU."""
    for worker in workers:
        mine = set(worker.info.cores) if worker.info is not None else set()
        worker.peers = []
        for other in workers:
            if other is worker or other.info is None or worker.info is None:
                continue
            theirs = set(other.info.cores)
            if not mine or not theirs or mine & theirs:
                worker.peers.append(other)


class WorkerPool:
    """All configured workers, with a background task that keeps their health current."""

    def __init__(
        self,
        config: TierserveConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers: list[WorkerHandle] = []
        self.registrations = Registrations(
            config.router.registration_ttl_s, clock, config.router.max_registrations
        )
        # Registered handles replaced by a newer registration, closed once their requests finish.
        self._retired: list[WorkerHandle] = []
        self.prompt_tokens = PromptTokenEstimator(config.router.ewma_alpha)
        self._router_config = config.router
        self._credentials = worker_channel_credentials(config.security)
        self._security = config.security
        self._channel_options = worker_channel_args(config)
        # dns:/// workers: (config name, tier, target), expanded to one handle per address each round.
        self._dns_targets = [(w.name, w.tier, w.address) for w in config.workers if is_dns_target(w.address)]
        # Targets whose last lookup failed (told once per outage).
        self._lookups_failing: set[str] = set()
        # Tiers this pool serves: configured, or registered since it started. A pinned one with no
        # worker now is unavailable, not a tier the pool does not serve.
        self._tiers = {w.tier for w in config.workers}
        # Called with (worker id, tier) when a worker leaves the pool (DNS, expired registration),
        # e.g. to drop its metric series.
        self.departures: list[Callable[[str, str], None]] = []
        for worker in config.workers:
            # Workers with register_with join by Register instead.
            if not is_dns_target(worker.address) and not worker.register_with:
                self.workers.append(self._handle(worker.name, worker.tier, worker.dial_address()))
        self._interval_s = config.router.health_interval_s
        self._task: asyncio.Task[None] | None = None
        self.first_round_done = asyncio.Event()

    def _handle(self, worker_id: str, tier: str, address: str, name: str = "") -> WorkerHandle:
        # Mutual TLS when [security] configures it: workers accept only the router's client
        # certificate, and the router only the certificate of worker `name` (default: the id).
        options = [*self._channel_options, *worker_channel_options(self._security, name or worker_id)]
        channel = (
            grpc.aio.secure_channel(address, self._credentials, options=options)
            if self._credentials is not None
            else grpc.aio.insecure_channel(address, options=options)
        )
        return WorkerHandle(
            worker_id=worker_id,
            tier=tier,
            address=address,
            channel=channel,
            stub=worker_pb2_grpc.WorkerStub(channel),
            live=LiveStats(self._router_config.latency_window, self._router_config.ewma_alpha),
            queue_limit=self._router_config.max_queue_per_worker,
        )

    async def discover(self) -> None:
        """Follow every dns:/// target: a handle per address it resolves to now ("name@ip:port");
        handles of vanished addresses leave once their requests have finished."""
        for name, tier, target in self._dns_targets:
            mine = [w for w in self.workers if w.worker_id.startswith(f"{name}@")]
            try:
                current = set(await asyncio.wait_for(resolve(target), DNS_TIMEOUT_S))
            except (LookupFailed, TimeoutError) as error:
                # A failed lookup says nothing about the workers: keep them; health checks tell.
                if target not in self._lookups_failing:
                    self._lookups_failing.add(target)
                    log.warning(
                        "worker %s: DNS lookup failed (%s); keeping the %d worker(s) it last resolved to",
                        name,
                        str(error) or "timed out",
                        len(mine),
                    )
                continue
            if target in self._lookups_failing:
                self._lookups_failing.discard(target)
                log.info("worker %s: DNS answers again", name)
            mine = [w for w in self.workers if w.worker_id.startswith(f"{name}@")]
            known = {w.address for w in mine}
            for address in sorted(current - known):
                log.info("worker %s: found %s", name, address)
                self.workers.append(self._handle(f"{name}@{address}", tier, address, name))
            for gone in [w for w in mine if w.address not in current and w.load.outstanding == 0]:
                log.info("worker %s: %s no longer resolves; dropped", name, gone.address)
                self.workers.remove(gone)
                self._departed(gone)
                await gone.channel.close()
                link_peers(self.workers)

    def _departed(self, handle: WorkerHandle) -> None:
        """Tell `departures` a worker left, unless a handle of the same id and tier is still here
        (re-registered at another address: its figures go on)."""
        if not any(w.worker_id == handle.worker_id and w.tier == handle.tier for w in self.workers):
            for departure in self.departures:
                departure(handle.worker_id, handle.tier)

    def check_pinned_tier(self, tier: str) -> None:
        """A pinned tier this pool serves (configured, or registered since it started; with
        registrations open, any tier may join) but has no worker of now (they left: DNS, expired
        registrations) is unavailable, as when its workers are all down: NoWorkerAvailable."""
        if not tier or any(w.tier == tier for w in self.workers):
            return
        if tier in self._tiers or self.registrations.ttl_s:
            raise NoWorkerAvailable(f"no worker of tier {tier!r} is in the pool now; retry shortly")

    def register(self, worker_id: str, address: str, tier: str, registrant: Registrant) -> bool:
        """A Register call by `registrant` (its authenticated credential): add the worker on its
        first (health-polled from the next round, like the others), refresh its expiry on each later
        one. True when this call added it."""
        if not self.registrations.ttl_s:
            raise Unsatisfiable("this router takes no registrations; set [router] registration_ttl_s")
        if any(w.worker_id == worker_id and not w.registered for w in self.workers):
            raise InvalidRequest("worker_id", f"{worker_id!r} is a configured worker; register another name")
        if not self.registrations.heartbeat(worker_id, address, tier, registrant):
            return False
        # Re-registered at another address or tier (e.g. restarted): the old handle stops taking requests.
        for old in [w for w in self.workers if w.worker_id == worker_id]:
            self.workers.remove(old)
            self._retired.append(old)
            link_peers(self.workers)
        log.info("worker %s registered at %s (%s)", worker_id, address, tier)
        self._tiers.add(tier)
        handle = self._handle(worker_id, tier, address)
        handle.registered = True
        self.workers.append(handle)
        return True

    async def expire(self) -> None:
        """Drop registered workers whose heartbeats stopped, each once its requests have finished."""
        # Decide and remove before any await, so a heartbeat arriving meanwhile is never lost.
        closing = [w for w in self._retired if not w.load.outstanding]
        self._retired = [w for w in self._retired if w.load.outstanding]
        for worker_id in self.registrations.expired():
            handle = next((w for w in self.workers if w.worker_id == worker_id and w.registered), None)
            if handle is not None and handle.load.outstanding:
                continue
            self.registrations.forget(worker_id)
            if handle is not None:
                log.info("worker %s at %s: no heartbeat in time; dropped", worker_id, handle.address)
                self.workers.remove(handle)
                closing.append(handle)
                link_peers(self.workers)
        for handle in closing:
            self._departed(handle)
        for handle in closing:
            await handle.channel.close()

    def start(self, on_round: Callable[[WorkerPool], Awaitable[None]] | None = None) -> None:
        """Check the workers every [router] health_interval_s; `on_round` runs after each round."""
        self._task = asyncio.create_task(self._health_loop(on_round), name="worker-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for worker in [*self.workers, *self._retired]:
            await worker.channel.close()

    def by_id(self, worker_id: str) -> WorkerHandle:
        return next(w for w in self.workers if w.worker_id == worker_id)

    def any_healthy(self) -> bool:
        return any(w.healthy for w in self.workers)

    def snapshot(self) -> list[router_pb2.WorkerStatus]:
        return [w.to_proto() for w in self.workers]

    def _described(self, worker: WorkerHandle, info: worker_pb2.WorkerInfo) -> None:
        cores_changed = worker.info is None or list(worker.info.cores) != list(info.cores)
        worker.info = info
        worker.described_at = time.monotonic()
        worker.live.seed(info)
        self.prompt_tokens.report(info.chars_per_token)
        if cores_changed:
            link_peers(self.workers)

    async def _health_loop(self, on_round: Callable[[WorkerPool], Awaitable[None]] | None) -> None:
        while True:
            await self.discover()
            await self.expire()
            await asyncio.gather(*(self.check(worker) for worker in self.workers))
            self.first_round_done.set()
            if on_round is not None:
                await on_round(self)
            await asyncio.sleep(self._interval_s)

    async def check(self, worker: WorkerHandle) -> None:
        """Ask the worker's grpc.health.v1 service; describe it when it turns healthy, and now and then."""
        health_stub = health_pb2_grpc.HealthStub(worker.channel)
        was_healthy = worker.healthy
        try:
            reply = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            # Described before it is marked serving: a worker listed or routed to as serving
            # always has its tier's figures (cores, batch, accuracy) known.
            if serving and (not was_healthy or worker.info is None or worker._rounds % DESCRIBE_EVERY == 0):
                info = await worker.stub.Describe(worker_pb2.DescribeRequest(), timeout=HEALTH_TIMEOUT_S)
                self._described(worker, info)
            worker.health = (
                router_pb2.WORKER_HEALTH_SERVING if serving else router_pb2.WORKER_HEALTH_NOT_SERVING
            )
        except grpc.aio.AioRpcError as error:
            worker.health = router_pb2.WORKER_HEALTH_UNREACHABLE
            # Shown by ListWorkers: why a worker never came up (e.g. its certificate names another).
            worker.last_error = f"health check: {error.code().name}: {error.details()}"
            if was_healthy:
                log.warning(
                    "worker %s at %s unreachable: %s", worker.worker_id, worker.address, error.details()
                )
        if worker.healthy != was_healthy:
            log.info("worker %s is now %s", worker.worker_id, router_pb2.WorkerHealth.Name(worker.health))
        worker._rounds += 1
