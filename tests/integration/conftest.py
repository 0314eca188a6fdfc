"""A real pool for the integration tests: `tierserve up` in a subprocess, default model, loopback, port 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from tierserve_client.v1 import router_pb2

from tierserve.domain.config import config_to_toml, parse_config
from tierserve.domain.tiers import TIER_NAMES
from tierserve.rpc.calls import list_workers

POOL_START_TIMEOUT_S = 1200
ONE_AT_A_TIME_TIER = "int8-sq"


@dataclass
class LivePool:
    router_address: str
    run_dir: Path
    launcher: subprocess.Popen[bytes]
    worker_cores: dict[str, list[int]]
    router_cores: list[int]

    def worker_addresses(self) -> dict[str, str]:
        return {w.worker_id: w.address for w in list_workers(self.router_address).workers}

    def logs(self) -> str:
        parts = []
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def pool_config_data() -> dict[str, object]:
    """Every tier, one worker each, alternating over the usable CPUs (on 2 cores: fp32 and bf16 apart)."""
    cpus = sorted(os.sched_getaffinity(0))
    workers: list[dict[str, object]] = [
        {"name": f"{tier}-0", "tier": tier, "cores": [cpus[index % len(cpus)]], "warmup_runs": 1}
        for index, tier in enumerate(TIER_NAMES)
    ]
    # One worker serves one request at a time (a batch of one), so the queueing tests have a
    # queue to look at; the others batch, as by default.
    for worker in workers:
        if worker["tier"] == ONE_AT_A_TIME_TIER:
            worker["max_batch"] = 1
    return {
        "limits": {"max_new_tokens": 256, "default_max_new_tokens": 16},
        # The router pinned too, so the pinning test sees what `[router] cores` does.
        "router": {"port": 0, "http_port": 0, "health_interval_s": 0.5, "cores": [cpus[-1]]},
        # A shorter card than the default keeps a fresh machine's first start quick.
        "data": {"eval_tokens": 384, "eval_chunk_tokens": 128},
        # Five workers on this machine's CPUs share them, on purpose.
        "placement": {"allow_shared_cores": True},
        "workers": workers,
    }


def _all_serving(address: str) -> bool:
    try:
        workers = list_workers(address, timeout_s=2.0).workers
    except grpc.RpcError:
        return False
    return bool(workers) and all(w.health == router_pb2.WORKER_HEALTH_SERVING for w in workers)


@pytest.fixture(scope="session")
def live_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LivePool]:
    run_dir = tmp_path_factory.mktemp("pool")
    config = parse_config(pool_config_data())
    config_file = run_dir / "test-pool.toml"
    config_file.write_text(config_to_toml(config))
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tierserve.cli",
            "up",
            "--config",
            str(config_file),
            "--run-dir",
            str(run_dir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=(run_dir / "launcher.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    pool = LivePool("", run_dir, launcher, {w.name: w.cores for w in config.workers}, config.router.cores)
    deadline = time.monotonic() + POOL_START_TIMEOUT_S
    address_file = run_dir / "router.address"
    while not (address_file.exists() and _all_serving(address := address_file.read_text().strip())):
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            log = (run_dir / "launcher.log").read_text(errors="replace")
            pytest.fail(f"pool did not start (launcher exit {launcher.poll()}):\n{log}\n{pool.logs()}")
        time.sleep(0.5)
    pool.router_address = address
    children = psutil.Process(launcher.pid).children(recursive=True)
    try:
        yield pool
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
        alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        print(pool.logs())
        assert not alive, f"processes left behind after SIGTERM: {alive}"
        assert launcher.returncode == 0, f"launcher exited with {launcher.returncode}"
