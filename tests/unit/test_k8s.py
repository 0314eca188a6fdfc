"""deploy/k8s: Guaranteed worker pods with whole CPUs, gRPC health probes, headless Services the
router's `dns:///` addresses name, and a pool config that agrees with all of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from tierserve.domain.config import TierserveConfig, parse_config
from tierserve.domain.tiers import TIER_NAMES
from tierserve.ops.launcher import ROUTER_STOP_MARGIN_S, STOP_TIMEOUT_S

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
QUANTITY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            found.append(doc)
    return found


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.fixture(scope="module")
def config(objects: list[dict[str, Any]]) -> TierserveConfig:
    import tomllib

    return parse_config(tomllib.loads(by_kind(objects, "ConfigMap")["tierserve-config"]["data"]["pool.toml"]))


def memory_bytes(quantity: str) -> int:
    for suffix, scale in QUANTITY_SUFFIXES.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * scale
    return int(quantity)


def assert_guaranteed(name: str, container: dict[str, Any]) -> None:
    resources = container["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert requests == limits, f"{name}/{container['name']}: requests {requests} != limits {limits}"
    cpu = str(requests["cpu"])
    assert cpu.isdigit() and int(cpu) >= 1, f"{name}: CPU {cpu!r} must be a whole number of cores"
    assert memory_bytes(str(requests["memory"])) > 0


def grpc_port(container: dict[str, Any]) -> int:
    [port] = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
    return int(port)


def test_every_workload_is_guaranteed_with_grpc_health_probes(objects: list[dict[str, Any]]) -> None:
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}
    assert "tierserve-router" in workloads
    for name, workload in workloads.items():
        spec = workload["spec"]["template"]["spec"]
        assert spec["containers"], name
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{name}: selector does not match its pods"
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            assert_guaranteed(name, container)
        for container in spec["containers"]:
            port = grpc_port(container)
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == port, f"{name}: {probe} not gRPC health on {port}"


def test_router_service_selects_the_router(objects: list[dict[str, Any]]) -> None:
    service = by_kind(objects, "Service")["tierserve-router"]
    router = by_kind(objects, "Deployment")["tierserve-router"]
    assert service["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == grpc_port(
        router["spec"]["template"]["spec"]["containers"][0]
    )


def test_each_configured_worker_is_a_statefulset_behind_a_headless_service(
    objects: list[dict[str, Any]], config: TierserveConfig
) -> None:
    sets, services = by_kind(objects, "StatefulSet"), by_kind(objects, "Service")
    assert len(sets) == len(config.workers)
    for worker in config.workers:
        # The router dials every pod behind the headless Service named in the address.
        assert worker.address.startswith("dns:///"), worker.address
        host, port = worker.address.removeprefix("dns:///").rsplit(":", 1)
        service = services[host]
        assert service["spec"]["clusterIP"] == "None", f"{host} must be headless"
        assert service["spec"]["ports"][0]["port"] == int(port) == worker.port
        workload = sets[host]
        assert workload["spec"]["serviceName"] == host
        pods = workload["spec"]["template"]
        assert service["spec"]["selector"].items() <= pods["metadata"]["labels"].items()
        [container] = pods["spec"]["containers"]
        assert container["command"][-2:] == ["--name", worker.name]
        assert grpc_port(container) == worker.port
        assert worker.host == "0.0.0.0" and worker.cores == [], "pods use the cores the kubelet gives them"


def test_every_pod_is_scraped_at_its_configured_metrics_port(
    objects: list[dict[str, Any]], config: TierserveConfig
) -> None:
    assert config.metrics.enabled and config.metrics.host == "0.0.0.0", "metrics must listen on the pod IP"
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}
    expected = {"tierserve-router": config.router.metrics_port}
    for worker in config.workers:
        expected[worker.address.removeprefix("dns:///").rsplit(":", 1)[0]] = worker.metrics_port
    assert expected.keys() == workloads.keys()
    for name, port in expected.items():
        assert port > 0, f"{name}: a fixed metrics port, so the annotation can name it"
        template = workloads[name]["spec"]["template"]
        annotations = template["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/port") == str(port), f"{name}: annotation {annotations}"
        [container] = template["spec"]["containers"]
        assert {"name": "metrics", "containerPort": port} in container["ports"], name


def test_every_tier_has_a_worker_workload(objects: list[dict[str, Any]], config: TierserveConfig) -> None:
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}
    tiers: dict[str, str] = {}
    for worker in config.workers:
        host = worker.address.removeprefix("dns:///").rsplit(":", 1)[0]
        assert host in workloads, f"worker {worker.name}: no Deployment or StatefulSet named {host}"
        labels = workloads[host]["spec"]["template"]["metadata"]["labels"]
        assert labels.get("tierserve/tier") == worker.tier, (
            f"{host}: pods labelled {labels}, tier {worker.tier}"
        )
        tiers[worker.tier] = host
    missing = [tier for tier in TIER_NAMES if tier not in tiers]
    assert not missing, f"no worker Deployment or StatefulSet for tiers {missing}"


def test_no_pod_is_killed_while_it_drains(objects: list[dict[str, Any]], config: TierserveConfig) -> None:
    # The kubelet sends SIGKILL terminationGracePeriodSeconds (default 30) after SIGTERM: the
    # router's must cover its drain and the margin `tierserve up` gives it too; a worker's what
    # `tierserve up` waits for one.
    router = by_kind(objects, "Deployment")["tierserve-router"]["spec"]["template"]["spec"]
    grace = router.get("terminationGracePeriodSeconds", 30)
    assert grace >= config.router.drain_grace_s + ROUTER_STOP_MARGIN_S, (
        f"router: terminationGracePeriodSeconds {grace}, [router] drain_grace_s {config.router.drain_grace_s}"
    )
    for name, workload in by_kind(objects, "StatefulSet").items():
        grace = workload["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace >= STOP_TIMEOUT_S, f"{name}: terminationGracePeriodSeconds {grace}"
