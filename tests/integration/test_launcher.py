"""The launcher and standalone processes on a tiny random model: fast, but real processes and real pinning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.tiny_model import build_tiny_model_dir
from tierserve.domain.config import config_to_toml, parse_config
from tierserve.rpc.calls import is_serving

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "tierserve.cli"]
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def start_pool(config: Path, tmp_path: Path) -> tuple[str, subprocess.Popen[bytes], Path]:
    """`tierserve up --config CONFIG` in the background, once it serves: (router address, the
    launcher process, its log). The caller stops it."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = subprocess.Popen(
        [*CLI, "up", "--config", str(config), "--run-dir", str(run_dir)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    address_file = run_dir / "router.address"
    try:
        wait_for(
            lambda: address_file.exists() and "serving on" in log.read_text(), launcher, log, START_TIMEOUT_S
        )
    except BaseException:
        launcher.kill()
        launcher.wait(timeout=60)
        raise
    return address_file.read_text().strip(), launcher, log


def write_config(path: Path, model: Path, workers: list[dict[str, object]]) -> Path:
    data = {
        "model": {"path": str(model)},
        "router": {"port": 0, "http_port": 0, "health_interval_s": 0.3},
        "workers": workers,
    }
    path.write_text(config_to_toml(parse_config(data)))
    return path


def wait_for(condition: object, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"process exited or timed out (code {process.poll()}):\n{log.read_text(errors='replace')}"
            )
        time.sleep(0.3)


def test_dry_run_prints_the_pool_without_starting_it(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(
        tmp_path / "pool.toml", tiny_model, [{"name": "only", "tier": "bf16", "cores": "0"}]
    )
    result = subprocess.run(
        [*CLI, "up", "--config", str(config), "--dry-run"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert 'name = "only"' in result.stdout and 'tier = "bf16"' in result.stdout


def test_worker_respects_a_tighter_cpu_restriction_and_says_so(tmp_path: Path, tiny_model: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to restrict a worker to one of them")
    config = write_config(
        tmp_path / "pool.toml", tiny_model, [{"name": "w", "tier": "fp32", "cores": cpus[:2]}]
    )
    port_file, log = tmp_path / "w.port", tmp_path / "w.log"
    worker = subprocess.Popen(
        [*CLI, "worker", "--config", str(config), "--name", "w", "--port-file", str(port_file)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpus[0]}),  # as `taskset -c` or a cgroup would
    )
    try:
        wait_for(port_file.exists, worker, log, START_TIMEOUT_S)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        wait_for(lambda: is_serving(address), worker, log, START_TIMEOUT_S)
        info = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address)).Describe(
            worker_pb2.DescribeRequest()
        )
        assert list(info.cores) == [cpus[0]] and info.threads == 1
        assert any("restricted" in notice for notice in info.notices)
        assert psutil.Process(worker.pid).cpu_affinity() == [cpus[0]]
        assert "restricted" in log.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0


def test_ctrl_c_stops_router_and_workers(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(
        tmp_path / "pool.toml",
        tiny_model,
        [{"name": "a", "tier": "fp32", "warmup_runs": 0}, {"name": "b", "tier": "bf16", "warmup_runs": 0}],
    )
    address, launcher, log = start_pool(config, tmp_path)
    try:
        router = router_pb2_grpc.RouterStub(grpc.insecure_channel(address))
        request = generate_pb2.GenerateRequest(prompt="hello", max_new_tokens=3)
        assert list(router.Generate(request, timeout=60))[-1].summary.generated_tokens == 3
        assert len(psutil.Process(launcher.pid).children()) == 3  # router and two workers
        descendants = psutil.Process(launcher.pid).children(recursive=True)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(descendants, timeout=5)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        assert "stopping" in log.read_text()
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=60)


def test_a_worker_that_cannot_start_fails_the_launch_with_its_log(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(
        tmp_path / "pool.toml", tiny_model, [{"name": "w", "tier": "fp32", "cores": [4095]}]
    )
    result = subprocess.run(
        [*CLI, "up", "--config", str(config), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=START_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 1
    assert "worker w exited" in result.stderr and "change the worker's `cores`" in result.stderr
