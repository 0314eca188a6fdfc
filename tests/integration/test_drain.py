"""Graceful drain of `tierserve up` on the default model: SIGTERM during four long streams turns the
router NOT_SERVING and refuses new requests (UNAVAILABLE with a retry hint) at once, every stream
still ends with its summary, and the launcher exits by itself with nothing left behind; a second
SIGTERM stops at once."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

from tests.integration.default_pool import default_model_config
from tests.integration.test_launcher import start_pool
from tierserve.rpc.calls import is_serving, list_workers

pytestmark = pytest.mark.integration

STREAMS = 4
NEW_TOKENS = 224
# A story to continue: long greedy continuations (an instruction alone may end at once).
STORY = (
    "Story {slot}. Once upon a time, in a small village by the sea, there lived an old lighthouse keeper who"
)
# Greedy, this goes on counting far past any length asked here (tests/integration/test_cancellation.py).
COUNTING = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4, 5,"
# Four default-model streams share 2 cores with everything else on this machine: far more grace
# than they need, so the test shows the drain, not this machine's speed.
DRAIN_GRACE_S = 300.0
# What "at once" allows: the launcher passing the signal on, a Python process handling it.
AT_ONCE_S = 5.0


class Streams:
    """Generate calls streaming in threads: each slot's responses so far, and the error it ended with."""

    def __init__(self, address: str, requests: list[generate_pb2.GenerateRequest]) -> None:
        self.responses: list[list[generate_pb2.GenerateResponse]] = [[] for _ in requests]
        self.errors: list[grpc.RpcError | None] = [None for _ in requests]
        self.threads = [
            threading.Thread(target=self._run, args=(address, slot, request), daemon=True)
            for slot, request in enumerate(requests)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, address: str, slot: int, request: generate_pb2.GenerateRequest) -> None:
        try:
            with grpc.insecure_channel(address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                for response in stub.Generate(request, timeout=DRAIN_GRACE_S + 120):
                    self.responses[slot].append(response)
        except grpc.RpcError as error:
            self.errors[slot] = error

    def tokens(self, slot: int) -> int:
        return sum(r.HasField("token") for r in self.responses[slot])

    def finished(self, slot: int) -> bool:
        responses = self.responses[slot]
        return self.errors[slot] is not None or bool(responses and responses[-1].HasField("summary"))

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self.threads), "a stream never ended"


def wait_until(condition: Callable[[], object], what: str, timeout_s: float, pool_dir: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s:.0f} s\n{pool_logs(pool_dir)}")
        time.sleep(0.1)


def pool_logs(pool_dir: Path) -> str:
    """The end of the launcher's log and of every process's."""
    parts = []
    for log in sorted(pool_dir.rglob("*.log")):
        parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(parts)


def start(tmp_path: Path, workers: list[tuple[str, str]]) -> tuple[str, subprocess.Popen[bytes]]:
    """`tierserve up` of these (name, tier) workers, serving: its router's address and process. Its
    log is tmp_path/launcher.log, the processes' logs are in tmp_path/run/logs."""
    config = default_model_config(
        tmp_path / "pool.toml",
        workers,
        router={"port": 0, "health_interval_s": 0.3, "drain_grace_s": DRAIN_GRACE_S},
    )
    address, launcher, _ = start_pool(config, tmp_path)
    return address, launcher


def in_flight(address: str) -> int:
    """Requests the router has in flight on its workers (streaming or waiting)."""
    return sum(w.in_flight for w in list_workers(address).workers)


def refused_while_draining(address: str) -> grpc.RpcError:
    request = generate_pb2.GenerateRequest(prompt=STORY.format(slot="late"), max_new_tokens=8)
    with grpc.insecure_channel(address) as channel:
        try:
            list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=30))
        except grpc.RpcError as error:
            return error
    pytest.fail("a new request was served while the router drained")


def test_sigterm_to_tierserve_up_lets_four_long_streams_end_with_their_summaries(tmp_path: Path) -> None:
    # One batching worker serves the four at once (one worker per stream took four warm-ups, too
    # long for these shared cores beside other pools).
    address, launcher = start(tmp_path, [("w0", "bf16")])
    try:
        descendants = psutil.Process(launcher.pid).children(recursive=True)
        streams = Streams(
            address,
            [
                generate_pb2.GenerateRequest(
                    prompt=STORY.format(slot=slot), max_new_tokens=NEW_TOKENS, request_id=f"s{slot}"
                )
                for slot in range(STREAMS)
            ],
        )
        # All four in flight at the router and streaming (in one batch, or queued behind each other
        # if the worker fell back to one request at a time: the drain must finish them either way).
        wait_until(
            lambda: in_flight(address) == STREAMS and max(map(streams.tokens, range(STREAMS))) >= 4,
            "four requests in flight",
            300,
            tmp_path,
        )
        at_signal = [streams.tokens(slot) for slot in range(STREAMS)]
        assert not any(map(streams.finished, range(STREAMS))), (at_signal, streams.errors)
        launcher.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        wait_until(lambda: not is_serving(address), "NOT_SERVING", AT_ONCE_S, tmp_path)
        refused = refused_while_draining(address)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
        hint = dict(refused.trailing_metadata() or ())
        assert int(hint["retry-after-ms"]) > 0
        assert time.monotonic() - signalled < 2 * AT_ONCE_S
        # Refused while the four still stream, not after.
        assert not all(streams.finished(slot) for slot in range(STREAMS))

        streams.join(DRAIN_GRACE_S + 60)
        for slot, responses in enumerate(streams.responses):
            assert streams.errors[slot] is None, (
                f"stream {slot} (at {at_signal[slot]}): {streams.errors[slot]}"
            )
            *tokens, last = responses
            assert last.HasField("summary"), f"stream {slot} ended without its summary"
            assert [t.token.index for t in tokens] == list(range(len(tokens)))
            assert last.summary.generated_tokens == len(tokens) > at_signal[slot]
            # Served where it started: no worker was stopped under it.
            assert last.summary.failovers == 0, last.summary.routing_reason

        # The launcher exits by itself, the router first, and leaves nothing behind.
        code = launcher.wait(timeout=60)
        _, alive = psutil.wait_procs(descendants, timeout=5)
        assert code == 0, pool_logs(tmp_path)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        router_log = (tmp_path / "run" / "logs" / "router.log").read_text()
        assert "drained: every request in flight has finished" in router_log, router_log
        assert "draining the router" in (tmp_path / "launcher.log").read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_a_second_sigterm_stops_tierserve_up_at_once(tmp_path: Path) -> None:
    address, launcher = start(tmp_path, [("w0", "bf16")])
    try:
        descendants = psutil.Process(launcher.pid).children(recursive=True)
        streams = Streams(address, [generate_pb2.GenerateRequest(prompt=COUNTING, max_new_tokens=480)])
        wait_until(lambda: streams.tokens(0) >= 4, "streaming", 300, tmp_path)
        launcher.send_signal(signal.SIGTERM)
        router_log = tmp_path / "run" / "logs" / "router.log"
        wait_until(lambda: "draining:" in router_log.read_text(), "draining", AT_ONCE_S, tmp_path)
        assert launcher.poll() is None, "the launcher did not wait for the drain"
        second = time.monotonic()
        launcher.send_signal(signal.SIGTERM)

        code = launcher.wait(timeout=60)
        _, alive = psutil.wait_procs(descendants, timeout=5)
        # Far sooner than the drain's grace (300 s) or the stream's 480 tokens.
        assert time.monotonic() - second < 30
        assert code == 0, pool_logs(tmp_path)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        streams.join(30)
        assert streams.errors[0] is not None, "the stream was not stopped"
        assert not streams.responses[0][-1].HasField("summary")
        assert "second signal: stopping now (1 requests in flight)" in router_log.read_text()
        assert "stopping at once" in (tmp_path / "launcher.log").read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
