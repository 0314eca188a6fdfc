"""Many hosts on one machine, serving the default model: each worker in its own network namespace,
reached over its own veth link from a router in the root namespace, by static address (cut one link
and the router routes around it; cut the link of the worker a request is streaming from and the
router's keepalive notices, so the stream resumes on the other worker) or by self-registration (cut
the link and the worker expires; mend it and the worker's heartbeats bring it back). Needs root
(network namespaces); skipped with the reason otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc

from tests.integration.default_model import START_TIMEOUT_S, default_model, start_router
from tests.integration.processes import Server, spawn, stop, wait_until, write_config
from tierserve.domain.config import RouterConfig
from tierserve.rpc.calls import list_workers

pytestmark = pytest.mark.integration

# Health checks time out after 2 s; a few rounds more for the router to notice a cut link.
CUT_NOTICED_S = 20.0
BLACKHOLE_METRIC = "4242"
# A stream cut mid-way: the router's keepalive (defaults) notices within about ping interval plus
# timeout; the rest of the stream is then generated on the other worker, a few seconds more.
_ROUTER = RouterConfig()
KEEPALIVE_NOTICES_S = _ROUTER.keepalive_time_s + _ROUTER.keepalive_timeout_s
STREAM_RESUMED_S = KEEPALIVE_NOTICES_S + 35.0
# A story to continue: the model goes on past STORY_TOKENS (an instruction such as "Write a long
# story ..." is answered at once with its end-of-turn token).
STORY = "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper who"
STORY_TOKENS = 48
CUT_AFTER_TOKENS = 3


@dataclass
class Host:
    """A namespace standing for a host, linked to the root namespace by a veth pair (a /30)."""

    namespace: str
    link: str  # the veth end in the root namespace; setting it down cuts the host off
    address: str  # the veth end inside the namespace, where the worker listens
    near: str  # the veth end in the root namespace, where a router may listen
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
    return Host(namespace, link, far, near, prefix)


def _remove_host(namespace: str, link: str, subnet: str) -> None:
    # Deleting the namespace destroys its veth end, and with it ours; delete ours too in case the
    # namespace never got it.
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    subprocess.run(["ip", "link", "del", link], capture_output=True)
    subprocess.run(
        ["ip", "route", "del", "blackhole", subnet, "metric", BLACKHOLE_METRIC], capture_output=True
    )


@contextmanager
def namespaced_hosts(count: int) -> Iterator[list[Host]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add); run as root to test many hosts")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip` command")
    tag = str(os.getpid() % 100_000)
    # Per-run subnets (10.77.x.0/30), so two runs on one machine do not collide.
    base = os.getpid() % 120 * 2
    hosts: list[Host] = []
    try:
        for index in range(count):
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


@pytest.fixture
def two_hosts() -> Iterator[list[Host]]:
    with namespaced_hosts(2) as hosts:
        yield hosts


@pytest.fixture
def one_host() -> Iterator[Host]:
    with namespaced_hosts(1) as hosts:
        yield hosts[0]


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
        request = generate_pb2.GenerateRequest(prompt="The capital of France is", max_new_tokens=6)
        responses = list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60))
    summary: generate_pb2.Summary = responses[-1].summary
    assert summary.generated_tokens == 6 and "Paris" in summary.text, summary
    return summary


def in_namespace(pid: int, namespace: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{namespace}").st_ino


@contextmanager
def pool_across_hosts(
    tmp_path: Path, hosts: list[Host], workers: dict[str, str], policy: str
) -> Iterator[tuple[str, list[Server]]]:
    """A worker per host (name -> tier, in host order), each listening on its veth address only, and
    a router in the root namespace dialling them by static address, once all serve: the router's
    address, and the servers (the workers in order, then the router). Stopped and logged after."""
    cpus = sorted(os.sched_getaffinity(0))
    names = list(workers)
    pool = write_config(
        tmp_path / "pool.toml",
        default_model(
            workers=[
                {
                    "name": name,
                    "tier": workers[name],
                    "host": host.address,  # inside its namespace, only its veth address
                    "cores": [cpus[index % len(cpus)]],
                    "warmup_runs": 0,
                }
                for index, (name, host) in enumerate(zip(names, hosts, strict=True))
            ]
        ),
    )
    servers: list[Server] = []
    try:
        for name, host in zip(names, hosts, strict=True):
            prefix = ["ip", "netns", "exec", host.namespace]
            servers.append(spawn(name, ["worker", "--name", name], pool, tmp_path, prefix))
        wait_until(lambda: all(s.port() for s in servers), "the workers listen", servers, START_TIMEOUT_S)
        for server, host in zip(servers, hosts, strict=True):
            assert in_namespace(server.process.pid, host.namespace)
        router_config = write_config(
            tmp_path / "router.toml",
            default_model(
                router={"port": 0, "health_interval_s": 0.3, "policy": policy},
                workers=[
                    {"name": name, "tier": workers[name], "address": f"{host.address}:{server.port()}"}
                    for name, host, server in zip(names, hosts, servers, strict=True)
                ],
            ),
        )
        router = spawn("router", ["router"], router_config, tmp_path)
        servers.append(router)
        wait_until(router.port, "the router listens", servers, 60)
        address = f"127.0.0.1:{router.port()}"

        def all_serving() -> bool:
            return all(health(address, name) == router_pb2.WORKER_HEALTH_SERVING for name in names)

        wait_until(all_serving, "the workers serve across their links", servers, START_TIMEOUT_S)
        listed = statuses(address)
        for name, host in zip(names, hosts, strict=True):
            assert listed[name].address.startswith(f"{host.address}:")
        yield address, servers
    finally:
        for server in reversed(servers):  # the router first, so no request reaches a stopping worker
            stop(server)
        print("\n".join(s.tail() for s in servers))


def test_router_reaches_workers_in_other_namespaces_and_routes_around_a_cut_link(
    tmp_path: Path, two_hosts: list[Host]
) -> None:
    # Accuracy-blind, so every worker takes turns (slo would keep to fp32, the most accurate,
    # while both are fast enough).
    workers = {"near": "fp32", "far": "bf16"}
    with pool_across_hosts(tmp_path, two_hosts, workers, "round_robin") as (address, servers):
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


def test_a_stream_whose_link_is_cut_resumes_on_the_other_worker(
    tmp_path: Path, two_hosts: list[Host]
) -> None:
    # One tier on both hosts (greedy, deterministic: the resumed text can be checked exactly);
    # first_healthy sends the request to "near", the first configured.
    workers = {"near": "fp32", "far": "fp32"}
    with pool_across_hosts(tmp_path, two_hosts, workers, "first_healthy") as (address, servers):
        request = generate_pb2.GenerateRequest(prompt=STORY, max_new_tokens=STORY_TOKENS, request_id="cut")
        responses: list[generate_pb2.GenerateResponse] = []
        cut_at = 0.0
        with grpc.insecure_channel(address) as channel:
            # The deadline is far past the bound: a stream nobody notices is stalled fails the bound.
            for response in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=180):
                responses.append(response)
                if len(responses) == CUT_AFTER_TOKENS:
                    # Mid-stream: no FIN, no RST reaches the router, only silence.
                    _ip("link", "set", two_hosts[0].link, "down")
                    cut_at = time.monotonic()
        completed_in_s = time.monotonic() - cut_at
        assert cut_at, f"the stream ended after {len(responses)} responses, before the cut"

        tokens = [r.token for r in responses[:-1]]
        summary = responses[-1].summary
        assert responses[-1].HasField("summary") and summary.request_id == "cut"
        assert [t.index for t in tokens] == list(range(len(tokens))), (
            f"indexes repeated or missing across the seam: {[(t.index, t.text) for t in tokens]} {summary}"
        )
        assert summary.generated_tokens == len(tokens) and "".join(t.text for t in tokens) == summary.text
        assert (summary.worker_id, list(summary.failed_workers)) == ("far", ["near"]), summary
        seam = summary.resumed_after_tokens
        assert CUT_AFTER_TOKENS <= seam < len(tokens), summary
        assert "near UNAVAILABLE" in summary.routing_reason, summary.routing_reason
        assert completed_in_s < STREAM_RESUMED_S, (
            f"the stream completed {completed_in_s:.1f} s after its worker's link was cut "
            f"(keepalive should notice within about {KEEPALIVE_NOTICES_S:.0f} s)"
        )
        # After the seam, exactly what a worker of the same tier makes of the prompt plus the text
        # before it: nothing repeated, nothing skipped.
        before = "".join(t.text for t in tokens[:seam])
        continuation = generate_pb2.GenerateRequest(prompt=STORY + before, max_new_tokens=len(tokens) - seam)
        with grpc.insecure_channel(address) as channel:
            again = list(router_pb2_grpc.RouterStub(channel).Generate(continuation, timeout=120))
        assert again[-1].summary.worker_id == "far"
        assert "".join(t.text for t in tokens[seam:]) == again[-1].summary.text
        assert servers[0].process.poll() is None  # cut off, not dead


def test_a_worker_on_another_host_registers_over_its_link_and_rejoins_after_a_cut(
    tmp_path: Path, one_host: Host
) -> None:
    ttl_s = 3.0
    # The worker's registration token, bound to its id; router and worker read the same file here.
    (tmp_path / "registration.txt").write_text("remote-secret remote-host remote\n")
    security = {"registration_token_file": str(tmp_path / "registration.txt")}
    # The router listens on its end of the link only; the worker, inside its namespace, on its own.
    router, address = start_router(
        tmp_path,
        one_host.near,
        router={"host": one_host.near, "port": 0, "health_interval_s": 0.3, "registration_ttl_s": ttl_s},
        security=security,
    )
    servers = [router]
    try:
        worker_config = write_config(
            tmp_path / "worker.toml",
            default_model(
                security=security,
                workers=[
                    {
                        "name": "remote",
                        "tier": "fp32",
                        "host": one_host.address,
                        "cores": [sorted(os.sched_getaffinity(0))[0]],
                        "warmup_runs": 0,
                        "register_with": address,
                        "heartbeat_interval_s": 0.5,
                    }
                ],
            ),
        )
        prefix = ["ip", "netns", "exec", one_host.namespace]
        worker = spawn("worker", ["worker", "--name", "remote"], worker_config, tmp_path, prefix)
        servers.append(worker)

        def serving() -> bool:
            return health(address, "remote") == router_pb2.WORKER_HEALTH_SERVING

        wait_until(serving, "the worker registers across its link and serves", servers, START_TIMEOUT_S)
        assert in_namespace(worker.process.pid, one_host.namespace)
        status = statuses(address)["remote"]
        assert status.registered and status.address == f"{one_host.address}:{worker.port()}"
        assert generate(address).worker_id == "remote"

        _ip("link", "set", one_host.link, "down")  # the heartbeats cannot reach the router now
        wait_until(
            lambda: "remote" not in statuses(address),
            "the cut-off worker expires",
            servers,
            ttl_s + CUT_NOTICED_S,
        )
        assert worker.process.poll() is None  # cut off, not dead
        _ip("link", "set", one_host.link, "up")
        wait_until(serving, "the worker's heartbeats bring it back", servers, CUT_NOTICED_S)
        assert generate(address).worker_id == "remote"
        log = worker.log.read_text()
        # One warning for the whole outage, then registered again.
        assert log.count(f"registration with router {address} failed") == 1
        assert log.count(f"registered with router {address} as remote") == 2
    finally:
        for server in servers:  # the router first
            stop(server)
        print("\n".join(s.tail() for s in servers))
