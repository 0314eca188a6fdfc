"""Certificate roles on the default model, over real TLS sockets: `tierserve certs` makes the pool's
certificates, a worker process serves with mutual TLS, and a router process dials it twice: as
itself (`a`) and, at the same address, as another worker (`b`), so the worker's certificate is
presented as another worker's. An API client's certificate fails the handshake with the worker; the
router refuses the worker's certificate as `b`'s and routes only to `a`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.integration.default_model import START_TIMEOUT_S, default_model
from tests.integration.processes import CLI, Server, spawn, stop, wait_until, write_config
from tests.tls_probe import tls_handshake
from tierserve.rpc.calls import list_workers

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


@dataclass(frozen=True)
class Pool:
    certs: Path
    worker_address: str
    router_address: str
    servers: list[Server]

    def pair(self, stem: str) -> tuple[Path, Path]:
        return self.certs / f"{stem}.pem", self.certs / f"{stem}.key"

    def credentials(self, stem: str) -> grpc.ChannelCredentials:
        cert, key = self.pair(stem)
        return grpc.ssl_channel_credentials(
            (self.certs / "ca.pem").read_bytes(), key.read_bytes(), cert.read_bytes()
        )


def statuses(address: str) -> dict[str, router_pb2.WorkerStatus]:
    try:
        return {w.worker_id: w for w in list_workers(address, timeout_s=2.0).workers}
    except grpc.RpcError:
        return {}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp_path = tmp_path_factory.mktemp("roles")
    worker = {
        "name": "a",
        "tier": "fp32",
        "cores": [sorted(os.sched_getaffinity(0))[0]],
        "warmup_runs": 0,
    }
    plain = write_config(tmp_path / "plain.toml", default_model(workers=[worker]))
    certs = tmp_path / "certs"
    made = subprocess.run(
        [*CLI, "certs", "--out", str(certs), "--config", str(plain)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stdout + made.stderr
    # Mutual TLS between router and workers, names as `tierserve certs` makes them (the defaults).
    security = {
        "ca": str(certs / "ca.pem"),
        "worker_cert": str(certs / "worker-{name}.pem"),
        "worker_key": str(certs / "worker-{name}.key"),
        "router_client_cert": str(certs / "router-client.pem"),
        "router_client_key": str(certs / "router-client.key"),
    }
    servers: list[Server] = []
    try:
        worker_config = write_config(
            tmp_path / "worker.toml", default_model(security=security, workers=[worker])
        )
        servers.append(spawn("worker", ["worker", "--name", "a"], worker_config, tmp_path))
        wait_until(servers[0].port, "the worker listens", servers, START_TIMEOUT_S)
        worker_address = f"127.0.0.1:{servers[0].port()}"
        router_config = write_config(
            tmp_path / "router.toml",
            default_model(
                security=security,
                router={"port": 0, "health_interval_s": 0.3},
                # `b` is dialled at a's address: a's certificate answers for b.
                workers=[
                    {"name": "a", "tier": "fp32", "address": worker_address},
                    {"name": "b", "tier": "fp32", "address": worker_address},
                ],
            ),
        )
        servers.append(spawn("router", ["router"], router_config, tmp_path))
        wait_until(servers[1].port, "the router listens", servers, 60)
        router_address = f"127.0.0.1:{servers[1].port()}"

        def a_serves_and_b_was_checked() -> bool:
            listed = statuses(router_address)
            return (
                "a" in listed
                and listed["a"].health == router_pb2.WORKER_HEALTH_SERVING
                and listed["b"].health != router_pb2.WORKER_HEALTH_UNSPECIFIED
            )

        wait_until(a_serves_and_b_was_checked, "the worker serves as a", servers, START_TIMEOUT_S)
        yield Pool(certs, worker_address, router_address, servers)
    finally:
        codes = {s.name: stop(s) for s in reversed(servers)}
        print("\n".join(s.tail() for s in servers))
    assert codes == {"router": 0, "worker": 0}


def test_an_api_client_certificate_is_refused_at_the_handshake_with_a_worker(pool: Pool) -> None:
    ca, name = pool.certs / "ca.pem", "a.worker.tierserve"
    # The router's client certificate completes the handshake, and the worker speaks HTTP/2.
    assert tls_handshake(pool.worker_address, name, ca, pool.pair("router-client")) is None
    # client.pem (signed by the client CA, which workers do not trust), the worker's own server
    # certificate (not a client's), a worker's registration certificate: the handshake fails.
    for stem in ("client", "worker-a", "worker-a-client"):
        refused = tls_handshake(pool.worker_address, name, ca, pool.pair(stem))
        assert refused is not None, f"{stem}.pem completed a handshake with the worker"
        options = [("grpc.ssl_target_name_override", name)]
        with (
            grpc.secure_channel(pool.worker_address, pool.credentials(stem), options=options) as channel,
            pytest.raises(grpc.RpcError) as caught,
        ):
            worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, stem
    # The router's certificate, over the same kind of channel, is served.
    options = [("grpc.ssl_target_name_override", name)]
    with grpc.secure_channel(
        pool.worker_address, pool.credentials("router-client"), options=options
    ) as channel:
        info = worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)
    assert (info.worker_id, info.tier) == ("a", "fp32")


def test_a_worker_certificate_presented_as_another_worker_is_refused(pool: Pool) -> None:
    listed = statuses(pool.router_address)
    assert listed["a"].health == router_pb2.WORKER_HEALTH_SERVING
    assert listed["b"].health == router_pb2.WORKER_HEALTH_UNREACHABLE, listed["b"]
    assert "Hostname Verification" in listed["b"].last_error, listed["b"].last_error
    # The same socket, verified as b: the handshake fails on the router's side.
    refused = tls_handshake(
        pool.worker_address, "b.worker.tierserve", pool.certs / "ca.pem", pool.pair("router-client")
    )
    assert refused is not None and "b.worker.tierserve" in refused, refused
    # Requests go to a only, however many.
    with grpc.insecure_channel(pool.router_address) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        for _ in range(3):
            request = generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=4)
            summary = list(router.Generate(request, timeout=120))[-1].summary
            assert (summary.worker_id, summary.generated_tokens) == ("a", 4)
    assert statuses(pool.router_address)["b"].requests_total == 0
