"""The launcher waits for loading workers as long as they make progress: a first start may build a
tier and score its card for longer than any fixed timeout, while a worker that goes silent is named."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from tierserve.domain.config import parse_config
from tierserve.ops.launcher import LaunchError, ManagedProcess, PoolLauncher


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[PoolLauncher]:
    config = parse_config({"workers": [{"name": "a", "tier": "fp32"}]})
    pool = PoolLauncher(config, tmp_path, Console(quiet=True))
    alive = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    pool.router = ManagedProcess("router", alive[0], tmp_path / "router.log", tmp_path / "router.port")
    pool.workers = [ManagedProcess("worker a", alive[1], tmp_path / "worker-a.log", tmp_path / "a.port")]
    yield pool
    for process in alive:
        process.kill()
        process.wait()


def progress(log: Path, lines: int, every_s: float) -> None:
    for done in range(lines):
        with log.open("a") as out:
            out.write(
                f"2026-12-03 16:08:31,326 INFO tierserve.worker.server: measuring accuracy ({done}/9)\n"
            )
        time.sleep(every_s)


def test_a_worker_logging_progress_is_waited_for_past_the_quiet_timeout(
    launcher: PoolLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    writer = threading.Thread(target=progress, args=(launcher.workers[0].log_path, 8, 0.25))
    writer.start()
    # Serving once its progress has run for 2 s: four times the quiet timeout.
    monkeypatch.setattr(
        launcher, "_serving_workers", lambda address: {"a"} if time.monotonic() - started > 2.0 else set()
    )
    launcher._wait_until_serving(quiet_timeout_s=0.5)
    writer.join()
    assert time.monotonic() - started > 2.0
    assert "measuring accuracy (" in launcher.workers[0].last_log_line("tierserve.worker.server")


def test_a_silent_worker_ends_the_wait_naming_it(
    launcher: PoolLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "_serving_workers", lambda address: set())
    progress(launcher.workers[0].log_path, 1, 0)
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"workers not serving, their logs silent for 1 s: worker a"):
        launcher._wait_until_serving(quiet_timeout_s=1.0)
    assert 1.0 <= time.monotonic() - started < 10
