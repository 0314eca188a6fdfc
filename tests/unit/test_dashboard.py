"""The Grafana dashboard queries only metrics the router and workers export, with their labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from tests.unit.fake_engine import worker_state
from tierserve.router.metrics import RouterMetrics
from tierserve.worker.metrics import WorkerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tierserve.json"


def exported() -> dict[str, set[str]]:
    """Every sample name the two processes can expose, with its label names."""
    names: dict[str, set[str]] = {}
    router = RouterMetrics()
    router.watch_pool(list)  # no workers: the pool's families are still described
    worker = WorkerMetrics(worker_state())
    router.requests.labels("fp32", "fp32-0", "ok", "grpc").inc()
    router.ttft.labels("fp32", "fp32-0", "grpc").observe(0.1)
    for registry in (router.registry, worker.registry):
        assert isinstance(registry, CollectorRegistry)
        for family in registry.collect():
            # Series a family exposes once it has samples (labelled counters have none before traffic).
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(
                family.type, [""]
            )
            for suffix in suffixes:
                names.setdefault(family.name + suffix, set())
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_every_dashboard_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 12
    known = exported()
    used = {name for expr in exprs for name in re.findall(r"\btierserve_[a-z0-9_]+", expr)}
    unknown = sorted(name for name in used if name not in known and name.removesuffix("_bucket") not in known)
    assert not unknown, f"dashboard queries metrics nobody exports: {unknown}"
    # The "done when": live TTFT and TPOT per tier.
    assert any("tierserve_router_ttft_seconds_bucket" in e and "tier" in e for e in exprs)
    assert any("tierserve_router_tpot_seconds_bucket" in e and "tier" in e for e in exprs)
    assert {"tier", "worker", "status"} <= known["tierserve_router_requests_total"]
