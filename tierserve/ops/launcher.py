"""`tierserve up`: start the workers and the router as separate processes, wait until they serve,
and stop them all cleanly: the router first, drained (its streams finish), then the workers, so no
request is cut and none reaches a stopping worker."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rich.console import Console
from rich.markup import escape
from tierserve_client import Client, ClientOptions
from tierserve_client.v1 import router_pb2

from tierserve.domain.config import SecurityConfig, TierserveConfig, config_to_toml
from tierserve.ops.modelprep import prepare_model
from tierserve.ops.restarts import RestartBackoff
from tierserve.rpc.tls import first_token

STOP_TIMEOUT_S = 15.0
# A router gets its [router] drain_grace_s and this much more to exit after SIGTERM.
ROUTER_STOP_MARGIN_S = 15.0
# How often `watch` looks at the pool's processes.
WATCH_INTERVAL_S = 0.5
LOG_TAIL_LINES = 30
# A worker's progress lines while it loads ("measuring accuracy (255/2456)") come from this logger.
PROGRESS_LOGGER = " tierserve.worker.server: "
PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A process of the pool failed to start; the message carries the end of its log."""


def _die_with_parent() -> None:
    # Runs in the child before exec: if the launcher is killed outright, the kernel ends the child too.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port_file: Path
    # The command-line arguments it was started with (after `tierserve`), to start it again.
    args: list[str] = field(default_factory=list)
    backoff: RestartBackoff = field(default_factory=RestartBackoff)

    def port(self) -> int | None:
        try:
            return int(self.port_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def last_log_line(self, containing: str) -> str:
        """The last line of the log's end (its last 8 KiB) that contains `containing`, or ""."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, self.log_size() - 8192))
                tail = log.read().decode("utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return next((line for line in reversed(tail) if containing in line), "")

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise LaunchError(
                f"{self.name} exited with code {code}; end of {self.log_path}:\n{self.log_tail()}"
            )


class PoolLauncher:
    def __init__(self, config: TierserveConfig, run_dir: Path, console: Console) -> None:
        self.config = config
        self.run_dir = run_dir
        self.console = console
        self.workers: list[ManagedProcess] = []
        self.router: ManagedProcess | None = None
        self.router_address = ""
        # The router's OpenAI-compatible API ("http://127.0.0.1:8000/v1"); empty when it has none.
        self.http_url = ""
        # The config as routers see it (every local worker at its bound port), once started.
        self.resolved: TierserveConfig | None = None
        self.extra_routers: list[ManagedProcess] = []

    def start(self, quiet_timeout_s: float = 900.0) -> str:
        """Start everything and wait until every local worker serves; returns the router's address.
        A worker's first start may build its tier and score its accuracy card for many minutes, so
        the wait ends only when the workers still loading have written nothing to their logs (their
        progress lines) for `quiet_timeout_s`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        prepare_model(self.config.model, self.console)
        pool_file = self.run_dir / "pool.toml"
        pool_file.write_text(config_to_toml(self.config), encoding="utf-8")
        local = [w for w in self.config.workers if not w.address]
        for worker in local:
            self.workers.append(
                self._spawn(f"worker {worker.name}", ["worker", "--name", worker.name], pool_file)
            )
            self.workers[-1].backoff.started(time.monotonic())
        resolved = self.resolved = self._resolve_worker_ports(deadline=time.monotonic() + 120)
        router_file = self.run_dir / "router.toml"
        router_file.write_text(config_to_toml(resolved), encoding="utf-8")
        self.router = self._spawn("router", ["router"], router_file)
        router_port = self._wait_for_port(self.router, time.monotonic() + 60)
        self.router_address = f"{_dial_host(self.config.router.host)}:{router_port}"
        (self.run_dir / "router.address").write_text(self.router_address + "\n", encoding="utf-8")
        if self.config.router.http_enabled:
            self.http_url = self._wait_for_http_url(self.router, time.monotonic() + 60)
        self._wait_until_serving(quiet_timeout_s)
        return self.router_address

    def add_router(self, name: str, policy: str, timeout_s: float = 60.0) -> str:
        """Start one more router, with another policy, in front of the same running workers (benchmarks
        compare policies this way); it stops with the pool. Returns its address once it sees every
        local worker serving."""
        if self.resolved is None:
            raise LaunchError("start the pool before adding routers")
        router = self.resolved.router.model_copy(update={"policy": policy, "port": 0, "http_port": 0})
        config = self.resolved.model_copy(update={"router": router})
        config_file = self.run_dir / f"{name}.toml"
        config_file.write_text(config_to_toml(config), encoding="utf-8")
        managed = self._spawn(name, ["router"], config_file)
        self.extra_routers.append(managed)
        address = (
            f"{_dial_host(config.router.host)}:{self._wait_for_port(managed, time.monotonic() + timeout_s)}"
        )
        expected = {w.name for w in config.workers if not w.address}
        deadline = time.monotonic() + timeout_s
        while expected - self._serving_workers(address):
            managed.check_alive()
            if time.monotonic() > deadline:
                raise LaunchError(f"{name} does not see every worker serving; log:\n{managed.log_tail()}")
            time.sleep(0.2)
        return address

    def _spawn(self, name: str, args: list[str], config_file: Path, restart: bool = False) -> ManagedProcess:
        slug = name.replace(" ", "-")
        log_path = self.run_dir / "logs" / f"{slug}.log"
        port_file = self.run_dir / f"{slug}.port"
        port_file.unlink(missing_ok=True)
        port_file.with_suffix(".http.port").unlink(missing_ok=True)  # a router's, from an earlier run
        command = [
            sys.executable, "-m", "tierserve.cli", *args,
            "--config", str(config_file), "--port-file", str(port_file),
        ]  # fmt: skip
        # A restart appends, so the log keeps why the last run ended.
        with log_path.open("ab" if restart else "wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children in order
                preexec_fn=_die_with_parent,
            )
        self.console.print(f"started {name} (pid {process.pid}), log {log_path}")
        return ManagedProcess(name, process, log_path, port_file, args)

    def _wait_for_port(self, managed: ManagedProcess, deadline: float) -> int:
        while (port := managed.port()) is None:
            managed.check_alive()
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{managed.name} did not start listening in time; log:\n{managed.log_tail()}"
                )
            time.sleep(0.1)
        return port

    def _wait_for_http_url(self, managed: ManagedProcess, deadline: float) -> str:
        """The router's OpenAI-compatible API, once it listens: the router writes its port beside
        the gRPC one (router.port -> router.http.port) after the gRPC server has started."""
        port_file = managed.port_file.with_suffix(".http.port")
        while True:
            try:
                port = int(port_file.read_text(encoding="utf-8"))
                break
            except (FileNotFoundError, ValueError):
                managed.check_alive()
                if time.monotonic() > deadline:
                    raise LaunchError(
                        f"{managed.name} did not open its HTTP API in time; log:\n{managed.log_tail()}"
                    ) from None
                time.sleep(0.1)
        router = self.config.router
        scheme = "https" if self.config.security.router_tls else "http"
        return f"{scheme}://{_dial_host(router.http_host or router.host)}:{port}/v1"

    def _resolve_worker_ports(self, deadline: float) -> TierserveConfig:
        """The config as the router must see it: every local worker at the port it really bound."""
        workers = []
        local = iter(self.workers)
        for worker in self.config.workers:
            if not worker.address:
                port = self._wait_for_port(next(local), deadline)
                worker = worker.model_copy(update={"port": port})
            workers.append(worker)
        return self.config.model_copy(update={"workers": workers})

    def _wait_until_serving(self, quiet_timeout_s: float) -> None:
        assert self.router is not None
        expected = {w.name for w in self.config.workers if not w.address}
        by_name = {m.name: m for m in self.workers}
        logged, progress_at = -1, time.monotonic()
        with self.console.status("waiting for workers to load and warm up") as status:
            while True:
                for managed in [self.router, *self.workers]:
                    managed.check_alive()
                serving = self._serving_workers(self.router_address)
                waiting = [by_name[f"worker {name}"] for name in sorted(expected - serving)]
                if not waiting:
                    return
                size = sum(m.log_size() for m in waiting)
                if size != logged:
                    logged, progress_at = size, time.monotonic()
                    stage = waiting[0].last_log_line(PROGRESS_LOGGER).partition(PROGRESS_LOGGER)[2]
                    names = ", ".join(m.name.removeprefix("worker ") for m in waiting)
                    status.update(
                        f"waiting for workers to load and warm up: {names}"
                        + (f" ({waiting[0].name}: {escape(stage)})" if stage else "")
                    )
                if time.monotonic() - progress_at > quiet_timeout_s:
                    raise LaunchError(
                        f"workers not serving, their logs silent for {quiet_timeout_s:.0f} s: "
                        + ", ".join(m.name for m in waiting)
                    )
                time.sleep(0.5)

    def _serving_workers(self, router_address: str) -> set[str]:
        try:
            with Client(router_client_options(self.config.security, router_address)) as client:
                listed = client.list_workers(timeout_s=2.0).workers
        except grpc.RpcError:
            return set()  # the router is still starting
        return {w.worker_id for w in listed if w.health == router_pb2.WORKER_HEALTH_SERVING}

    def watch(self) -> None:
        """Block while the pool runs; a dead router ends it, a dead worker is restarted with backoff."""
        assert self.router is not None
        while True:
            self.router.check_alive()
            self.supervise_workers(time.monotonic())
            time.sleep(WATCH_INTERVAL_S)

    def supervise_workers(self, now: float) -> None:
        """Schedule a restart of every worker that exited, and restart those that are due. A restart
        listens on the port the router already dials (from the resolved config)."""
        for index, managed in enumerate(self.workers):
            code = managed.process.poll()
            if code is None:
                continue
            if managed.backoff.restart_at is None:
                delay = managed.backoff.crashed(now) - now
                self.console.print(
                    f"[red]{managed.name} exited with code {code}[/]; the router routes around it; "
                    f"restarting in {delay:.0f} s. End of {managed.log_path}:\n{escape(managed.log_tail())}"
                )
            elif managed.backoff.due(now):
                restarted = self._spawn(
                    managed.name, managed.args, self.run_dir / "router.toml", restart=True
                )
                restarted.backoff = managed.backoff
                restarted.backoff.restarts += 1
                restarted.backoff.started(now)
                self.workers[index] = restarted
                self.console.print(f"restarting {managed.name} (restart {restarted.backoff.restarts})")

    def stop(self) -> None:
        """Drain the routers (SIGTERM: they refuse new requests and finish their streams within
        [router] drain_grace_s), then stop the workers; SIGKILL whatever has not exited in time. A
        second Ctrl-C or SIGTERM meanwhile is passed on: the routers stop at once."""
        routers = ([self.router] if self.router else []) + self.extra_routers
        if any(managed.process.poll() is None for managed in routers):
            self.console.print(
                f"draining the router: its streams get up to {self.config.router.drain_grace_s:.0f} s "
                "to finish (Ctrl-C again to stop at once)"
            )
        self._stop_group(routers, self.config.router.drain_grace_s + ROUTER_STOP_MARGIN_S)
        self._stop_group(self.workers, STOP_TIMEOUT_S)

    def _stop_group(self, group: list[ManagedProcess], timeout_s: float) -> None:
        for managed in group:
            if managed.process.poll() is None:
                managed.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for managed in group:
            while True:
                try:
                    managed.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                    break
                except subprocess.TimeoutExpired:
                    self.console.print(f"[yellow]{managed.name} did not stop in time; killing it[/]")
                    managed.process.kill()
                    managed.process.wait()
                    break
                except KeyboardInterrupt:
                    # Another signal: the second SIGTERM ends a drain at once (tierserve/rpc/drain.py).
                    self.console.print("stopping at once")
                    for other in group:
                        if other.process.poll() is None:
                            other.process.send_signal(signal.SIGTERM)
                    deadline = min(deadline, time.monotonic() + STOP_TIMEOUT_S)


def router_client_options(security: SecurityConfig, address: str) -> ClientOptions:
    """How the pool's own tools reach its router: TLS verified by the pool CA, the first token."""
    return ClientOptions(
        address,
        tls=security.router_tls,
        root_certificates=security.ca if security.router_tls and security.ca else None,
        token=first_token(security),
    )


def _dial_host(listen_host: str) -> str:
    return "127.0.0.1" if listen_host in ("0.0.0.0", "", "::") else listen_host


def install_stop_signals() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so Ctrl-C and SIGTERM take the same clean path."""

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)
    # Also when started in the background, where the shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
