"""Worker identity on self-registration: Register is refused unless authenticated (a registration
token, a worker's client certificate) or explicitly open (with a warning at start); each credential
may claim only the ids it is bound to and cannot take over an id another credential holds; ids and
addresses are short and plain; the registration table is capped. Real in-process routers on port 0,
a fake clock for expiry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tierserve_client.v1 import router_pb2, router_pb2_grpc

from tierserve.domain.config import ConfigError, parse_config
from tierserve.domain.errors import InvalidRequest, Overloaded, PermissionDenied
from tierserve.ops.certs import Issued, PoolCertificates, make_pool_certificates
from tierserve.router.app import build_router
from tierserve.router.pool import WorkerPool
from tierserve.router.registration import (
    MAX_ADDRESS_CHARS,
    MAX_WORKER_ID_CHARS,
    OPEN_REGISTRANT,
    IdClaims,
    Registrant,
    Registrations,
    load_registration_tokens,
    registration_from_request,
)

TTL_S = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(
    worker_id: str = "w-0", address: str = "10.0.0.5:50061", tier: str = "fp32"
) -> router_pb2.RegisterRequest:
    return router_pb2.RegisterRequest(worker_id=worker_id, address=address, tier=tier)


# --- ids and addresses: short and plain -------------------------------------------------------------


@pytest.mark.parametrize(
    ("worker_id", "address", "field"),
    [
        ("w" * (MAX_WORKER_ID_CHARS + 1), "h:1", "worker_id"),
        ("w\n", "h:1", "worker_id"),  # `$` would let a trailing newline through; fullmatch does not
        ("w\nINFO forged log line", "h:1", "worker_id"),
        ("w\x00", "h:1", "worker_id"),
        ("w\x1b[31m", "h:1", "worker_id"),
        ("wörker", "h:1", "worker_id"),
        ("w", "h" * MAX_ADDRESS_CHARS + ":1", "address"),
        ("w", "h\n:1", "address"),
        ("w", "h:1\n", "address"),
        ("w", "h\t:1", "address"),
        ("w", "h:\u0661\u0662", "address"),  # digits, but not ASCII ones
        ("w", "[fe80::1%\n]:5", "address"),  # a zone index takes any character
        ("w", "[not-ipv6]:5", "address"),
        ("w", "::1:5", "address"),  # IPv6 without brackets: the port is ambiguous
        ("w", ":5", "address"),
    ],
)
def test_ids_and_addresses_over_the_limits_or_not_plain_are_refused_naming_the_field(
    worker_id: str, address: str, field: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        registration_from_request(request(worker_id, address))
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200  # the caller's text cut and escaped


def test_ids_and_addresses_at_the_limits_are_taken() -> None:
    longest_id = "w" * MAX_WORKER_ID_CHARS
    host = "h" * (MAX_ADDRESS_CHARS - len(":65535"))
    assert registration_from_request(request(longest_id, f"{host}:65535")) == (
        longest_id,
        f"{host}:65535",
        "fp32",
    )
    for address in ("[::1]:5", "10.0.0.5:50061", "worker_fp32.internal:7"):
        assert registration_from_request(request(address=address))[1] == address


@settings(max_examples=300, deadline=None)
@given(worker_id=st.text(max_size=200), address=st.text(max_size=300), tier=st.sampled_from(["fp32", "x"]))
def test_any_register_request_is_taken_plain_or_refused_naming_a_field(
    worker_id: str, address: str, tier: str
) -> None:
    try:
        taken = registration_from_request(request(worker_id, address, tier))
    except InvalidRequest as error:
        assert error.field in ("worker_id", "address", "tier")
        return
    taken_id, taken_address, _ = taken
    assert len(taken_id) <= MAX_WORKER_ID_CHARS and len(taken_address) <= MAX_ADDRESS_CHARS
    assert all(c.isascii() and c.isprintable() and not c.isspace() for c in taken_id + taken_address)


# --- the table: capped, bound, never taken over -------------------------------------------------------


def token(name: str, *patterns: str) -> Registrant:
    return Registrant(f"registration token {name}", (IdClaims.parse(patterns),))


def test_the_table_is_capped_but_known_ids_keep_refreshing() -> None:
    clock = FakeClock()
    table = Registrations(TTL_S, clock, capacity=2)
    assert table.heartbeat("a", "h:1", "fp32", OPEN_REGISTRANT)
    assert table.heartbeat("b", "h:2", "fp32", OPEN_REGISTRANT)
    with pytest.raises(Overloaded, match="max_registrations"):
        table.heartbeat("c", "h:3", "fp32", OPEN_REGISTRANT)
    assert table.get("c") is None
    assert not table.heartbeat("a", "h:1", "fp32", OPEN_REGISTRANT)  # a heartbeat is not a new entry
    table.forget("b")
    assert table.heartbeat("c", "h:3", "fp32", OPEN_REGISTRANT)


def test_a_credential_claims_only_its_ids_or_prefix() -> None:
    table = Registrations(TTL_S, FakeClock())
    host_a, host_b = token("host-a", "fp32-*"), token("host-b", "bf16-0", "bf16-1")
    assert table.heartbeat("fp32-0", "h:1", "fp32", host_a)
    assert table.heartbeat("fp32-17", "h:2", "fp32", host_a)
    assert table.heartbeat("bf16-1", "h:3", "bf16", host_b)
    for registrant, worker_id in [
        (host_a, "bf16-0"),
        (host_a, "xfp32-0"),
        (host_b, "bf16-2"),
        (host_b, "bf16"),
    ]:
        with pytest.raises(PermissionDenied, match="may register"):
            table.heartbeat(worker_id, "h:9", "fp32", registrant)
        assert table.get(worker_id) is None
    # Every credential presented must allow the id (a token and a certificate together).
    both = Registrant("both", (IdClaims.parse(["fp32-*"]), IdClaims.parse(["fp32-9"])))
    assert table.heartbeat("fp32-9", "h:1", "fp32", both)
    with pytest.raises(PermissionDenied, match="may register fp32-9"):
        table.heartbeat("fp32-8", "h:1", "fp32", both)


def test_an_id_another_credential_holds_is_not_taken_over_until_it_expires() -> None:
    clock = FakeClock()
    table = Registrations(TTL_S, clock)
    owner, other = token("owner", "*"), token("other", "*")
    assert table.heartbeat("w-0", "10.0.0.5:1", "fp32", owner)
    with pytest.raises(PermissionDenied, match="another credential"):
        table.heartbeat("w-0", "10.6.6.6:1", "fp32", other)
    registration = table.get("w-0")
    assert registration is not None and registration.address == "10.0.0.5:1"
    # The holder itself may move (a restart on another port)...
    assert table.heartbeat("w-0", "10.0.0.5:2", "fp32", owner)
    # ...and once its registration has expired the id is free again.
    clock.now += TTL_S
    assert table.heartbeat("w-0", "10.6.6.6:1", "fp32", other)


def test_the_pool_keeps_the_holders_worker_when_another_credential_tries_to_take_its_id() -> None:
    async def scenario() -> None:
        pool = WorkerPool(parse_config({"router": {"registration_ttl_s": TTL_S}}), clock=FakeClock())
        owner, other = token("owner", "w-*"), token("other", "*")
        assert pool.register("w-0", "10.0.0.5:50061", "fp32", owner)
        with pytest.raises(PermissionDenied):
            pool.register("w-0", "10.6.6.6:50061", "fp32", other)
        assert [(w.worker_id, w.address) for w in pool.workers] == [("w-0", "10.0.0.5:50061")]
        await pool.close()

    asyncio.run(scenario())


# --- registration token files ------------------------------------------------------------------------


def test_registration_token_files_bind_every_token_to_ids(tmp_path: Path) -> None:
    path = tmp_path / "registration.txt"
    path.write_text("# token name ids\nsecret-a host-a fp32-*,bf16-0  # host a\nsecret-b host-b *\n")
    tokens = load_registration_tokens(path)
    assert sorted((t.name, str(t.claims)) for t in tokens.values()) == [
        ("host-a", "bf16-0,fp32-*"),
        ("host-b", "*"),
    ]
    for line, problem in [
        ("secret-a host-a", "expected `TOKEN NAME IDS`"),  # unbound: refused, not "any id"
        ("secret-a", "expected `TOKEN NAME IDS`"),
        ("secret-a host-a fp*32", "not a worker id"),
        ("secret-a host-a fp32,,bf16", "not a worker id"),
        ("secret-a host-a fp32 extra", "expected `TOKEN NAME IDS`"),
    ]:
        path.write_text(line + "\n")
        with pytest.raises(ConfigError, match=problem):
            load_registration_tokens(path)
    path.write_text("# none\n")
    with pytest.raises(ConfigError, match="no tokens"):
        load_registration_tokens(path)


# --- over gRPC: who may register ---------------------------------------------------------------------


@dataclass
class Running:
    pool: WorkerPool
    address: str
    ca: bytes | None


@asynccontextmanager
async def running_router(security: dict[str, object], **router: object) -> AsyncIterator[Running]:
    config = parse_config(
        {
            "router": {"port": 0, "health_interval_s": 60, "registration_ttl_s": TTL_S, **router},
            "security": security,
        }
    )
    app = build_router(config, clock=FakeClock())
    handle = await app.start()
    ca = Path(config.security.ca).read_bytes() if config.security.router_tls else None
    try:
        yield Running(app.pool, f"127.0.0.1:{handle.port}", ca)
    finally:
        await handle.server.stop(0)
        await app.pool.close()


async def register(
    router: Running,
    worker_id: str = "w-0",
    token: str = "",
    certificate: tuple[Path, Path] | None = None,
    address: str = "10.0.0.5:50061",
) -> tuple[grpc.StatusCode, str]:
    """Register over a fresh channel: TLS (with `certificate`, a (cert, key) pair) when the router
    serves it, the bearer `token` if any; the status code and message."""
    if router.ca is not None:
        pair = (certificate[1].read_bytes(), certificate[0].read_bytes()) if certificate else (None, None)
        channel = grpc.aio.secure_channel(router.address, grpc.ssl_channel_credentials(router.ca, *pair))
    else:
        channel = grpc.aio.insecure_channel(router.address)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with channel:
        try:
            await router_pb2_grpc.RouterStub(channel).Register(
                request(worker_id, address), timeout=5, metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def run(scenario: Coroutine[object, object, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, timeout=30))


def test_without_any_credential_configured_register_is_refused_and_the_router_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with running_router({}) as router:
            code, message = await register(router)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "registration_token_file" in message and "does not allow open registration" in message
            assert not router.pool.workers and router.pool.registrations.get("w-0") is None

    with caplog.at_level(logging.WARNING, logger="tierserve.router.registration"):
        run(scenario())
    assert "every Register is refused" in caplog.text


def test_open_registration_must_be_asked_for_and_the_router_warns_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with running_router({"allow_open_registration": True}) as router:
            assert "registration is open" in caplog.text  # at start, before any call
            assert await register(router, "anything-0") == (grpc.StatusCode.OK, "")
            # Open does not mean unchecked: the id rules still hold.
            code, message = await register(router, "bad id")
            assert (code, message.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "worker_id")
            code, message = await register(router, "w-1", address="h\n:1")
            assert (code, message.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "address")

    with caplog.at_level(logging.WARNING, logger="tierserve.router.registration"):
        run(scenario())
    assert caplog.text.count("registration is open") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tierserve.router.registration"):
        build_router(parse_config({"router": {"registration_ttl_s": TTL_S}, "security": {}}))
    assert "registration is open" not in caplog.text


def test_tokens_are_bound_to_their_ids_and_cannot_take_over_each_others(tmp_path: Path) -> None:
    (tmp_path / "registration.txt").write_text("tok-a host-a fp32-*\ntok-b host-b fp32-*,bf16-0\n")
    (tmp_path / "tokens.txt").write_text("client-secret alice\n")
    security: dict[str, object] = {
        "registration_token_file": str(tmp_path / "registration.txt"),
        "tokens_file": str(tmp_path / "tokens.txt"),
    }

    async def scenario() -> None:
        async with running_router(security) as router:
            assert (await register(router, "fp32-0"))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert (await register(router, "fp32-0", "client-secret"))[0] == grpc.StatusCode.PERMISSION_DENIED
            assert await register(router, "fp32-0", "tok-a") == (grpc.StatusCode.OK, "")
            code, message = await register(router, "bf16-0", "tok-a")
            assert code == grpc.StatusCode.PERMISSION_DENIED and "may register fp32-*" in message
            # host-b may claim fp32-* too, but not while host-a holds fp32-0.
            code, message = await register(router, "fp32-0", "tok-b", address="10.6.6.6:1")
            assert code == grpc.StatusCode.PERMISSION_DENIED and "another credential" in message
            assert router.pool.by_id("fp32-0").address == "10.0.0.5:50061"
            assert await register(router, "bf16-0", "tok-b") == (grpc.StatusCode.OK, "")
            assert await register(router, "fp32-0", "tok-a", address="10.0.0.5:50099") == (
                grpc.StatusCode.OK,
                "",
            )
            assert router.pool.by_id("fp32-0").address == "10.0.0.5:50099"  # its holder moved it

    run(scenario())


def test_past_the_cap_a_new_id_is_resource_exhausted() -> None:
    async def scenario() -> None:
        async with running_router({"allow_open_registration": True}, max_registrations=2) as router:
            assert (await register(router, "w-0"))[0] == grpc.StatusCode.OK
            assert (await register(router, "w-1"))[0] == grpc.StatusCode.OK
            code, message = await register(router, "w-2")
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_registrations" in message
            assert (await register(router, "w-1"))[0] == grpc.StatusCode.OK  # heartbeats go on
            assert sorted(w.worker_id for w in router.pool.workers) == ["w-0", "w-1"]

    run(scenario())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PoolCertificates:
    return make_pool_certificates(tmp_path_factory.mktemp("certs"), ["sec-0", "sec-1"])


def tls_with_client_certificates(certs: PoolCertificates) -> dict[str, object]:
    return {
        "ca": str(certs.ca),
        "router_cert": str(certs.router.cert),
        "router_key": str(certs.router.key),
        "client_ca": str(certs.client_ca),
    }


def pair(issued: Issued) -> tuple[Path, Path]:
    return issued.cert, issued.key


def test_a_worker_certificate_registers_only_its_own_name_and_a_client_certificate_nothing(
    certs: PoolCertificates,
) -> None:
    async def scenario() -> None:
        async with running_router(tls_with_client_certificates(certs)) as router:
            sec0 = pair(certs.worker_clients["sec-0"])
            assert await register(router, "sec-0", certificate=sec0) == (grpc.StatusCode.OK, "")
            code, message = await register(router, "sec-1", certificate=sec0)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "may register sec-0" in message
            # sec-1's certificate may claim sec-1, but not the id sec-0's certificate holds.
            sec1 = pair(certs.worker_clients["sec-1"])
            assert (await register(router, "sec-0", certificate=sec1))[0] == grpc.StatusCode.PERMISSION_DENIED
            assert (await register(router, "sec-1", certificate=sec1))[0] == grpc.StatusCode.OK
            # An API client's certificate passes the handshake (the router serves clients), names no worker.
            code, message = await register(router, "sec-0", certificate=pair(certs.client))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "client.tierserve" in message and "only a worker's certificate" in message
            assert sorted((w.worker_id, w.address) for w in router.pool.workers) == [
                ("sec-0", "10.0.0.5:50061"),
                ("sec-1", "10.0.0.5:50061"),
            ]

    run(scenario())


def test_with_tokens_and_certificates_both_must_allow_the_id(certs: PoolCertificates, tmp_path: Path) -> None:
    (tmp_path / "registration.txt").write_text("tok host sec-*\n")
    security = {
        **tls_with_client_certificates(certs),
        "registration_token_file": str(tmp_path / "registration.txt"),
    }

    async def scenario() -> None:
        async with running_router(security) as router:
            sec0 = pair(certs.worker_clients["sec-0"])
            assert (await register(router, "sec-0", certificate=sec0))[0] == grpc.StatusCode.UNAUTHENTICATED
            code = (await register(router, "sec-1", "tok", certificate=sec0))[0]
            assert code == grpc.StatusCode.PERMISSION_DENIED  # the token allows it, the certificate not
            assert (await register(router, "sec-0", "tok", certificate=sec0))[0] == grpc.StatusCode.OK

    run(scenario())
