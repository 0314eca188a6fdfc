"""Failover on real processes: `kill -9` a worker while it streams under concurrent requests; every
request still completes, with a continuous stream, and the launcher brings the worker back."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from tests.integration.test_launcher import START_TIMEOUT_S, start_pool, tiny_model, wait_for, write_config
from tierserve.client import list_workers
from tierserve.v1 import generate_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

__all__ = ["tiny_model"]  # the module-scoped fixture, shared with the launcher tests

CLI = [sys.executable, "-m", "tierserve.cli"]
REQUESTS = 8
NEW_TOKENS = 96  # the tiny model's context is 128 tokens


def all_serving(address: str, count: int) -> bool:
    try:
        workers = list_workers(address, timeout_s=2.0).workers
    except grpc.RpcError:
        return False
    return sum(w.health == router_pb2.WORKER_HEALTH_SERVING for w in workers) == count


@pytest.fixture
def pool(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    # Two workers of one tier, so either can take over the other's requests.
    config = write_config(
        tmp_path / "pool.toml",
        tiny_model,
        [{"name": "a", "tier": "fp32", "warmup_runs": 0}, {"name": "b", "tier": "fp32", "warmup_runs": 0}],
    )
    address, launcher, log = start_pool(config, tmp_path)
    try:
        yield address, launcher, log
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)


def worker_pid(launcher: subprocess.Popen[bytes], name: str) -> int:
    for child in psutil.Process(launcher.pid).children():
        command = child.cmdline()
        if "worker" in command and command[command.index("--name") + 1] == name:
            return child.pid
    raise LookupError(f"no worker {name}")


def test_kill_9_mid_stream_loses_no_request(pool: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    address, launcher, log = pool
    results: list[list[generate_pb2.GenerateResponse] | BaseException] = [[] for _ in range(REQUESTS)]
    streaming = threading.Event()

    def send(slot: int) -> None:
        with grpc.insecure_channel(address) as channel:
            request = generate_pb2.GenerateRequest(
                prompt=f"Request {slot} says", max_new_tokens=NEW_TOKENS, request_id=f"r{slot}"
            )
            try:
                for response in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120):
                    results[slot].append(response)  # type: ignore[union-attr]
                    if len(results[slot]) == 4:  # type: ignore[arg-type]
                        streaming.set()
            except grpc.RpcError as error:
                results[slot] = error

    threads = [threading.Thread(target=send, args=(slot,)) for slot in range(REQUESTS)]
    for thread in threads:
        thread.start()
    assert streaming.wait(timeout=60), "no stream started"
    # The worker with the most requests on it dies at once, mid-stream.
    busy = max(list_workers(address).workers, key=lambda w: w.in_flight)
    victim = worker_pid(launcher, busy.worker_id)
    psutil.Process(victim).send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=120)

    failovers = 0
    for slot, result in enumerate(results):
        assert not isinstance(result, BaseException), f"request r{slot} failed: {result}"
        tokens = [r.token for r in result[:-1]]
        summary = result[-1].summary
        assert summary.request_id == f"r{slot}"
        assert [t.index for t in tokens] == list(range(len(tokens)))
        assert "".join(t.text for t in tokens) == summary.text
        assert summary.generated_tokens == len(tokens)
        if summary.failovers:
            assert list(summary.failed_workers) == [busy.worker_id]
        failovers += summary.failovers
    assert failovers >= 1, "the killed worker had requests: some must have failed over"

    # The launcher restarts the killed worker, and the router takes it back.
    wait_for(lambda: all_serving(address, 2), launcher, log, START_TIMEOUT_S)
    assert worker_pid(launcher, busy.worker_id) != victim
    assert "restarting" in log.read_text()
