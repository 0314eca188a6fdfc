"""Self-registration with real processes on the default model: a router that knows no workers, a
worker that registers itself and heartbeats, requests served through the router, and the worker gone
from ListWorkers once its heartbeats stop; then the same on a secured pool (TLS with client
certificates, client and registration tokens, mutual TLS to the worker), where a Register without
the registration token is refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from tierserve_client import Client, ClientOptions, GenerateParams
from tierserve_client.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.integration.default_model import START_TIMEOUT_S, default_model, start_router
from tests.integration.processes import Server, spawn, stop, wait_until, write_config
from tests.unit.test_security import mutual_tls
from tierserve.ops.certs import Issued, PoolCertificates, make_pool_certificates

pytestmark = pytest.mark.integration

TTL_S = 3.0
PROMPT = "The capital of France is"


def registering_worker(name: str, tier: str, router_address: str) -> dict[str, Any]:
    return {
        "name": name,
        "tier": tier,
        "cores": [sorted(os.sched_getaffinity(0))[0]],
        "warmup_runs": 0,
        "register_with": router_address,
        "heartbeat_interval_s": 0.5,
    }


def listed(client: Client) -> dict[str, router_pb2.WorkerStatus]:
    try:
        return {w.worker_id: w for w in client.list_workers(timeout_s=2.0).workers}
    except grpc.RpcError:
        return {}


def wait_serving(client: Client, name: str, servers: list[Server]) -> router_pb2.WorkerStatus:
    def serving() -> bool:
        status = listed(client).get(name)
        return status is not None and status.health == router_pb2.WORKER_HEALTH_SERVING

    wait_until(serving, f"the registered worker {name} serves", servers, START_TIMEOUT_S)
    return listed(client)[name]


def stop_all(servers: list[Server]) -> dict[str, int]:
    codes = {s.name: stop(s) for s in reversed(servers)}
    print("\n".join(s.tail() for s in servers))
    return codes


def test_a_worker_registers_serves_and_expires_when_its_heartbeats_stop(tmp_path: Path) -> None:
    # No [[workers]]: every worker of this router joins by Register; no credentials, so open
    # registration must be asked for (and the router warns).
    router, address = start_router(
        tmp_path,
        router={"port": 0, "health_interval_s": 0.3, "registration_ttl_s": TTL_S},
        security={"allow_open_registration": True},
    )
    servers = [router]
    try:
        worker_config = write_config(
            tmp_path / "worker.toml", default_model(workers=[registering_worker("reg-0", "fp32", address)])
        )
        worker = spawn("worker", ["worker", "--name", "reg-0"], worker_config, tmp_path)
        servers.append(worker)
        with Client(ClientOptions(address)) as client:
            status = wait_serving(client, "reg-0", servers)
            assert status.registered and status.address == f"127.0.0.1:{worker.port()}"
            assert status.info.tier == "fp32" and list(status.info.affinity) == [
                sorted(os.sched_getaffinity(0))[0]
            ]
            result = client.generate(PROMPT, GenerateParams(max_new_tokens=6), timeout_s=60)
            summary = result.summary
            assert (summary.worker_id, summary.tier, summary.generated_tokens) == ("reg-0", "fp32", 6)
            assert "Paris" in result.text  # the real model answers, greedily

            assert stop(worker) == 0  # its heartbeats stop with it
            servers.remove(worker)
            wait_until(
                lambda: "reg-0" not in listed(client), "the silent worker expires", servers, TTL_S + 10
            )
            assert client.list_workers().workers == [] and router.process.poll() is None
        log = router.log.read_text()
        assert "reg-0 at 127.0.0.1" in log and "no heartbeat in time" in log
        assert "registration is open" in log
    finally:
        codes = stop_all(servers)
    assert codes == {"router": 0}


def secured(certs: PoolCertificates, tmp_path: Path) -> dict[str, object]:
    """Every part of [security]: TLS requiring client certificates, client tokens, a registration
    token bound to the ids sec-*, mutual TLS from the router to its workers."""
    (tmp_path / "tokens.txt").write_text("client-secret alice\n")
    (tmp_path / "registration.txt").write_text("worker-secret workers sec-*\n")
    return {
        **mutual_tls(certs),
        "client_ca": str(certs.client_ca),
        "tokens_file": str(tmp_path / "tokens.txt"),
        "registration_token_file": str(tmp_path / "registration.txt"),
        # Each worker's own client certificate to the router, named for it.
        "registration_cert": str(certs.ca.parent / "worker-{name}-client.pem"),
        "registration_key": str(certs.ca.parent / "worker-{name}-client.key"),
    }


def register_refusal(
    address: str,
    certs: PoolCertificates,
    token: str,
    certificate: Issued | None = None,
    worker_id: str = "intruder",
) -> grpc.StatusCode:
    """A Register from a TLS caller with `certificate` (an API client's by default), with `token`
    (or none)."""
    issued = certificate or certs.client
    credentials = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(), issued.key.read_bytes(), issued.cert.read_bytes()
    )
    request = router_pb2.RegisterRequest(worker_id=worker_id, address="127.0.0.1:1", tier="fp32")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.secure_channel(address, credentials) as channel, pytest.raises(grpc.RpcError) as refused:
        router_pb2_grpc.RouterStub(channel).Register(request, timeout=10, metadata=metadata)
    code: grpc.StatusCode = refused.value.code()
    return code


def test_a_worker_registers_with_a_secured_router_and_intruders_cannot(tmp_path: Path) -> None:
    certs = make_pool_certificates(tmp_path / "certs", ["sec-0"])
    security = secured(certs, tmp_path)
    router, address = start_router(
        tmp_path, router={"port": 0, "health_interval_s": 0.3, "registration_ttl_s": 10.0}, security=security
    )
    servers = [router]
    try:
        assert register_refusal(address, certs, "") == grpc.StatusCode.UNAUTHENTICATED
        # A client's token may generate, but not add a worker that would receive prompts.
        assert register_refusal(address, certs, "client-secret") == grpc.StatusCode.PERMISSION_DENIED
        # The workers' token with an API client's certificate: a client cannot register.
        assert register_refusal(address, certs, "worker-secret") == grpc.StatusCode.PERMISSION_DENIED
        # A worker's own credentials, for an id they are not bound to.
        sec0 = certs.worker_clients["sec-0"]
        assert (
            register_refusal(address, certs, "worker-secret", sec0, "intruder")
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            register_refusal(address, certs, "worker-secret", sec0, "sec-1")
            == grpc.StatusCode.PERMISSION_DENIED
        )
        worker_config = write_config(
            tmp_path / "worker.toml",
            default_model(security=security, workers=[registering_worker("sec-0", "bf16", address)]),
        )
        worker = spawn("worker", ["worker", "--name", "sec-0"], worker_config, tmp_path)
        servers.append(worker)
        options = ClientOptions(
            address,
            root_certificates=certs.ca,
            certificate_chain=certs.client.cert,
            private_key=certs.client.key,
            token="client-secret",
        )
        with Client(options) as client:
            status = wait_serving(client, "sec-0", servers)
            assert status.registered and set(listed(client)) == {"sec-0"}  # no intruder
            result = client.generate(PROMPT, GenerateParams(max_new_tokens=6, tier="bf16"), timeout_s=60)
            assert (result.summary.worker_id, result.summary.generated_tokens) == ("sec-0", 6)
            assert result.text.strip()
        # The router reached the worker over mutual TLS; a caller without a client certificate cannot.
        no_certificate = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        with grpc.secure_channel(status.address, no_certificate) as channel:
            with pytest.raises(grpc.RpcError) as stranger:
                worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)
            assert stranger.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "registration with router" not in worker.log.read_text()  # never refused
    finally:
        codes = stop_all(servers)
    assert codes == {"worker": 0, "router": 0}
