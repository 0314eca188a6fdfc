"""`dns:///NAME:PORT` discovery against a real DNS server, on the default model: a host (network
namespace) whose resolver asks a DNS server the test runs there (dnslib, on the namespace's
127.0.0.1:53), two workers on 127.0.0.2 and 127.0.0.3, and a router that finds them through the
system resolver, one worker per address; the test changes the DNS answer and the router follows it,
and keeps the workers it knows while the DNS server fails. Needs root (network namespaces); skipped
with the reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tierserve_client.v1 import router_pb2

from tests.integration.default_model import START_TIMEOUT_S, default_model
from tests.integration.processes import Server, _die_with_parent, spawn, stop, wait_until, write_config
from tests.integration.test_multihost import (
    Host,
    generate,
    health,
    in_namespace,
    namespaced_hosts,
    statuses,
)
from tierserve.rpc.calls import list_workers

pytestmark = pytest.mark.integration

NAME = "workers.tierserve.test"
WORKER_PORT = 50061
PODS = {"pod-a": "127.0.0.2", "pod-b": "127.0.0.3"}
# The router resolves every health round; a few rounds are enough to follow a change.
FOLLOW_S = 20.0


@pytest.fixture
def host() -> Iterator[Host]:
    with namespaced_hosts(1) as hosts:
        # `ip netns exec` mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf for what it runs.
        etc = Path("/etc/netns") / hosts[0].namespace
        etc.mkdir(parents=True)
        try:
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:2 timeout:1\n")
            yield hosts[0]
        finally:
            shutil.rmtree(etc, ignore_errors=True)
            if not any(Path("/etc/netns").iterdir()):
                Path("/etc/netns").rmdir()


def test_the_router_follows_a_real_dns_answer_one_worker_per_address(tmp_path: Path, host: Host) -> None:
    zone = tmp_path / "zone.json"

    def answer(*ips: str) -> None:
        zone.write_text(json.dumps({f"{NAME}.": list(ips)}), encoding="utf-8")

    def fail() -> None:
        zone.write_text(json.dumps({f"{NAME}.": None}), encoding="utf-8")  # SERVFAIL

    answer(*PODS.values())
    prefix = ["ip", "netns", "exec", host.namespace]
    dns_log = tmp_path / "dns.log"
    with dns_log.open("wb") as out:
        dns = Server(
            "dns",
            subprocess.Popen(
                [
                    *prefix,
                    sys.executable,
                    "-m",
                    "tests.integration.dns_server",
                    "--address",
                    "127.0.0.1",
                    "--port",
                    "53",
                    "--zone",
                    str(zone),
                ],
                stdout=out,
                stderr=out,
                cwd=Path(__file__).parents[2],
                preexec_fn=_die_with_parent,
            ),
            dns_log,
            tmp_path / "dns.port",
        )
    servers: list[Server] = [dns]
    try:
        wait_until(lambda: "dns server on" in dns_log.read_text(), "the DNS server listens", servers, 30)
        cpus = sorted(os.sched_getaffinity(0))
        pool = write_config(
            tmp_path / "pods.toml",
            default_model(
                workers=[
                    {
                        "name": name,
                        "tier": "fp32",
                        "host": ip,
                        "port": WORKER_PORT,
                        "cores": [cpus[index % len(cpus)]],
                        "warmup_runs": 0,
                    }
                    for index, (name, ip) in enumerate(PODS.items())
                ]
            ),
        )
        for name in PODS:
            servers.append(spawn(name, ["worker", "--name", name], pool, tmp_path, prefix))
        router_config = write_config(
            tmp_path / "router.toml",
            default_model(
                # Listens on its end of the link, so the test (outside the namespace) reaches it.
                router={"host": host.address, "port": 0, "health_interval_s": 0.3, "policy": "round_robin"},
                workers=[{"name": "pod", "tier": "fp32", "address": f"dns:///{NAME}:{WORKER_PORT}"}],
            ),
        )
        router = spawn("router", ["router"], router_config, tmp_path, prefix)
        servers.append(router)
        wait_until(router.port, "the router listens", servers, 60)
        assert in_namespace(router.process.pid, host.namespace)
        address = f"{host.address}:{router.port()}"
        ids = {name: f"pod@{ip}:{WORKER_PORT}" for name, ip in PODS.items()}

        def serving(*names: str) -> bool:
            return all(health(address, ids[n]) == router_pb2.WORKER_HEALTH_SERVING for n in names)

        wait_until(lambda: serving(*PODS), "the router finds both pods by DNS", servers, START_TIMEOUT_S)
        assert set(statuses(address)) == set(ids.values())
        # Each takes turns (a summary names the worker by its own name).
        assert {generate(address).worker_id for _ in range(2)} == set(PODS)
        # Asked over the wire, not read from /etc/hosts.
        assert f"{NAME}." in dns_log.read_text()

        answer(PODS["pod-b"])  # pod-a leaves the DNS answer (a pod that is no longer ready)
        wait_until(lambda: ids["pod-a"] not in statuses(address), "the router drops pod-a", servers, FOLLOW_S)
        assert set(statuses(address)) == {ids["pod-b"]} and servers[1].process.poll() is None
        assert [generate(address).worker_id for _ in range(2)] == ["pod-b"] * 2

        answer(*PODS.values())  # and comes back
        wait_until(lambda: serving(*PODS), "the router finds pod-a again", servers, FOLLOW_S)
        fail()  # the DNS server fails: no answer is not an empty answer
        failing = "DNS lookup failed"
        wait_until(lambda: failing in router.log.read_text(), "the lookup fails", servers, FOLLOW_S)
        time.sleep(1.0)  # a few more failed rounds
        assert set(statuses(address)) == set(ids.values()) and serving(*PODS)
        assert {generate(address).worker_id for _ in range(2)} == set(PODS)
        answer()  # the name answers nothing: the router keeps no pod, and stays up
        wait_until(lambda: not statuses(address), "the router drops every pod", servers, FOLLOW_S)
        assert list_workers(address).workers == [] and router.process.poll() is None
    finally:
        for server in reversed(servers):  # the router first
            stop(server)
        print("\n".join(s.tail() for s in servers))
