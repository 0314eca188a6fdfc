"""Self-registration with real processes on the tiny model: a router that knows no workers, a worker
that registers itself and heartbeats, a request served through the router, and the worker gone
from ListWorkers once its heartbeats stop."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.integration.processes import spawn, stop, wait_until, write_config
from tests.tiny_model import build_tiny_model_dir
from tierserve.client import list_workers
from tierserve.v1 import generate_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 300
TTL_S = 3.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def listed(address: str) -> dict[str, router_pb2.WorkerStatus]:
    try:
        return {w.worker_id: w for w in list_workers(address, timeout_s=2.0).workers}
    except grpc.RpcError:
        return {}


def test_a_worker_registers_serves_and_expires_when_its_heartbeats_stop(
    tmp_path: Path, tiny_model: Path
) -> None:
    router_config = write_config(
        tmp_path / "router.toml",
        {
            "model": {"path": str(tiny_model)},
            # No [[workers]]: every worker of this router joins by Register.
            "router": {"port": 0, "health_interval_s": 0.3, "registration_ttl_s": TTL_S},
            "metrics": {"enabled": False},
        },
    )
    router = spawn("router", ["router"], router_config, tmp_path)
    servers = [router]
    try:
        wait_until(router.port, "the router listens", servers, 60)
        address = f"127.0.0.1:{router.port()}"
        worker_config = write_config(
            tmp_path / "worker.toml",
            {
                "model": {"path": str(tiny_model)},
                "metrics": {"enabled": False},
                "workers": [
                    {
                        "name": "reg-0",
                        "tier": "fp32",
                        "warmup_runs": 0,
                        "register_with": address,
                        "heartbeat_interval_s": 0.5,
                    }
                ],
            },
        )
        worker = spawn("worker", ["worker", "--name", "reg-0"], worker_config, tmp_path)
        servers.append(worker)

        def serving() -> bool:
            status = listed(address).get("reg-0")
            return status is not None and status.health == router_pb2.WORKER_HEALTH_SERVING

        wait_until(serving, "the registered worker serves", servers, START_TIMEOUT_S)
        status = listed(address)["reg-0"]
        assert status.registered and status.address == f"127.0.0.1:{worker.port()}"
        with grpc.insecure_channel(address) as channel:
            request = generate_pb2.GenerateRequest(prompt="hello", max_new_tokens=3)
            summary = list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60))[-1].summary
        assert (summary.worker_id, summary.tier, summary.generated_tokens) == ("reg-0", "fp32", 3)

        assert stop(worker) == 0  # its heartbeats stop with it
        servers.remove(worker)
        wait_until(lambda: "reg-0" not in listed(address), "the silent worker expires", servers, TTL_S + 10)
        assert len(list_workers(address).workers) == 0 and router.process.poll() is None
        assert (
            "reg-0 at 127.0.0.1" in router.log.read_text()
            and "no heartbeat in time" in router.log.read_text()
        )
    finally:
        codes = {s.name: stop(s) for s in servers}
        print("\n".join(s.tail() for s in servers))
    assert codes == {"router": 0}
