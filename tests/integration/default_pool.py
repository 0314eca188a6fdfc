"""Small pools of the default model for the reliability tests (failover, chaos, security, cancellation):
a config of a few workers, one usable CPU each in turn, with the same short card as the session pool of
conftest.py, so their tiers load from the artifact cache in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil
from tierserve_client.v1 import router_pb2

from tests.integration.conftest import pool_config_data
from tierserve.domain.config import config_to_toml, parse_config
from tierserve.rpc.calls import list_workers


def default_model_config(path: Path, workers: Sequence[tuple[str, str]], **sections: dict[str, Any]) -> Path:
    """Write a config serving the default model with these (name, tier) workers; `sections` add or
    override top-level sections (e.g. `security`)."""
    cpus = sorted(os.sched_getaffinity(0))
    data: dict[str, Any] = {
        "limits": {"max_new_tokens": 512, "default_max_new_tokens": 16},
        "router": {"port": 0, "http_port": 0, "health_interval_s": 0.3},
        # The session pool's card: its artifacts are cached already.
        "data": pool_config_data()["data"],
        # On a machine with fewer CPUs than workers they share, on purpose.
        "placement": {"allow_shared_cores": True},
        "workers": [
            {"name": name, "tier": tier, "cores": [cpus[i % len(cpus)]], "warmup_runs": 1}
            for i, (name, tier) in enumerate(workers)
        ],
        **sections,
    }
    path.write_text(config_to_toml(parse_config(data)), encoding="utf-8")
    return path


def serving_count(address: str) -> int:
    """Workers the router reports SERVING (0 while it cannot be reached)."""
    try:
        workers = list_workers(address, timeout_s=2.0).workers
    except grpc.RpcError:
        return 0
    return sum(w.health == router_pb2.WORKER_HEALTH_SERVING for w in workers)


def worker_pid(launcher: subprocess.Popen[bytes], name: str) -> int:
    """The pid of the launcher's worker process `name`."""
    for child in psutil.Process(launcher.pid).children():
        command = child.cmdline()
        if "worker" in command and command[command.index("--name") + 1] == name:
            return child.pid
    raise LookupError(f"no worker {name}")


def stop_pool(launcher: subprocess.Popen[bytes]) -> int:
    """SIGTERM the launcher and wait for it (SIGKILL after a minute); its exit code."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
    try:
        return launcher.wait(timeout=60)
    except subprocess.TimeoutExpired:
        launcher.kill()
        return launcher.wait()
