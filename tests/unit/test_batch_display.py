"""Each worker's continuous batch as the router shows it: ListWorkers, WatchStats, the Prometheus
gauges and `tierserve top`, from fake workers whose Describe reports a batch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from rich.console import Console
from tierserve_client.v1 import router_pb2, worker_pb2

from tests.unit.fake_pool import FakeWorker, running_pool
from tierserve.cli.render import batch_cell, kv_cell, top_table, workers_table
from tierserve.router.occupancy import batch_occupancy


@dataclass
class BatchingWorker(FakeWorker):
    """A fake worker that reports a continuous batch in its Describe (changed by the test)."""

    batch: worker_pb2.BatchState = field(default_factory=worker_pb2.BatchState)

    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        info = await super().Describe(request, context)
        info.batch.CopyFrom(self.batch)
        return info


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


def batch_state(running: int, waiting: int = 0, used: int = 0) -> worker_pb2.BatchState:
    return worker_pb2.BatchState(
        enabled=True,
        running=running,
        waiting=waiting,
        max_batch=16,
        kv_tokens_used=used,
        kv_tokens_budget=32768,
        kv_cache_mb=used / 32768 * 384,
    )


def test_occupancy_is_the_workers_batch_with_shares_and_age() -> None:
    shown = batch_occupancy(batch_state(4, 1, 8192), age_s=1.5)
    assert (shown.enabled, shown.running, shown.waiting, shown.max_batch) == (True, 4, 1, 16)
    assert shown.occupancy == pytest.approx(0.25) and shown.kv_share == pytest.approx(0.25)
    assert shown.kv_tokens_used == 8192 and shown.kv_cache_mb == pytest.approx(96.0)
    assert shown.age_ms == 1500
    # One at a time: no budget, no KV share.
    alone = batch_occupancy(worker_pb2.BatchState(enabled=False, running=1, max_batch=1), age_s=0.0)
    assert not alone.enabled and alone.occupancy == 1.0 and alone.kv_share == 0.0


def _render(table: object) -> str:
    console = Console(record=True, width=400)
    console.print(table)
    return console.export_text()


def test_list_workers_watch_stats_metrics_and_top_show_each_workers_batch() -> None:
    batching = BatchingWorker("bf16-0", "bf16", batch=batch_state(3, 1, 4096))
    single = BatchingWorker(
        "fp32-0", "fp32", cores=[1], batch=worker_pb2.BatchState(enabled=False, running=0, max_batch=1)
    )
    plain = FakeWorker("int4-0", "int4-woq", cores=[2])  # an older worker: no batch in its Describe

    async def scenario() -> None:
        async with running_pool([batching, single, plain]) as pool:
            listed = {
                w.worker_id: w for w in (await pool.stub.ListWorkers(router_pb2.ListWorkersRequest())).workers
            }
            bf16 = listed["bf16-0"].batch
            assert (bf16.running, bf16.waiting, bf16.max_batch, bf16.kv_tokens_used) == (3, 1, 16, 4096)
            assert bf16.occupancy == pytest.approx(3 / 16) and bf16.kv_share == pytest.approx(0.125)
            assert bf16.age_ms < 5000
            assert not listed["fp32-0"].batch.enabled
            assert not listed["int4-0"].HasField("batch")

            # The worker's batch grows; the router's view follows at its next Describe.
            batching.batch = batch_state(12, 0, 20000)
            stats = pool.stub.WatchStats(router_pb2.WatchStatsRequest(interval_ms=100))
            async for snapshot in stats:
                shown = {w.worker_id: w for w in snapshot.workers}
                if shown["bf16-0"].batch.running == 12:
                    break
            stats.cancel()
            assert shown["bf16-0"].batch.kv_tokens_used == 20000

            registry = pool.servicer.metrics.registry
            labels = {"worker": "bf16-0", "tier": "bf16"}
            assert registry.get_sample_value("tierserve_router_worker_batch_running", labels) == 12
            assert registry.get_sample_value("tierserve_router_worker_batch_max", labels) == 16
            assert registry.get_sample_value("tierserve_router_worker_kv_cache_tokens", labels) == 20000
            assert (
                registry.get_sample_value("tierserve_router_worker_kv_cache_budget_tokens", labels) == 32768
            )
            fp32 = {"worker": "fp32-0", "tier": "fp32"}
            assert registry.get_sample_value("tierserve_router_worker_batch_max", fp32) == 1
            # No series for a worker that never reported a batch.
            int4 = {"worker": "int4-0", "tier": "int4-woq"}
            assert registry.get_sample_value("tierserve_router_worker_batch_running", int4) is None

            top = _render(top_table(snapshot))
            table = _render(workers_table(list(snapshot.workers)))
            assert "12/16" in top and "20.0k/32.8k (61%, 234 MiB)" in top
            assert "12/16" in table and "off" in table

    run(scenario)


def test_cells_mark_waiting_stale_and_missing_figures() -> None:
    status = router_pb2.WorkerStatus(batch=batch_occupancy(batch_state(16, 3, 900), age_s=12.0))
    assert batch_cell(status) == "16/16 +3 (12s ago)"
    assert kv_cell(status) == "900/32.8k (3%, 11 MiB)"
    assert batch_cell(router_pb2.WorkerStatus()) == "-" and kv_cell(router_pb2.WorkerStatus()) == "-"
