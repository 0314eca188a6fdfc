"""Against the live pool: Prometheus figures move with traffic on the router and on the worker that
served, the SDK streams typed tokens, and the Node.js example client streams from the router."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from tierserve_client import Client, ClientOptions, GenerateParams

from tests.integration.conftest import LivePool
from tests.node_client import node_client_command
from tests.unit.scrape import Samples, scrape, total, value
from tierserve.worker.batching.engine import HOLD_REASONS

pytestmark = pytest.mark.integration


def metrics(pool: LivePool, process: str) -> Samples:
    """Scrape a process of the pool by its slug ("router", "worker-bf16-0"): its port is in the run dir."""
    port = int((pool.run_dir / f"{process}.metrics.port").read_text().strip())
    return scrape(f"http://127.0.0.1:{port}/metrics")


def test_metrics_move_after_traffic(live_pool: LivePool) -> None:
    labels = {"tier": "bf16", "worker": "bf16-0"}
    router_before = metrics(live_pool, "router")
    worker_before = metrics(live_pool, "worker-bf16-0")
    assert value(worker_before, "tierserve_worker_ready", **labels) == 1
    assert value(worker_before, "tierserve_worker_model_load_seconds", **labels) > 0
    assert value(router_before, "tierserve_router_worker_up", worker="bf16-0", tier="bf16") == 1

    with Client(ClientOptions(live_pool.router_address, timeout_s=120)) as client:
        stream = client.stream("The capital of France is", GenerateParams(max_new_tokens=6, tier="bf16"))
        tokens = list(stream)
    assert stream.summary is not None and stream.summary.worker_id == "bf16-0"
    assert len(tokens) == stream.summary.generated_tokens and all(t.latency_us > 0 for t in tokens)

    def moved(before: Samples, after: Samples, name: str, **extra: str) -> float:
        return value(after, name, **labels, **extra) - value(before, name, **labels, **extra)

    grpc_calls = {"status": "ok", "protocol": "grpc"}
    # A call's counters move when the call ends, which can be just after the client has its summary.
    deadline = time.monotonic() + 10
    while True:
        router_after = metrics(live_pool, "router")
        worker_after = metrics(live_pool, "worker-bf16-0")
        ended = [
            moved(router_before, router_after, "tierserve_router_requests_total", **grpc_calls),
            moved(worker_before, worker_after, "tierserve_worker_requests_total", status="ok"),
        ]
        if all(ended) or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    assert moved(router_before, router_after, "tierserve_router_requests_total", **grpc_calls) == 1
    assert moved(router_before, router_after, "tierserve_router_ttft_seconds_count", protocol="grpc") == 1
    assert moved(router_before, router_after, "tierserve_router_tpot_seconds_count") == len(tokens) - 1
    assert moved(router_before, router_after, "tierserve_router_tokens_total") == len(tokens)
    decisions_before = total(router_before, "tierserve_router_routing_decisions_total", reason="pinned")
    decisions_after = total(router_after, "tierserve_router_routing_decisions_total", reason="pinned")
    assert decisions_after - decisions_before == 1
    assert moved(worker_before, worker_after, "tierserve_worker_requests_total", status="ok") == 1
    assert moved(worker_before, worker_after, "tierserve_worker_tpot_seconds_count") == len(tokens) - 1
    assert moved(worker_before, worker_after, "tierserve_worker_ttft_seconds_sum") == pytest.approx(
        tokens[0].latency_us / 1e6
    )
    # The batching worker counts why requests waited first in its queue: one request alone, never.
    for reason in HOLD_REASONS:
        assert value(worker_after, "tierserve_worker_batch_holds_total", **labels, reason=reason) == 0


def test_node_client_streams_from_the_router(live_pool: LivePool) -> None:
    command = node_client_command(
        live_pool.router_address, "--max-new-tokens", "5", "--tier", "fp32", "Hello"
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    token_lines = [line for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    summary = re.search(r"summary: worker fp32-0 \(fp32\), (\d+) tokens", done.stdout)
    assert summary is not None, done.stdout
    assert 1 <= len(token_lines) == int(summary.group(1)) <= 5
    assert all(re.match(r"^\s*\d+\s+\d+\.\d ms ", line) for line in token_lines)
