"""Self-registration: a worker's Register call adds it to the router's pool, each heartbeat pushes
its expiry ahead, and a worker whose heartbeats stop is dropped once its requests finish. Time is
a fake clock the tests step; the router and workers are in-process servers on port 0."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.unit.fake_pool import FakeWorker
from tierserve.domain.config import ConfigError, SecurityConfig, TierserveConfig, WorkerConfig, parse_config
from tierserve.domain.errors import InvalidRequest, Unsatisfiable
from tierserve.ops.certs import PoolCertificates, make_pool_certificates
from tierserve.router.app import build_router
from tierserve.router.pool import WorkerPool
from tierserve.router.registration import OPEN_REGISTRANT, Registrations, registration_from_request
from tierserve.rpc.server import ServerHandle, start_server
from tierserve.rpc.tls import read_pem
from tierserve.worker.registration import heartbeat, registration_options, start_heartbeat, stop_heartbeat

TTL_S = 10.0
# The heartbeat mechanics below hold whoever registers; authentication has its own tests.
ANYONE = OPEN_REGISTRANT


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registering_config(**router: object) -> TierserveConfig:
    return parse_config(
        {
            "router": {"port": 0, "health_interval_s": 0.05, "registration_ttl_s": TTL_S, **router},
            "workers": [
                {"name": "fixed", "tier": "bf16", "address": "127.0.0.1:1"},
                # Joins by Register: the router must not dial it from the config.
                {"name": "remote", "tier": "fp32", "register_with": "router:50051", "host": "10.0.0.5"},
            ],
        }
    )


def test_registrations_are_added_refreshed_and_expire_on_the_clock() -> None:
    clock = FakeClock()
    registrations = Registrations(TTL_S, clock)
    assert registrations.heartbeat("w", "10.0.0.1:50061", "fp32", ANYONE)
    clock.now += 6
    assert not registrations.heartbeat("w", "10.0.0.1:50061", "fp32", ANYONE)  # a refresh, not a new worker
    clock.now += TTL_S - 0.1
    assert registrations.expired() == []
    clock.now += 0.1
    assert registrations.expired() == ["w"]
    assert registrations.heartbeat("w", "10.0.0.9:50061", "fp32", ANYONE)  # a new address is a new worker
    registrations.forget("w")
    assert registrations.get("w") is None


def test_pool_adds_once_refreshes_and_drops_after_expiry_once_requests_finish() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        pool = WorkerPool(registering_config(), clock=clock)
        assert [w.worker_id for w in pool.workers] == ["fixed"]
        assert pool.register("remote", "10.0.0.5:50061", "fp32", ANYONE)
        assert not pool.register("remote", "10.0.0.5:50061", "fp32", ANYONE)
        assert [w.worker_id for w in pool.workers] == ["fixed", "remote"]
        handle = pool.by_id("remote")
        assert (handle.address, handle.tier, handle.registered) == ("10.0.0.5:50061", "fp32", True)
        assert handle.health == router_pb2.WORKER_HEALTH_UNSPECIFIED  # routed only once health-polled
        assert [(s.worker_id, s.registered) for s in pool.snapshot()] == [("fixed", False), ("remote", True)]

        clock.now += TTL_S - 1
        assert not pool.register("remote", "10.0.0.5:50061", "fp32", ANYONE)  # heartbeat: expiry now + TTL
        clock.now += TTL_S - 1
        await pool.expire()
        assert pool.by_id("remote") is handle

        clock.now += 1
        ticket = handle.begin(prompt_tokens=4, new_tokens=4)
        await pool.expire()
        assert pool.by_id("remote") is handle, "dropped with a request still in flight"
        handle.end(ticket)
        await pool.expire()
        assert [w.worker_id for w in pool.workers] == ["fixed"]
        # After expiry the next heartbeat adds it again.
        assert pool.register("remote", "10.0.0.5:50061", "fp32", ANYONE)
        await pool.close()

    asyncio.run(scenario())


def test_reregistering_at_a_new_address_replaces_the_worker() -> None:
    async def scenario() -> None:
        pool = WorkerPool(registering_config(), clock=FakeClock())
        pool.register("remote", "10.0.0.5:50061", "fp32", ANYONE)
        old = pool.by_id("remote")
        assert pool.register("remote", "10.0.0.5:50099", "fp32", ANYONE)  # restarted on another port
        assert [(w.worker_id, w.address) for w in pool.workers if w.registered] == [
            ("remote", "10.0.0.5:50099")
        ]
        assert pool.by_id("remote") is not old
        await pool.close()

    asyncio.run(scenario())


def test_registrations_that_cannot_be_taken_are_refused_with_the_reason() -> None:
    async def scenario() -> None:
        pool = WorkerPool(registering_config(), clock=FakeClock())
        with pytest.raises(InvalidRequest, match="configured worker") as caught:
            pool.register("fixed", "10.0.0.5:50061", "bf16", ANYONE)
        assert caught.value.field == "worker_id"
        closed = WorkerPool(registering_config(registration_ttl_s=0), clock=FakeClock())
        with pytest.raises(Unsatisfiable, match="registration_ttl_s"):
            closed.register("remote", "10.0.0.5:50061", "fp32", ANYONE)
        await pool.close()
        await closed.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"worker_id": "", "address": "h:1", "tier": "fp32"}, "worker_id"),
        ({"worker_id": "a b", "address": "h:1", "tier": "fp32"}, "worker_id"),
        ({"worker_id": "w", "address": "h", "tier": "fp32"}, "address"),
        ({"worker_id": "w", "address": "h:0", "tier": "fp32"}, "address"),
        ({"worker_id": "w", "address": "h:1", "tier": "fp64"}, "tier"),
    ],
)
def test_bad_register_requests_name_the_field(fields: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        registration_from_request(router_pb2.RegisterRequest(**fields))
    assert caught.value.field == field
    assert registration_from_request(
        router_pb2.RegisterRequest(worker_id="w@1", address="[::1]:5", tier="int4-woq")
    ) == ("w@1", "[::1]:5", "int4-woq")


def test_worker_config_must_say_where_the_router_dials_it() -> None:
    with pytest.raises(ConfigError, match="advertise_address"):
        parse_config({"workers": [{"name": "w", "tier": "fp32", "host": "0.0.0.0", "register_with": "r:1"}]})
    ok = parse_config(
        {
            "workers": [
                {
                    "name": "w",
                    "tier": "fp32",
                    "host": "0.0.0.0",
                    "register_with": "r:1",
                    "advertise_address": "w:2",
                }
            ]
        }
    )
    assert ok.workers[0].advertise_address == "w:2"
    # A router that takes registrations may start with no workers at all; one that does not may not.
    assert parse_config({"router": {"registration_ttl_s": 5}}).workers == []
    with pytest.raises(ConfigError, match="registration_ttl_s"):
        parse_config({})


@dataclass
class Router:
    pool: WorkerPool
    stub: router_pb2_grpc.RouterStub
    address: str


@asynccontextmanager
async def router_with_clock(
    clock: Callable[[], float], security: dict[str, object] | None = None, port: int = 0
) -> AsyncIterator[Router]:
    """A real router (no configured workers) whose registrations expire on `clock`, with the
    router process's own TLS and authentication when `security` (a [security] table) asks."""
    config = parse_config(
        {
            "router": {"port": port, "health_interval_s": 0.05, "registration_ttl_s": TTL_S},
            # Without a [security] table: open registration, as these tests are about the heartbeat.
            "security": security if security is not None else {"allow_open_registration": True},
        }
    )
    router = build_router(config, clock=clock)
    handle = await router.start()
    address = f"127.0.0.1:{handle.port}"
    channel = (
        grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(read_pem(config.security.ca, "ca")))
        if config.security.router_tls
        else grpc.aio.insecure_channel(address)
    )
    try:
        yield Router(router.pool, router_pb2_grpc.RouterStub(channel), address)
    finally:
        await channel.close()
        await handle.server.stop(0)
        await router.pool.close()


async def serve_fake(fake: FakeWorker) -> ServerHandle:
    def register(server: grpc.aio.Server) -> list[str]:
        worker_pb2_grpc.add_WorkerServicer_to_server(fake, server)
        return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

    handle = await start_server("127.0.0.1", 0, register)
    await handle.set_serving(True)
    return handle


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def listed(router: Router) -> dict[str, router_pb2.WorkerStatus]:
    reply = await router.stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
    return {w.worker_id: w for w in reply.workers}


def test_a_registered_worker_is_health_polled_serves_and_leaves_when_it_expires() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        fake = FakeWorker("reg-0", "fp32")
        worker = await serve_fake(fake)
        async with router_with_clock(clock) as router:
            request = router_pb2.RegisterRequest(
                worker_id="reg-0", address=f"127.0.0.1:{worker.port}", tier="fp32"
            )
            reply = await router.stub.Register(request, timeout=5)
            assert reply.added and reply.ttl_s == TTL_S
            assert not (await router.stub.Register(request, timeout=5)).added

            statuses: dict[str, router_pb2.WorkerStatus] = {}

            async def poll() -> None:
                statuses.clear()
                statuses.update(await listed(router))

            deadline = time.monotonic() + 10
            while statuses.get("reg-0", router_pb2.WorkerStatus()).health != router_pb2.WORKER_HEALTH_SERVING:
                assert time.monotonic() < deadline, f"never healthy: {statuses}"
                await poll()
                await asyncio.sleep(0.02)
            assert statuses["reg-0"].registered and statuses["reg-0"].info.tier == "fp32"
            stream = router.stub.Generate(
                generate_pb2.GenerateRequest(prompt="hi", max_new_tokens=3), timeout=10
            )
            summary = [r async for r in stream][-1].summary
            assert (summary.worker_id, summary.generated_tokens) == ("reg-0", 3)

            clock.now += TTL_S  # no heartbeat for the whole expiry: the next health round drops it
            await until(lambda: not router.pool.workers, "the expired worker is dropped")
            assert await listed(router) == {}
            bad = router_pb2.RegisterRequest(worker_id="reg-0", address="nowhere", tier="fp32")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await router.stub.Register(bad, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith("address:")
        await worker.server.stop(0)

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


@dataclass
class SlowToDescribe(FakeWorker):
    """Answers health at once but Describe only once `described` is set."""

    asked: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    described: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        self.asked.set()
        await self.described.wait()
        return await super().Describe(request, context)


def test_a_worker_is_listed_serving_only_once_it_has_been_described() -> None:
    # A client that saw SERVING read no cores, batch or accuracy: the worker was marked serving
    # while its Describe was still on the way (CI, stop 24).
    async def scenario() -> None:
        fake = SlowToDescribe("reg-0", "fp32", cores=[3])
        worker = await serve_fake(fake)
        async with router_with_clock(FakeClock()) as router:
            request = router_pb2.RegisterRequest(
                worker_id="reg-0", address=f"127.0.0.1:{worker.port}", tier="fp32"
            )
            await router.stub.Register(request, timeout=5)
            await asyncio.wait_for(fake.asked.wait(), timeout=10)
            waiting = (await listed(router))["reg-0"]
            assert waiting.health != router_pb2.WORKER_HEALTH_SERVING and list(waiting.info.cores) == []
            fake.described.set()
            deadline = time.monotonic() + 10
            while (status := (await listed(router))["reg-0"]).health != router_pb2.WORKER_HEALTH_SERVING:
                assert time.monotonic() < deadline, f"never serving: {status}"
                await asyncio.sleep(0.02)
            assert list(status.info.cores) == [3]
        await worker.server.stop(0)

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_the_worker_heartbeat_registers_and_keeps_refreshing_until_stopped() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        async with router_with_clock(clock) as router:
            config = WorkerConfig(
                name="hb-0",
                tier="bf16",
                host="127.0.0.1",
                register_with=router.address,
                heartbeat_interval_s=0.05,
            )
            task = start_heartbeat(config, bound_port=50999)
            assert task is not None
            registrations = router.pool.registrations
            await until(lambda: registrations.get("hb-0") is not None, "the first registration")
            assert router.pool.by_id("hb-0").address == "127.0.0.1:50999"
            clock.now += 5  # a later heartbeat pushes the expiry to the new now + TTL
            await until(
                lambda: (r := registrations.get("hb-0")) is not None and r.expires_at == clock.now + TTL_S,
                "a heartbeat refreshes the expiry",
            )
            await stop_heartbeat(task)
            assert task.done()
            clock.now += TTL_S
            await until(lambda: not router.pool.workers, "the silent worker expires")
        assert start_heartbeat(WorkerConfig(name="static", tier="fp32"), bound_port=1) is None

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_a_worker_whose_router_was_down_a_while_registers_within_an_interval_of_its_return() -> None:
    async def scenario() -> None:
        with socket.socket() as probe:  # a free port, where the router will come up later
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = WorkerConfig(
            name="late-0", tier="fp32", register_with=f"127.0.0.1:{port}", heartbeat_interval_s=0.2
        )
        task = start_heartbeat(config, bound_port=50999)
        # Long enough for gRPC's own reconnect backoff to have grown to seconds (1, 1.6, 2.6, 4.1 s...).
        await asyncio.sleep(6.0)
        async with router_with_clock(FakeClock(), port=port) as router:
            back = time.monotonic()
            await until(lambda: router.pool.registrations.get("late-0") is not None, "registered", 10.0)
            assert time.monotonic() - back < 1.5
        await stop_heartbeat(task)

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_a_heartbeat_that_recovers_says_so_even_when_the_router_already_had_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The call that re-registers a worker after an outage can time out on the worker's side after the
    # router took it; the next heartbeat then finds it registered (added = False). The log must
    # still say the worker is registered again, not stay at the outage's warning.
    async def scenario() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        address = f"127.0.0.1:{port}"
        config = WorkerConfig(name="back-0", tier="fp32", register_with=address, heartbeat_interval_s=0.05)
        task = start_heartbeat(config, bound_port=50999)
        await until(lambda: f"registration with router {address} failed" in caplog.text, "the outage")
        async with router_with_clock(FakeClock(), port=port) as router:
            assert router.pool.register("back-0", "127.0.0.1:50999", "fp32", ANYONE)  # the lost reply's call
            await until(
                lambda: f"registered with router {address} as back-0" in caplog.text, "the recovery", 10.0
            )
        await stop_heartbeat(task)

    with caplog.at_level(logging.INFO, logger="tierserve.worker.registration"):
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert caplog.text.count("failed (") == 1  # one warning for the outage


REGISTRATION = router_pb2.RegisterRequest(worker_id="w-0", address="127.0.0.1:50999", tier="fp32")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PoolCertificates:
    return make_pool_certificates(tmp_path_factory.mktemp("certs"), ["sec-0"])


def write_tokens(tmp_path: Path) -> dict[str, object]:
    """A tokens file for clients and a registration token file for workers, as [security] fields."""
    (tmp_path / "tokens.txt").write_text("client-secret alice\n")
    (tmp_path / "registration.txt").write_text("# the workers' token\nworker-secret workers w-*,sec-*\n")
    return {
        "tokens_file": str(tmp_path / "tokens.txt"),
        "registration_token_file": str(tmp_path / "registration.txt"),
    }


async def register_code(router: Router, token: str) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        await router.stub.Register(REGISTRATION, timeout=5, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_with_tokens_on_only_a_registration_token_may_register(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with router_with_clock(FakeClock(), write_tokens(tmp_path)) as router:
            assert await register_code(router, "") == grpc.StatusCode.UNAUTHENTICATED
            # A client's token is good for Generate, not for adding a worker that would get prompts.
            assert await register_code(router, "client-secret") == grpc.StatusCode.PERMISSION_DENIED
            assert await register_code(router, "guess") == grpc.StatusCode.PERMISSION_DENIED
            assert router.pool.registrations.get("w-0") is None and not router.pool.workers
            assert await register_code(router, "worker-secret") == grpc.StatusCode.OK
            assert router.pool.by_id("w-0").registered
            # ...and the registration token is no client token.
            workers_call = router.stub.ListWorkers(
                router_pb2.ListWorkersRequest(),
                timeout=5,
                metadata=(("authorization", "Bearer worker-secret"),),
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await workers_call
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            client = (("authorization", "Bearer client-secret"),)
            reply = await router.stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5, metadata=client)
            assert [w.worker_id for w in reply.workers] == ["w-0"]

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_client_tokens_without_a_registration_token_file_close_register(tmp_path: Path) -> None:
    (tmp_path / "tokens.txt").write_text("client-secret alice\n")

    async def scenario() -> None:
        async with router_with_clock(FakeClock(), {"tokens_file": str(tmp_path / "tokens.txt")}) as router:
            assert await register_code(router, "") == grpc.StatusCode.UNAUTHENTICATED
            assert await register_code(router, "client-secret") == grpc.StatusCode.PERMISSION_DENIED
            assert not router.pool.workers

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_a_registration_token_file_alone_guards_register_and_leaves_the_rest_open(tmp_path: Path) -> None:
    security = {"registration_token_file": write_tokens(tmp_path)["registration_token_file"]}

    async def scenario() -> None:
        async with router_with_clock(FakeClock(), security) as router:
            assert await register_code(router, "") == grpc.StatusCode.UNAUTHENTICATED
            assert await register_code(router, "client-secret") == grpc.StatusCode.PERMISSION_DENIED
            assert await register_code(router, "worker-secret") == grpc.StatusCode.OK
            assert [
                w.worker_id for w in (await router.stub.ListWorkers(router_pb2.ListWorkersRequest())).workers
            ] == ["w-0"]

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def secured_pool(certs: PoolCertificates, tmp_path: Path, client_ca: bool) -> dict[str, object]:
    """TLS to the router (optionally requiring client certificates), tokens for clients and workers."""
    security: dict[str, object] = {
        "ca": str(certs.ca),
        "router_cert": str(certs.router.cert),
        "router_key": str(certs.router.key),
        **write_tokens(tmp_path),
    }
    if client_ca:
        security |= {
            "client_ca": str(certs.client_ca),
            # Each worker's own client certificate, named for it.
            "registration_cert": str(certs.ca.parent / "worker-{name}-client.pem"),
            "registration_key": str(certs.ca.parent / "worker-{name}-client.key"),
        }
    return security


@pytest.mark.parametrize("client_ca", [False, True], ids=["tls", "mutual-tls"])
def test_the_heartbeat_registers_over_tls_with_the_registration_token(
    certs: PoolCertificates, tmp_path: Path, client_ca: bool
) -> None:
    security = secured_pool(certs, tmp_path, client_ca)

    async def scenario() -> None:
        async with router_with_clock(FakeClock(), security) as router:
            config = WorkerConfig(
                name="sec-0", tier="fp32", register_with=router.address, heartbeat_interval_s=0.05
            )
            task = start_heartbeat(config, 50999, SecurityConfig.model_validate(security))
            try:
                await until(lambda: router.pool.registrations.get("sec-0") is not None, "registered over TLS")
            finally:
                await stop_heartbeat(task)
            assert router.pool.by_id("sec-0").address == "127.0.0.1:50999"

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


@pytest.mark.parametrize(
    ("missing", "code"),
    [
        (["registration_token_file"], "UNAUTHENTICATED"),
        # No client certificate: the router's TLS handshake refuses the worker.
        (["registration_cert", "registration_key"], "UNAVAILABLE"),
        # The router not verified: the system's roots do not know the pool CA.
        (["ca"], "UNAVAILABLE"),
    ],
)
def test_a_heartbeat_missing_any_part_of_the_security_never_registers(
    certs: PoolCertificates,
    tmp_path: Path,
    missing: list[str],
    code: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    router_side = secured_pool(certs, tmp_path, client_ca=True)
    worker_side = SecurityConfig.model_validate({k: v for k, v in router_side.items() if k not in missing})
    request = router_pb2.RegisterRequest(worker_id="sec-0", address="127.0.0.1:50999", tier="fp32")

    async def scenario() -> None:
        async with router_with_clock(FakeClock(), router_side) as router:
            if "registration_cert" in missing:
                # The worker's config check stops it at start-up...
                with pytest.raises(
                    ConfigError, match="set \\[security\\] registration_cert and registration_key"
                ):
                    registration_options(worker_side, "sec-0", router.address)
                # ...and forced through anyway, the router refuses it.
                secured = registration_options(
                    SecurityConfig.model_validate(router_side), "sec-0", router.address
                )
                options = dataclasses.replace(secured, certificate_chain=None, private_key=None)
            else:
                options = registration_options(worker_side, "sec-0", router.address)
            task = asyncio.create_task(heartbeat(options, request, 0.05))
            await until(lambda: "registration with router" in caplog.text, "the heartbeat fails")
            await asyncio.sleep(0.3)  # a few more heartbeat intervals
            await stop_heartbeat(task)
            assert router.pool.registrations.get("sec-0") is None and not router.pool.workers
            assert f"failed ({code}:" in caplog.text

    with caplog.at_level(logging.WARNING, logger="tierserve.worker.registration"):
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_registration_options_follow_the_security_config(certs: PoolCertificates, tmp_path: Path) -> None:
    plain = registration_options(SecurityConfig(), "w", "router:50051")
    assert not plain.secure and plain.metadata() == ()
    tokens = write_tokens(tmp_path)
    tokened = registration_options(SecurityConfig.model_validate(tokens), "w", "router:50051")
    # The first token of the file, comments skipped; sent even without TLS (as any client's would be).
    assert not tokened.secure and tokened.metadata() == (("authorization", "Bearer worker-secret"),)
    tls = registration_options(
        SecurityConfig.model_validate(secured_pool(certs, tmp_path, False)), "w", "r:1"
    )
    assert tls.secure and tls.root_certificates == certs.ca.read_bytes() and tls.certificate_chain is None
    per_worker = {
        **secured_pool(certs, tmp_path, True),
        "registration_cert": str(tmp_path / "{name}.pem"),
        "registration_key": str(tmp_path / "{name}.key"),
    }
    with pytest.raises(ConfigError, match=r"registration_cert: cannot read .*/sec-0\.pem"):
        registration_options(SecurityConfig.model_validate(per_worker), "sec-0", "r:1")
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="no token"):
        registration_options(SecurityConfig(registration_token_file=str(tmp_path / "empty.txt")), "w", "r:1")
    with pytest.raises(ValueError, match="registration_cert and registration_key"):
        SecurityConfig(registration_cert="c.pem")
