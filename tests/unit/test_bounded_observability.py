"""Bounded observability: the metric series of workers that leave the pool (DNS churn, expired
registrations) are removed, and the /metrics HTTP servers bound their connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from tierserve_client.v1 import generate_pb2

from tests.unit.scrape import Samples, parse, scrape
from tierserve.domain.config import parse_config
from tierserve.router import pool as router_pool
from tierserve.router.app import Router, build_router
from tierserve.router.registration import OPEN_REGISTRANT
from tierserve.rpc.metrics import serve_metrics


def traffic(router: Router, tier: str, worker: str) -> None:
    """Every per-worker series a request can leave."""
    metrics = router.metrics
    request = generate_pb2.GenerateRequest(prompt="p", max_token_latency_ms=50)
    for index in range(2):
        metrics.token(
            tier, worker, generate_pb2.Token(index=index, latency_us=10_000), 0.02 if not index else None
        )
    metrics.completed(tier, worker, request, met=True)
    metrics.failed_over(tier, worker, grpc.StatusCode.UNAVAILABLE, resumed=True)
    metrics.finished(tier, worker, None)
    metrics.finished(tier, worker, grpc.StatusCode.CANCELLED)


def workers_in(samples: Samples) -> set[str]:
    return {dict(labels)["worker"] for (_, labels) in samples if "worker" in dict(labels)}


def read(router: Router) -> Samples:
    return parse(generate_latest(router.metrics.registry).decode())


def test_series_of_workers_that_dns_no_longer_lists_are_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = "10.0.0.1:50061", "10.0.0.2:50061"
    answers = [[a, b], [b]]

    async def fake_resolve(address: str) -> list[str]:
        return answers.pop(0)

    monkeypatch.setattr(router_pool, "resolve", fake_resolve)
    config = parse_config({"workers": [{"name": "pod", "tier": "fp32", "address": "dns:///pods:50061"}]})

    async def scenario() -> tuple[Samples, Samples]:
        router = build_router(config)
        await router.pool.discover()
        for address in (a, b):
            traffic(router, "fp32", f"pod@{address}")
        before = read(router)
        await router.pool.discover()  # pod a left the answer
        after = read(router)
        await router.pool.close()
        return before, after

    before, after = asyncio.run(scenario())
    assert workers_in(before) == {f"pod@{a}", f"pod@{b}"}
    assert workers_in(after) == {f"pod@{b}"}
    # Pod b's figures are untouched.
    assert {k: v for k, v in before.items() if f"pod@{b}" in str(k)} == {
        k: v for k, v in after.items() if f"pod@{b}" in str(k)
    }


def test_series_of_expired_registrations_are_removed() -> None:
    clock = [1000.0]
    config = parse_config({"router": {"registration_ttl_s": 10}, "workers": [{"name": "w", "tier": "bf16"}]})

    async def scenario() -> tuple[Samples, Samples]:
        router = build_router(config, clock=lambda: clock[0])
        router.pool.register("reg-0", "127.0.0.1:1", "fp32", OPEN_REGISTRANT)
        traffic(router, "fp32", "reg-0")
        traffic(router, "bf16", "w")
        before = read(router)
        clock[0] += 11  # no heartbeat in time
        await router.pool.expire()
        after = read(router)
        await router.pool.close()
        return before, after

    before, after = asyncio.run(scenario())
    assert workers_in(before) == {"reg-0", "w"}
    assert workers_in(after) == {"w"}


def test_the_metrics_server_bounds_its_connections() -> None:
    registry = CollectorRegistry()
    Counter("tierserve_test_scrapes", "A counter to serve", registry=registry).inc()
    endpoint = serve_metrics(registry, "127.0.0.1", 0, max_connections=2, timeout_s=1.0)
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        assert scrape(url)[("tierserve_test_scrapes_total", ())] == 1
        # Two connections that send nothing hold both places: a third is closed at once.
        idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) for _ in range(2)]
        time.sleep(0.2)  # accepted and handed to their threads
        third = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)
        assert third.recv(1) == b"", "a connection past the bound was served"
        third.close()
        # One that drips its request a byte at a time is cut at the timeout, like the idle ones.
        started = time.monotonic()
        for connection in idle:
            assert connection.recv(1) == b""
        assert time.monotonic() - started < 3.0
        dripping = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)
        stop = threading.Event()

        def drip() -> None:
            with contextlib.suppress(OSError):
                for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 200:
                    if stop.is_set():
                        return
                    dripping.send(bytes([byte]))
                    time.sleep(0.05)

        dripper = threading.Thread(target=drip, daemon=True)
        started = time.monotonic()
        dripper.start()
        assert dripping.recv(1) == b""
        assert time.monotonic() - started < 3.0, "a dripping connection outlived the timeout"
        stop.set()
        dripper.join()
        dripping.close()
        for connection in idle:
            connection.close()
        # Places come back: scrapes work again.
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert reply.status == 200
    finally:
        endpoint.close()
