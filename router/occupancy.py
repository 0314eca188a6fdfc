"""A worker's continuous batch as the router shows it (ListWorkers, WatchStats, `tierserve top`,
Prometheus): the worker's own Describe `batch`, with its shares and how old it is."""

from __future__ import annotations

from tierserve_client.v1 import router_pb2, worker_pb2


def batch_occupancy(batch: worker_pb2.BatchState, age_s: float) -> router_pb2.BatchOccupancy:
    """The worker's BatchState, `age_s` seconds after it answered, with running / max_batch and
    KV positions used / budget as shares from 0 to 1."""
    return router_pb2.BatchOccupancy(
        enabled=batch.enabled,
        running=batch.running,
        waiting=batch.waiting,
        max_batch=batch.max_batch,
        occupancy=_share(batch.running, batch.max_batch),
        kv_tokens_used=batch.kv_tokens_used,
        kv_tokens_budget=batch.kv_tokens_budget,
        kv_share=_share(batch.kv_tokens_used, batch.kv_tokens_budget),
        kv_cache_mb=batch.kv_cache_mb,
        age_ms=max(0, round(age_s * 1e3)),
    )


def _share(used: int, limit: int) -> float:
    # A worker that reports more than its limit (or none) is shown as it is, capped for the share.
    return min(1.0, used / limit) if limit > 0 else 0.0
