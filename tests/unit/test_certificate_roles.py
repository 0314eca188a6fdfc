"""Certificate roles: what `tierserve certs` writes (one purpose and one name per certificate, two
CAs, private keys 0600 created without following symbolic links) and what each role may do over
real TLS sockets, against in-process fake workers: an API client's certificate fails the handshake
with a worker, only the router's certificate may call one, and a worker's certificate cannot answer
for another worker."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tierserve_client.v1 import generate_pb2, worker_pb2, worker_pb2_grpc

from tests.tls_probe import tls_handshake
from tests.unit.fake_pool import FakeWorker, running_pool
from tests.unit.test_security import mutual_tls
from tierserve.cli import main
from tierserve.domain.config import SecurityConfig
from tierserve.ops.certs import (
    CertificateFileError,
    Issued,
    LocalCA,
    PoolCertificates,
    make_pool_certificates,
    write_new_file,
)
from tierserve.rpc.identity import certificate_names, named_workers
from tierserve.rpc.tls import worker_channel_options

WORKERS = ["fp32-0", "bf16-0"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PoolCertificates:
    return make_pool_certificates(tmp_path_factory.mktemp("certs"), WORKERS)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# --- files -----------------------------------------------------------------------------------------


@pytest.fixture(params=[0o000, 0o277], ids=["umask-000", "umask-277"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    # The loosest umask, and one that would leave keys 0400: the key mode comes from the writer.
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_private_keys_are_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    made = make_pool_certificates(tmp_path, ["w"])
    keys = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".key")
    assert keys == [
        "ca.key",
        "client-ca.key",
        "client.key",
        "router-client.key",
        "router.key",
        "worker-w-client.key",
        "worker-w.key",
    ]
    for path in tmp_path.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644 & ~umask), f"{path.name}: {oct(mode)}"
    assert stat.S_IMODE(made.worker_clients["w"].key.stat().st_mode) == 0o600


def test_a_symbolic_link_in_place_of_a_key_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    out, victim = tmp_path / "certs", tmp_path / "victim"
    out.mkdir()
    victim.write_text("not a key\n")
    (out / "router.key").symlink_to(victim)
    with pytest.raises(CertificateFileError, match=r"router\.key is a symbolic link"):
        make_pool_certificates(out, ["w"])
    assert victim.read_text() == "not a key\n"
    assert [p.name for p in out.iterdir()] == ["router.key"]  # checked before writing anything
    (out / "router.key").unlink()
    (out / "router.key").symlink_to(tmp_path / "absent")  # dangling: would create its target
    with pytest.raises(CertificateFileError, match="symbolic link"):
        make_pool_certificates(out, ["w"])
    assert not (tmp_path / "absent").exists()


def test_the_writer_itself_never_follows_a_link_nor_replaces_a_file(tmp_path: Path) -> None:
    # As if the link appeared between the check and the write: O_EXCL | O_NOFOLLOW still refuse.
    (tmp_path / "k.key").symlink_to(tmp_path / "target")
    with pytest.raises(CertificateFileError):
        write_new_file(tmp_path / "k.key", b"secret", private=True)
    assert not (tmp_path / "target").exists()
    (tmp_path / "old.key").write_bytes(b"old")
    with pytest.raises(CertificateFileError, match="already exists"):
        write_new_file(tmp_path / "old.key", b"new", private=True)
    assert (tmp_path / "old.key").read_bytes() == b"old"


def test_certs_twice_into_one_directory_keeps_the_first_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'router_client_name = "router.tierserve"' in out
    assert 'worker_server_name = "{name}.worker.tierserve"' in out
    assert f'# client_ca = "{tmp_path / "client-ca.pem"}"' in out
    assert "worker-{name}-client.pem" in out
    ca = (tmp_path / "ca.pem").read_bytes()
    assert main(["certs", "--out", str(tmp_path)]) != 0
    refused = capsys.readouterr()
    assert "ca.pem already exists; refusing to write over it" in refused.out + refused.err
    assert (tmp_path / "ca.pem").read_bytes() == ca


# --- roles -----------------------------------------------------------------------------------------


def test_each_certificate_has_one_purpose_one_role_name_and_the_issuer_of_its_role(
    certs: PoolCertificates,
) -> None:
    pool_ca, client_ca = load(certs.ca).subject, load(certs.client_ca).subject
    assert pool_ca != client_ca
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    expected: list[tuple[Issued, list[x509.ObjectIdentifier], set[str], x509.Name]] = [
        (certs.router, [server], {"localhost", "127.0.0.1", "::1"}, pool_ca),
        (certs.router_client, [client], {"router.tierserve"}, pool_ca),
        (certs.workers["fp32-0"], [server], {"fp32-0.worker.tierserve"}, pool_ca),
        (certs.worker_clients["fp32-0"], [client], {"fp32-0.worker.tierserve"}, client_ca),
        (certs.client, [client], {"client.tierserve"}, client_ca),
    ]
    for issued, purposes, names, issuer in expected:
        cert = load(issued.cert)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = set(alt.get_values_for_type(x509.DNSName))
        ips = {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}
        assert (usages(cert), dns | ips, cert.issuer) == (purposes, names, issuer), issued.cert.name
        assert certificate_names(issued.cert.read_bytes()) == dns  # what the servers check


def test_names_are_read_as_tls_reads_them(certs: PoolCertificates) -> None:
    # No subject alternative names (the CA): the common name stands in.
    assert certificate_names(certs.ca.read_bytes()) == {"tierserve development CA"}
    names = frozenset({"fp32-0.worker.tierserve", "fp32-*.worker.tierserve", "worker.tierserve", "x"})
    assert named_workers("{name}.worker.tierserve", names) == ["fp32-*", "fp32-0"]
    assert named_workers("shared.example", names) == []
    secured = SecurityConfig.model_validate(mutual_tls(certs))
    assert worker_channel_options(secured, "bf16-0") == [
        ("grpc.ssl_target_name_override", "bf16-0.worker.tierserve")
    ]
    shared = secured.model_copy(update={"worker_server_name": "workers.example"})
    assert worker_channel_options(shared, "bf16-0") == [("grpc.ssl_target_name_override", "workers.example")]
    assert worker_channel_options(secured.model_copy(update={"worker_server_name": ""}), "bf16-0") == []
    assert worker_channel_options(SecurityConfig(), "bf16-0") == []  # plaintext


def test_certificates_follow_the_names_the_config_expects(tmp_path: Path) -> None:
    security = SecurityConfig(
        worker_server_name="{name}.workers.example", router_client_name="router.example"
    )
    made = make_pool_certificates(tmp_path, ["a"], security=security)
    assert certificate_names(made.workers["a"].cert.read_bytes()) == {"a.workers.example"}
    assert certificate_names(made.worker_clients["a"].cert.read_bytes()) == {"a.workers.example"}
    assert certificate_names(made.router_client.cert.read_bytes()) == {"router.example"}


# --- over TLS --------------------------------------------------------------------------------------


def pem_pair(issued: Issued) -> tuple[bytes, bytes]:
    return issued.key.read_bytes(), issued.cert.read_bytes()


async def describe(address: str, credentials: grpc.ChannelCredentials, server_name: str) -> str:
    """Describe over TLS, verifying the worker as `server_name`: its tier, or the refusal's code."""
    options = [("grpc.ssl_target_name_override", server_name)]
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        try:
            info = await worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            code: str = error.code().name
            return code
        tier: str = info.tier
        return tier


def test_only_the_routers_certificate_may_call_a_worker(certs: PoolCertificates, tmp_path: Path) -> None:
    # Another client certificate from the pool CA: it passes the handshake, but does not name the router.
    pool_ca = LocalCA.load(certs.ca, certs.ca.with_suffix(".key"))
    cert, key = pool_ca.issue("not the router", ["fp32-0.worker.tierserve"], server=False)
    stranger = (
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        cert.public_bytes(serialization.Encoding.PEM),
    )

    async def scenario() -> None:
        async with running_pool([FakeWorker("fp32-0", "fp32")], security=mutual_tls(certs)) as pool:
            address, name = pool.pool.workers[0].address, "fp32-0.worker.tierserve"
            ca = certs.ca.read_bytes()

            def as_(pair: tuple[bytes, bytes] | None) -> grpc.ChannelCredentials:
                return grpc.ssl_channel_credentials(ca, *(pair or (None, None)))

            assert await describe(address, as_(pem_pair(certs.router_client)), name) == "fp32"
            # Refused at the handshake: an API client's certificate (the client CA, which workers do
            # not trust), a worker's own (a server certificate), a registration certificate.
            for refused in (certs.client, certs.workers["bf16-0"], certs.worker_clients["fp32-0"]):
                assert await describe(address, as_(pem_pair(refused)), name) == "UNAVAILABLE", refused.cert
                error = await asyncio.to_thread(
                    tls_handshake, address, name, certs.ca, (refused.cert, refused.key)
                )
                assert error is not None, refused.cert
            assert (
                await asyncio.to_thread(
                    tls_handshake,
                    address,
                    name,
                    certs.ca,
                    (certs.router_client.cert, certs.router_client.key),
                )
                is None
            )
            # Past the handshake, the worker checks the name: only the router's.
            async with grpc.aio.secure_channel(
                address, as_(stranger), options=[("grpc.ssl_target_name_override", name)]
            ) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await worker_pb2_grpc.WorkerStub(channel).Describe(
                        worker_pb2.DescribeRequest(), timeout=5
                    )
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "router.tierserve" in (caught.value.details() or "")
                streamed = worker_pb2_grpc.WorkerStub(channel).Generate(
                    generate_pb2.GenerateRequest(prompt="hi"), timeout=5
                )
                with pytest.raises(grpc.aio.AioRpcError) as generate:
                    _ = [r async for r in streamed]
                assert generate.value.code() == grpc.StatusCode.PERMISSION_DENIED
                # Health stays open to any caller that passed the handshake (probes).
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_a_worker_answering_with_another_workers_certificate_is_refused_by_the_router(
    certs: PoolCertificates,
) -> None:
    # Both workers serve fp32-0's certificate; the router verifies each against its own name.
    security = {
        **mutual_tls(certs),
        "worker_cert": str(certs.workers["fp32-0"].cert),
        "worker_key": str(certs.workers["fp32-0"].key),
    }

    async def scenario() -> None:
        fakes = [FakeWorker("fp32-0", "fp32"), FakeWorker("bf16-0", "bf16", cores=[1])]
        async with running_pool(fakes, security=security) as pool:
            impostor = pool.pool.by_id("bf16-0")
            assert pool.pool.by_id("fp32-0").healthy and not impostor.healthy
            assert "Hostname Verification" in impostor.last_error, impostor.last_error
            assert fakes[1].arrivals.empty()  # it never got a request
            name = "bf16-0.worker.tierserve"
            error = await asyncio.to_thread(
                tls_handshake,
                impostor.address,
                name,
                certs.ca,
                (certs.router_client.cert, certs.router_client.key),
            )
            assert error is not None and "bf16-0.worker.tierserve" in error

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
