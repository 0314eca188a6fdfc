"""Failover on real processes with the default model: `kill -9` the busiest of two bf16 workers while
it streams to concurrent requests; every request still completes with one continuous stream, the
summaries record the failover, and the launcher brings the worker back."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import psutil
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc

from tests.integration.default_pool import default_model_config, serving_count, stop_pool, worker_pid
from tests.integration.test_launcher import START_TIMEOUT_S, start_pool, wait_for
from tierserve.rpc.calls import list_workers

pytestmark = pytest.mark.integration

REQUESTS = 8
NEW_TOKENS = 48
# Each prompt's own continuation, so a resumed stream that repeated or skipped text would show.
# A story to continue: an instruction alone may be answered at once with the end-of-turn token.
PROMPT = (
    "Story {slot}. Once upon a time, in a small village by the sea, there lived an old lighthouse keeper who"
)
# One request samples: whichever worker finishes it, its summary reports the seed that replays it.
SAMPLED_SLOT, SEED = 0, 1234


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    # Two workers of one tier, so either can take over the other's requests.
    config = default_model_config(tmp_path / "pool.toml", [("a", "bf16"), ("b", "bf16")])
    address, launcher, log = start_pool(config, tmp_path)
    try:
        yield address, launcher, log
    finally:
        assert stop_pool(launcher) == 0


def test_kill_9_mid_stream_loses_no_request(pool: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    address, launcher, log = pool
    results: list[list[generate_pb2.GenerateResponse] | BaseException] = [[] for _ in range(REQUESTS)]
    streaming = threading.Event()

    def send(slot: int) -> None:
        with grpc.insecure_channel(address) as channel:
            request = generate_pb2.GenerateRequest(
                prompt=PROMPT.format(slot=slot), max_new_tokens=NEW_TOKENS, request_id=f"r{slot}"
            )
            if slot == SAMPLED_SLOT:
                request.temperature, request.seed = 0.8, SEED
            try:
                for response in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=150):
                    results[slot].append(response)  # type: ignore[union-attr]
                    if len(results[slot]) == 4:  # type: ignore[arg-type]
                        streaming.set()
            except grpc.RpcError as error:
                results[slot] = error

    threads = [threading.Thread(target=send, args=(slot,)) for slot in range(REQUESTS)]
    for thread in threads:
        thread.start()
    assert streaming.wait(timeout=60), "no stream started"

    def mid_stream() -> int:
        """Requests with tokens streamed and well short of their last."""
        return sum(
            isinstance(r, list) and 1 <= len(r) <= NEW_TOKENS - 8 and not r[-1].HasField("summary")
            for r in results
        )

    def victim_streams(workers: Sequence[router_pb2.WorkerStatus]) -> bool:
        """Whether the busiest worker surely has a request mid-stream: every request in flight is
        (the workers batch, so the requests on each decode together once past their prompts)."""
        return mid_stream() == sum(w.in_flight for w in workers)

    # The worker with the most requests on it dies at once, while it streams one of them and has at
    # least one more.
    deadline = time.monotonic() + 60
    while True:
        workers = list_workers(address).workers
        busy = max(workers, key=lambda w: w.in_flight)
        if busy.in_flight >= 2 and victim_streams(workers):
            break
        assert any(thread.is_alive() for thread in threads), "every request ended before the kill"
        assert time.monotonic() < deadline, "never a worker streaming with two requests on it"
        time.sleep(0.005)
    victim = worker_pid(launcher, busy.worker_id)
    psutil.Process(victim).kill()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads), "a request never ended"

    failovers = resumed = 0
    for slot, result in enumerate(results):
        assert not isinstance(result, BaseException), f"request r{slot} failed: {result}"
        tokens = [r.token for r in result[:-1]]
        summary = result[-1].summary
        assert summary.request_id == f"r{slot}"
        assert [t.index for t in tokens] == list(range(len(tokens))), (
            f"r{slot}: indexes have a seam: {[(t.index, t.text) for t in tokens]} {summary}"
        )
        assert "".join(t.text for t in tokens) == summary.text
        assert summary.generated_tokens == len(tokens)
        assert summary.seed == (SEED if slot == SAMPLED_SLOT else 0)
        if summary.failovers:
            assert list(summary.failed_workers) == [busy.worker_id]
            assert summary.worker_id != busy.worker_id
            assert "failover after" in summary.routing_reason
            resumed += summary.resumed_after_tokens > 0
        failovers += summary.failovers
    assert failovers >= 1, "the killed worker had requests: some must have failed over"
    assert resumed >= 1, "the killed worker was streaming: that request must have resumed elsewhere"

    # After the seam, the stream is exactly what a worker makes of the prompt plus the text before
    # it (greedy, same tier: deterministic): nothing repeated, nothing skipped.
    for slot, result in enumerate(results):
        assert isinstance(result, list)
        seam = result[-1].summary.resumed_after_tokens
        if seam and slot != SAMPLED_SLOT:
            before = "".join(r.token.text for r in result[:seam])
            continuation = generate_pb2.GenerateRequest(
                prompt=PROMPT.format(slot=slot) + before, max_new_tokens=NEW_TOKENS - seam
            )
            with grpc.insecure_channel(address) as channel:
                again = list(router_pb2_grpc.RouterStub(channel).Generate(continuation, timeout=120))
            assert "".join(r.token.text for r in result[seam:-1]) == again[-1].summary.text
            break

    # The launcher restarts the killed worker, and the router takes it back.
    wait_for(lambda: serving_count(address) == 2, launcher, log, START_TIMEOUT_S)
    assert worker_pid(launcher, busy.worker_id) != victim
    assert "restarting" in log.read_text()
