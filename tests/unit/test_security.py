"""TLS to the router, mutual TLS to the workers, bearer tokens and per-client limits, on a router in
front of in-process fake workers, with certificates from `tierserve certs`."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tierserve_client.v1 import generate_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.unit.fake_pool import FakeWorker, running_pool
from tierserve.cli import main
from tierserve.domain.config import ConfigError, SecurityConfig
from tierserve.ops.certs import PoolCertificates, make_pool_certificates
from tierserve.router.auth import load_tokens

REQUEST = generate_pb2.GenerateRequest(prompt="hello there", max_new_tokens=3)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PoolCertificates:
    return make_pool_certificates(tmp_path_factory.mktemp("certs"), ["fp32-0", "bf16-0"])


def mutual_tls(certs: PoolCertificates) -> dict[str, object]:
    out = certs.ca.parent
    return {
        "ca": str(certs.ca),
        "router_cert": str(certs.router.cert),
        "router_key": str(certs.router.key),
        "worker_cert": str(out / "worker-{name}.pem"),
        "worker_key": str(out / "worker-{name}.key"),
        "router_client_cert": str(certs.router_client.cert),
        "router_client_key": str(certs.router_client.key),
    }


async def call(channel: grpc.aio.Channel, token: str = "") -> list[generate_pb2.GenerateResponse]:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    stub = router_pb2_grpc.RouterStub(channel)
    return [r async for r in stub.Generate(REQUEST, timeout=10, metadata=metadata)]


async def refused(channel: grpc.aio.Channel, token: str = "") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel, token)
    return caught.value


def test_certs_command_writes_a_ca_and_private_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", "--out", str(tmp_path), "--host", "router.internal"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"ca.pem", "ca.key", "router.pem", "router.key", "router-client.pem", "client.pem"} <= names
    assert {"worker-fp32-0.pem", "worker-bf16-0.key"} <= names  # the default pool's workers
    assert stat.S_IMODE((tmp_path / "router.key").stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert "[security]" in out and 'worker_cert = "' in out and "{name}" in out


def test_a_tls_router_refuses_plaintext_and_serves_tls_end_to_end(certs: PoolCertificates) -> None:
    async def scenario() -> None:
        workers = [FakeWorker("fp32-0", "fp32"), FakeWorker("bf16-0", "bf16", cores=[1])]
        async with running_pool(workers, security=mutual_tls(certs)) as pool:
            # Router -> workers over mutual TLS: the pool found both workers healthy.
            assert all(w.healthy for w in pool.pool.workers)
            responses = [r async for r in pool.stub.Generate(REQUEST, timeout=10)]
            assert responses[-1].summary.generated_tokens == 3
            async with grpc.aio.insecure_channel(pool.address) as plain:
                error = await refused(plain)
            assert error.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario)


def test_a_worker_refuses_callers_without_a_certificate_from_the_pool_ca(
    certs: PoolCertificates, tmp_path: Path
) -> None:
    other_ca = make_pool_certificates(tmp_path / "other", [])

    async def describe(credentials: grpc.ChannelCredentials, address: str) -> worker_pb2.WorkerInfo:
        # Verifying the worker by its own name, as the router does.
        options = [("grpc.ssl_target_name_override", "fp32-0.worker.tierserve")]
        async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            info: worker_pb2.WorkerInfo = await stub.Describe(worker_pb2.DescribeRequest(), timeout=5)
            return info

    async def scenario() -> None:
        async with running_pool([FakeWorker("fp32-0", "fp32")], security=mutual_tls(certs)) as pool:
            address = pool.pool.workers[0].address
            ca = certs.ca.read_bytes()
            router_client = (certs.router_client.key.read_bytes(), certs.router_client.cert.read_bytes())
            assert (await describe(grpc.ssl_channel_credentials(ca, *router_client), address)).tier == "fp32"
            strangers = [
                grpc.ssl_channel_credentials(ca),  # no client certificate
                grpc.ssl_channel_credentials(
                    ca,
                    other_ca.router_client.key.read_bytes(),
                    other_ca.router_client.cert.read_bytes(),
                ),  # signed by another CA
            ]
            for credentials in strangers:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await describe(credentials, address)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(address) as plain:
                with pytest.raises(grpc.aio.AioRpcError):
                    await worker_pb2_grpc.WorkerStub(plain).Describe(worker_pb2.DescribeRequest(), timeout=5)

    run(scenario)


def test_tokens_are_required_known_and_limited_per_client(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# token name max-concurrent\nsecret-a alice 1\nsecret-b bob\n")

    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32")
        security: dict[str, object] = {"tokens_file": str(tokens)}
        async with running_pool([fake], security=security) as pool:
            channel = grpc.aio.insecure_channel(pool.address)
            assert (await refused(channel)).code() == grpc.StatusCode.UNAUTHENTICATED
            assert (await refused(channel, "secret-z")).code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await call(channel, "secret-b"))[-1].summary.generated_tokens == 3
            # Health stays open to probes without a token (this bare router never turns SERVING).
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # alice may have one stream open: a second is refused until the first ends.
            fake.gate.clear()
            while not fake.arrivals.empty():  # earlier calls' arrivals
                fake.arrivals.get_nowait()
            held = asyncio.create_task(call(channel, "secret-a"))
            await fake.arrivals.get()
            over = await refused(channel, "secret-a")
            assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "alice" in (over.details() or "")
            fake.gate.set()
            assert (await held)[-1].summary.generated_tokens == 3
            assert (await call(channel, "secret-a"))[-1].summary.generated_tokens == 3
            # A stream the client abandons gives its place back too.
            fake.gate.clear()
            abandoned = asyncio.create_task(call(channel, "secret-a"))
            await fake.arrivals.get()
            abandoned.cancel()
            fake.gate.set()
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                try:
                    assert (await call(channel, "secret-a"))[-1].summary.generated_tokens == 3
                    break
                except grpc.aio.AioRpcError as error:  # the server may not have seen the cancel yet
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert asyncio.get_running_loop().time() < deadline, "the abandoned stream kept its place"
                    await asyncio.sleep(0.01)
            await channel.close()

    run(scenario)


def test_security_config_refuses_half_pairs() -> None:
    with pytest.raises(ValueError, match="router_cert and router_key"):
        SecurityConfig(router_cert="a.pem")
    with pytest.raises(ValueError, match="needs `ca`"):
        SecurityConfig(worker_cert="w.pem", worker_key="w.key", router_client_cert="c", router_client_key="k")
    with pytest.raises(ConfigError, match="cannot read"):
        load_tokens(Path("/nonexistent/tokens.txt"), 0)


def test_the_workers_command_reaches_a_tls_router_with_a_token(
    certs: PoolCertificates, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tokens.txt").write_text("t0ken ops\n")
    (tmp_path / "my-token").write_text("t0ken\n")
    security = {**mutual_tls(certs), "tokens_file": str(tmp_path / "tokens.txt")}

    async def scenario() -> None:
        async with running_pool([FakeWorker("fp32-0", "fp32")], security=security) as pool:
            args = ["workers", "--address", pool.address, "--ca-cert", str(certs.ca), "--json"]
            assert await asyncio.to_thread(main, [*args, "--token-file", str(tmp_path / "my-token")]) == 0
            assert await asyncio.to_thread(main, args) == 1  # no token: refused

    run(scenario)
    out = capsys.readouterr().out
    assert '"workerId": "fp32-0"' in out and "UNAUTHENTICATED" in out
