"""Router and worker processes for integration tests that start them one by one (not through
`tierserve up`): each logs to a file, dies with the test process, and is stopped by SIGTERM."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tierserve.domain.config import config_to_toml, parse_config

CLI = [sys.executable, "-m", "tierserve.cli"]
PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 30.0


def _die_with_parent() -> None:
    # Runs in the child before exec (kept across `ip netns exec`, which execs in place): if the
    # test process is killed outright, the kernel ends the server too.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port_file: Path

    def port(self) -> int | None:
        try:
            return int(self.port_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (exit {self.process.poll()})\n" + "\n".join(text.splitlines()[-lines:])


def write_config(path: Path, data: dict[str, Any]) -> Path:
    # A router's HTTP API on a free port too: the default (8000) would collide between tests.
    data = {**data, "router": {"http_port": 0, **data.get("router", {})}}
    path.write_text(config_to_toml(parse_config(data)), encoding="utf-8")
    return path


def spawn(name: str, args: Sequence[str], config: Path, run_dir: Path, prefix: Sequence[str] = ()) -> Server:
    """`tierserve ARGS --config CONFIG --port-file ...`, after `prefix` (e.g. `ip netns exec NS`)."""
    log, port_file = run_dir / f"{name}.log", run_dir / f"{name}.port"
    command = [*prefix, *CLI, *args, "--config", str(config), "--port-file", str(port_file)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    return Server(name, process, log, port_file)


def wait_until(
    condition: Callable[[], object], what: str, servers: Sequence[Server], timeout_s: float
) -> None:
    """Poll `condition` until true; fail with every server's log when one exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        dead = [s for s in servers if s.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            reason = (
                f"{', '.join(s.name for s in dead)} exited" if dead else f"timed out after {timeout_s:.0f} s"
            )
            pytest.fail(f"waiting until {what}: {reason}\n" + "\n".join(s.tail() for s in servers))
        time.sleep(0.2)


def stop(server: Server) -> int:
    """SIGTERM and wait (SIGKILL past the timeout); the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        return server.process.wait()
