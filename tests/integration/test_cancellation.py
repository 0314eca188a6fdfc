"""Cancellation and deadlines on the default model, through the router and straight to a worker: a
client that cancels, or whose deadline passes, stops generation on the worker within about one decode
step, and the worker takes the next request at once.

Measured from the worker's own figures, not by sleeping: its `tierserve_worker_tokens_total` counts
every token the model makes, also those made after the client left, and the next request's
`queue_time_us` is how long the worker kept the model after the stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.integration.default_pool import default_model_config, stop_pool
from tests.integration.test_launcher import start_pool
from tests.unit.scrape import scrape, total

pytestmark = pytest.mark.integration

# Greedy, this prompt goes on counting far past any length asked here (checked by `reference`).
PROMPT = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4, 5,"
# As long as the pool's limit allows, so the tokens a stop saves take seconds even on a fast CPU.
LONG = 512
REFERENCE_TOKENS = 48
# Tokens already made or on their way when the stop reaches the model: the one being computed, and
# one in transit on each hop (the worker's stream, then the router's relay).
SLACK_TOKENS = {"worker": 2, "router": 3}


@dataclass(frozen=True)
class Pool:
    router: str
    worker: str
    metrics_url: str

    def tokens_made(self) -> int:
        return int(total(scrape(self.metrics_url), "tierserve_worker_tokens_total"))

    def requests_ended(self, status: str) -> int:
        return int(total(scrape(self.metrics_url), "tierserve_worker_requests_total", status=status))

    def describe(self) -> worker_pb2.WorkerInfo:
        with grpc.insecure_channel(self.worker) as channel:
            info: worker_pb2.WorkerInfo = worker_pb2_grpc.WorkerStub(channel).Describe(
                worker_pb2.DescribeRequest(), timeout=5
            )
        return info

    def idle(self) -> bool:
        info = self.describe()
        return info.in_flight == 0 and info.queued == 0

    def queued(self) -> int:
        return int(self.describe().queued)


@dataclass(frozen=True)
class Reference:
    ttft_s: float
    tpot_s: float


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp_path = tmp_path_factory.mktemp("cancel")
    # A batch of one: the queueing tests need requests that wait for the model (a batching worker
    # would start them at once); cancellation inside a batch is tested in tests/unit/test_batching.py.
    config = default_model_config(tmp_path / "pool.toml", [("w", "bf16")], batching={"max_batch": 1})
    address, launcher, _ = start_pool(config, tmp_path)
    try:
        with grpc.insecure_channel(address) as channel:
            (worker,) = (
                router_pb2_grpc.RouterStub(channel).ListWorkers(router_pb2.ListWorkersRequest()).workers
            )
        metrics_port = (tmp_path / "run" / "worker-w.metrics.port").read_text().strip()
        yield Pool(address, worker.address, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        assert stop_pool(launcher) == 0


@pytest.fixture(scope="module")
def reference(pool: Pool) -> Reference:
    """The prompt's TTFT and TPOT on this worker, and proof that it does not stop by itself early."""
    request = generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=REFERENCE_TOKENS)
    with grpc.insecure_channel(pool.worker) as channel:
        summary = list(worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=120))[-1].summary
    assert summary.finish_reason == generate_pb2.FINISH_REASON_LENGTH, "the prompt must not end by itself"
    assert summary.generated_tokens == REFERENCE_TOKENS
    return Reference(ttft_s=summary.ttft_us / 1e6, tpot_s=summary.tpot_mean_us / 1e6)


def open_stream(
    pool: Pool, via: str, request: generate_pb2.GenerateRequest, timeout_s: float
) -> tuple[grpc.Channel, Iterator[generate_pb2.GenerateResponse]]:
    channel = grpc.insecure_channel(pool.router if via == "router" else pool.worker)
    stub = router_pb2_grpc.RouterStub(channel) if via == "router" else worker_pb2_grpc.WorkerStub(channel)
    return channel, stub.Generate(request, timeout=timeout_s)


def stream_then_stop(
    pool: Pool, via: str, end: str, reference: Reference
) -> tuple[int, float, Callable[[], None]]:
    """Start a long generation and end it by `end` (cancel after a few tokens, or a deadline that
    passes mid-stream): (tokens the client received, when it stopped, closing the channel)."""
    request = generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=LONG)
    # A deadline about ten tokens into the stream, a cancel after five.
    timeout_s = reference.ttft_s + 10 * reference.tpot_s + 0.5 if end == "deadline" else 120.0
    channel, stream = open_stream(pool, via, request, timeout_s)
    received = 0
    try:
        for response in stream:
            assert response.HasField("token"), "the long request finished instead of being stopped"
            received += 1
            if end == "cancel" and received == 5:
                stream.cancel()  # type: ignore[attr-defined]
    except grpc.RpcError as error:
        expected = grpc.StatusCode.CANCELLED if end == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.code() == expected
    stopped = time.perf_counter()
    assert 1 <= received < LONG // 2, f"{received} tokens: the stop came too early or too late"
    return received, stopped, channel.close


@pytest.mark.parametrize("end", ["cancel", "deadline"])
@pytest.mark.parametrize("via", ["worker", "router"])
def test_a_stopped_stream_stops_the_model_within_a_step_and_frees_it_at_once(
    pool: Pool, reference: Reference, via: str, end: str
) -> None:
    assert pool.idle()
    before = pool.tokens_made()
    # The worker tells a passed deadline from a cancel (both reach it as a cancelled call).
    status = "cancelled" if end == "cancel" else "deadline_exceeded"
    ended_before = pool.requests_ended(status)
    received, stopped, close = stream_then_stop(pool, via, end, reference)
    # The next request, sent the moment the client gave up, gets the model as soon as it is free.
    next_request = generate_pb2.GenerateRequest(prompt="The capital of France is", max_new_tokens=4)
    channel, stream = open_stream(pool, via, next_request, 120.0)
    first = next(stream)
    first_token_s = time.perf_counter() - stopped
    summary = list(stream)[-1].summary
    channel.close()
    close()
    assert first.HasField("token") and summary.generated_tokens == 4

    # The next request waited about one step, far less than the stopped one's remaining tokens would
    # have taken (their time scales with the CPU's speed, so it bounds the wait relatively).
    remaining_s = (LONG - received) * reference.tpot_s
    step_s = reference.tpot_s
    assert summary.queue_time_us / 1e6 < 3 * step_s + 0.25, f"waited {summary.queue_time_us} us"
    assert first_token_s < min(reference.ttft_s + 3 * step_s + 1.0, remaining_s / 2), (
        f"first token {first_token_s:.3f} s after the stop; the remaining tokens take {remaining_s:.3f} s"
    )

    # Every token the model made: the stopped request's, then the next one's.
    deadline = time.monotonic() + 10
    while not pool.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    made = pool.tokens_made() - before - summary.generated_tokens
    print(
        f"{via}/{end}: received {received}, model made {made}; next request waited "
        f"{summary.queue_time_us / 1e3:.0f} ms, first token {first_token_s * 1e3:.0f} ms after the stop "
        f"(TPOT {step_s * 1e3:.0f} ms)"
    )
    assert received <= made <= received + SLACK_TOKENS[via], (
        f"the client received {received} tokens, the model made {made}"
    )
    assert pool.requests_ended(status) == ended_before + 1


def test_cancelling_queued_requests_never_blocks_the_one_behind(pool: Pool, reference: Reference) -> None:
    """Requests cancelled while they wait for the model make no tokens, and the request behind them
    starts as soon as the one generating ends."""
    before = pool.tokens_made()
    long = generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=LONG)
    head_channel, head = open_stream(
        pool, "router", generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=24), 120.0
    )
    next(head)  # generating: the requests below queue behind it
    queued = [open_stream(pool, "worker", long, 120.0) for _ in range(2)]
    deadline = time.monotonic() + 10
    while pool.queued() < 2:
        assert time.monotonic() < deadline, "the requests never queued"
        time.sleep(0.02)
    for _, stream in queued:
        stream.cancel()  # type: ignore[attr-defined]
    last_channel, last = open_stream(
        pool, "router", generate_pb2.GenerateRequest(prompt="Paris is", max_new_tokens=3), 120.0
    )
    head_tokens = 1 + sum(r.HasField("token") for r in head)
    summary = list(last)[-1].summary
    for channel, _ in queued:
        channel.close()
    head_channel.close()
    last_channel.close()
    assert head_tokens == 24 and summary.generated_tokens == 3
    # It waited for the head's remaining tokens only, not for the cancelled requests' 400 each.
    assert summary.queue_time_us / 1e6 < 24 * reference.tpot_s + 1.0 < LONG * reference.tpot_s
    assert pool.tokens_made() - before == 24 + 3
