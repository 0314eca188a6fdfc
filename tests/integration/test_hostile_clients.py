"""Slow clients and request-caused faults on the default model, through a real router and workers:

- a client that stops reading its stream has it cancelled after `[limits] stream_idle_timeout_s`:
  the worker stops generating (far short of the tokens asked) and serves the next request, and the
  client's host gets its per-peer place back;
- a temperature so small that sampling overflows (1e-38; on IPEX's sampler it would quietly make
  garbage) is the request's fault: INVALID_ARGUMENT, from the router and from a worker, and every
  worker is still SERVING, in rotation and uncharged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.integration.default_pool import default_model_config, stop_pool
from tests.integration.test_launcher import start_pool
from tests.unit.scrape import scrape, total

pytestmark = pytest.mark.integration

# Greedy, this prompt goes on counting far past any length asked here.
PROMPT = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4, 5,"
LONG = 400
IDLE_TIMEOUT_S = 2.0
# A client whose flow-control window is 1 KB: the router can send it a few dozen tokens.
STALLING = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
# A temperature whose division overflows float32 for any ordinary logits.
OVERFLOWING = 1e-38


@dataclass(frozen=True)
class Pool:
    router: str
    workers: dict[str, str]
    metrics_urls: dict[str, str]

    def statuses(self) -> dict[str, router_pb2.WorkerStatus]:
        with grpc.insecure_channel(self.router) as channel:
            reply = router_pb2_grpc.RouterStub(channel).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=5
            )
        return {w.worker_id: w for w in reply.workers}

    def tokens_made(self) -> int:
        return sum(
            int(total(scrape(url), "tierserve_worker_tokens_total")) for url in self.metrics_urls.values()
        )

    def idle(self) -> bool:
        for address in self.workers.values():
            with grpc.insecure_channel(address) as channel:
                info = worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=5)
            if info.in_flight or info.queued:
                return False
        return True


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp_path = tmp_path_factory.mktemp("hostile-clients")
    config = default_model_config(
        tmp_path / "pool.toml",
        [("fp32-0", "fp32"), ("bf16-0", "bf16")],
        limits={"max_new_tokens": 512, "default_max_new_tokens": 16, "stream_idle_timeout_s": IDLE_TIMEOUT_S},
        router={"port": 0, "http_port": 0, "health_interval_s": 0.3, "max_concurrent_per_peer": 1},
    )
    address, launcher, log = start_pool(config, tmp_path)
    try:
        with grpc.insecure_channel(address) as channel:
            listed = router_pb2_grpc.RouterStub(channel).ListWorkers(router_pb2.ListWorkersRequest()).workers
        ports = {w.worker_id: tmp_path / "run" / f"worker-{w.worker_id}.metrics.port" for w in listed}
        urls = {name: f"http://127.0.0.1:{port.read_text().strip()}/metrics" for name, port in ports.items()}
        yield Pool(address, {w.worker_id: w.address for w in listed}, urls)
    finally:
        print(log.read_text(errors="replace")[-4000:])
        assert stop_pool(launcher) == 0


def generate(address: str, **fields: Any) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest(
        **{"prompt": "The capital of France is", "max_new_tokens": 4, **fields}
    )
    with grpc.insecure_channel(address) as channel:
        return list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120))


def wait_until(condition: Callable[[], bool], within_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within_s, f"{what}: not within {within_s:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_client_that_stops_reading_frees_the_worker_and_its_place(pool: Pool) -> None:
    wait_until(pool.idle, 60, "the pool is idle")
    before = pool.tokens_made()
    channel = grpc.insecure_channel(pool.router, options=STALLING)
    try:
        request = generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=LONG)
        stream = router_pb2_grpc.RouterStub(channel).Generate(request, timeout=300)
        assert next(stream).HasField("token")  # streaming; from now on nobody reads
        # The host's one place is taken meanwhile.
        with pytest.raises(grpc.RpcError) as held:
            generate(pool.router)
        assert held.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Once the window is full and the idle timeout passes, the stream is cancelled end to end.
        wait_until(pool.idle, 60, "the stalled stream's worker is free")
        made = pool.tokens_made() - before
        assert made < LONG, f"the worker generated {made} tokens for a client that stopped reading"
        # The host's place is back, and the worker serves.
        assert generate(pool.router)[-1].HasField("summary")
        stream.cancel()
    finally:
        channel.close()


def test_a_temperature_that_overflows_sampling_is_the_requests_fault(pool: Pool) -> None:
    wait_until(pool.idle, 60, "the pool is idle")
    failed_before = {w: s.requests_failed for w, s in pool.statuses().items()}
    for tier in ("fp32", "bf16"):
        with pytest.raises(grpc.RpcError) as refused:
            generate(pool.router, temperature=OVERFLOWING, seed=7, tier=tier)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        assert "temperature" in (refused.value.details() or "")
        # Right after: every worker serving, none charged with the failure.
        statuses = pool.statuses()
        assert all(s.health == router_pb2.WORKER_HEALTH_SERVING for s in statuses.values()), statuses
        assert {w: s.requests_failed for w, s in statuses.items()} == failed_before
    # Straight to a worker too.
    with grpc.insecure_channel(pool.workers["bf16-0"]) as channel:
        request = generate_pb2.GenerateRequest(prompt="Hello", temperature=OVERFLOWING, max_new_tokens=4)
        with pytest.raises(grpc.RpcError) as direct:
            list(worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=120))
    assert direct.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # And the pool goes on serving sampled requests at ordinary temperatures.
    summary = generate(pool.router, temperature=0.7, seed=7)[-1].summary
    assert summary.generated_tokens == 4 and summary.failovers == 0
