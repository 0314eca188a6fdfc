"""dns:/// worker targets: one router-side worker per resolved address, following the name over time."""

from __future__ import annotations

import asyncio

import pytest

from tierserve.domain.config import parse_config
from tierserve.router import pool as router_pool
from tierserve.router.discovery import resolve, split_target
from tierserve.router.pool import WorkerPool


def test_resolves_a_name_to_ip_and_port() -> None:
    assert "127.0.0.1:50999" in asyncio.run(resolve("dns:///localhost:50999"))
    assert asyncio.run(resolve("dns:///no-such-host.invalid:1")) == []
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        split_target("dns:///nameonly")


def test_pool_keeps_one_worker_per_resolved_address(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [["10.0.0.1:50061", "10.0.0.2:50061"], ["10.0.0.2:50061", "10.0.0.3:50061"]]

    async def fake_resolve(address: str) -> list[str]:
        assert address == "dns:///tierserve-worker-fp32:50061"
        return answers.pop(0)

    monkeypatch.setattr(router_pool, "resolve", fake_resolve)
    config = parse_config(
        {
            "workers": [
                {"name": "fixed", "tier": "bf16", "port": 50070},
                {"name": "fp32", "tier": "fp32", "address": "dns:///tierserve-worker-fp32:50061"},
            ]
        }
    )

    async def scenario() -> list[list[str]]:
        pool = WorkerPool(config)
        seen = [[w.worker_id for w in pool.workers]]
        await pool.discover()
        seen.append([w.worker_id for w in pool.workers])
        await pool.discover()
        seen.append([w.worker_id for w in pool.workers])
        assert {w.tier for w in pool.workers if w.worker_id.startswith("fp32@")} == {"fp32"}
        await pool.close()
        return seen

    before, first, second = asyncio.run(scenario())
    assert before == ["fixed"]
    assert first == ["fixed", "fp32@10.0.0.1:50061", "fp32@10.0.0.2:50061"]
    assert second == ["fixed", "fp32@10.0.0.2:50061", "fp32@10.0.0.3:50061"]
