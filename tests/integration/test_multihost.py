"""Many hosts on one machine: each worker in its own network namespace, reached over its own veth
link by static address from a router in the root namespace; cut one link and the router routes
around it. Needs root (network namespaces); skipped with the reason otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.integration.processes import Server, spawn, stop, wait_until, write_config
from tests.tiny_model import build_tiny_model_dir
from tierserve.client import list_workers
from tierserve.v1 import generate_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 300
# Health checks time out after 2 s; a few rounds more for the router to notice a cut link.
CUT_NOTICED_S = 20.0
BLACKHOLE_METRIC = "4242"


@dataclass
class Host:
    """A namespace standing for a host, linked to the root namespace by a veth pair (a /30)."""

    namespace: str
    link: str  # the veth end in the root namespace; setting it down cuts the host off
    address: str  # the veth end inside the namespace, where the worker listens
    subnet: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _add_host(index: int, tag: str, subnet: int) -> Host:
    namespace, link, peer = f"ts{tag}-{index}", f"tsh{tag}{index}", f"tsw{tag}{index}"
    near, far, prefix = f"10.77.{subnet}.1", f"10.77.{subnet}.2", f"10.77.{subnet}.0/30"
    _ip("netns", "add", namespace)
    # With the link down, packets for the host go nowhere (as on a cut cable), rather than out
    # of the default route to whatever answers there.
    _ip("route", "add", "blackhole", prefix, "metric", BLACKHOLE_METRIC)
    _ip("link", "add", link, "type", "veth", "peer", "name", peer)
    _ip("link", "set", peer, "netns", namespace)
    _ip("addr", "add", f"{near}/30", "dev", link)
    _ip("link", "set", link, "up")
    _ip("-n", namespace, "addr", "add", f"{far}/30", "dev", peer)
    _ip("-n", namespace, "link", "set", peer, "up")
    _ip("-n", namespace, "link", "set", "lo", "up")
    return Host(namespace, link, far, prefix)


def _remove_host(namespace: str, link: str, subnet: str) -> None:
    # Deleting the namespace destroys its veth end, and with it ours; delete ours too in case the
    # namespace never got it.
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    subprocess.run(["ip", "link", "del", link], capture_output=True)
    subprocess.run(
        ["ip", "route", "del", "blackhole", subnet, "metric", BLACKHOLE_METRIC], capture_output=True
    )


@pytest.fixture
def two_hosts() -> Iterator[list[Host]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add); run as root to test many hosts")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip` command")
    tag = str(os.getpid() % 100_000)
    # Per-run subnets (10.77.x.0/30), so two runs on one machine do not collide.
    base = os.getpid() % 120 * 2
    hosts: list[Host] = []
    try:
        for index in range(2):
            try:
                hosts.append(_add_host(index, tag, base + index))
            except subprocess.CalledProcessError as error:
                _remove_host(f"ts{tag}-{index}", f"tsh{tag}{index}", f"10.77.{base + index}.0/30")
                pytest.skip(
                    f"cannot create network namespaces here ({' '.join(error.cmd)}: {error.stderr.strip()})"
                )
        yield hosts
    finally:
        for host in hosts:
            _remove_host(host.namespace, host.link, host.subnet)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def statuses(address: str) -> dict[str, router_pb2.WorkerStatus]:
    try:
        return {w.worker_id: w for w in list_workers(address, timeout_s=2.0).workers}
    except grpc.RpcError:
        return {}


def health(address: str, worker: str) -> router_pb2.WorkerHealth.ValueType:
    status = statuses(address).get(worker)
    return status.health if status is not None else router_pb2.WORKER_HEALTH_UNSPECIFIED


def generate(address: str) -> generate_pb2.Summary:
    with grpc.insecure_channel(address) as channel:
        request = generate_pb2.GenerateRequest(prompt="hello", max_new_tokens=3)
        responses = list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60))
    summary: generate_pb2.Summary = responses[-1].summary
    assert summary.generated_tokens == 3
    return summary


def in_namespace(pid: int, namespace: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{namespace}").st_ino


def test_router_reaches_workers_in_other_namespaces_and_routes_around_a_cut_link(
    tmp_path: Path, tiny_model: Path, two_hosts: list[Host]
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    tiers = {"near": "fp32", "far": "bf16"}
    names = list(tiers)
    common = {"model": {"path": str(tiny_model)}, "metrics": {"enabled": False}}
    pool = write_config(
        tmp_path / "pool.toml",
        {
            **common,
            "workers": [
                {
                    "name": name,
                    "tier": tiers[name],
                    "host": host.address,  # inside its namespace, only its veth address
                    "cores": [cpus[index % len(cpus)]],
                    "warmup_runs": 0,
                }
                for index, (name, host) in enumerate(zip(names, two_hosts, strict=True))
            ],
        },
    )
    servers: list[Server] = []
    try:
        for name, host in zip(names, two_hosts, strict=True):
            prefix = ["ip", "netns", "exec", host.namespace]
            servers.append(spawn(name, ["worker", "--name", name], pool, tmp_path, prefix))
        wait_until(lambda: all(s.port() for s in servers), "the workers listen", servers, START_TIMEOUT_S)
        for server, host in zip(servers, two_hosts, strict=True):
            assert in_namespace(server.process.pid, host.namespace)
        router_config = write_config(
            tmp_path / "router.toml",
            {
                **common,
                # Accuracy-blind, so either tier serves: a tiny random model's bf16 card is no
                # guide (its perplexity change can be NaN), and every worker takes turns.
                "router": {"port": 0, "health_interval_s": 0.3, "policy": "round_robin"},
                "workers": [
                    {"name": name, "tier": tiers[name], "address": f"{host.address}:{server.port()}"}
                    for name, host, server in zip(names, two_hosts, servers, strict=True)
                ],
            },
        )
        router = spawn("router", ["router"], router_config, tmp_path)
        servers.append(router)
        wait_until(router.port, "the router listens", servers, 60)
        address = f"127.0.0.1:{router.port()}"

        def all_serving() -> bool:
            return all(health(address, name) == router_pb2.WORKER_HEALTH_SERVING for name in names)

        wait_until(all_serving, "both workers serve across their links", servers, START_TIMEOUT_S)
        listed = statuses(address)
        for name, host in zip(names, two_hosts, strict=True):
            assert listed[name].address.startswith(f"{host.address}:")
        assert {generate(address).worker_id for _ in range(2)} == {"near", "far"}

        _ip("link", "set", two_hosts[0].link, "down")  # cut the preferred worker's host off
        wait_until(
            lambda: health(address, "near") == router_pb2.WORKER_HEALTH_UNREACHABLE,
            "the router sees the cut worker unreachable",
            servers,
            CUT_NOTICED_S,
        )
        assert health(address, "far") == router_pb2.WORKER_HEALTH_SERVING
        served = [generate(address) for _ in range(3)]
        assert [(s.worker_id, s.tier) for s in served] == [("far", "bf16")] * 3
        # Cut off, not dead: the router routed around a network failure.
        assert servers[0].process.poll() is None
    finally:
        for server in reversed(servers):  # the router first, so no request reaches a stopping worker
            stop(server)
        print("\n".join(s.tail() for s in servers))
