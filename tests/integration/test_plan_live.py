"""`tierserve plan --router` against the live pool of the default model: every tier measured and sized."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import LivePool
from tierserve.cli import main

pytestmark = pytest.mark.integration


def test_plan_sizes_every_served_tier_from_live_figures(
    live_pool: LivePool, capsys: pytest.CaptureFixture[str]
) -> None:
    # A budget every tier on any machine meets: the sizing, not the verdict, is under test.
    assert main(["plan", "--router", live_pool.router_address, "--session-length-s", "100000", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    tiers = {t["tier"]: t for t in plan["tiers"]}
    assert set(tiers) == {name.rsplit("-", 1)[0] for name in live_pool.worker_cores}
    for tier in tiers.values():
        assert tier["tpot_ms"] > 0 and tier["ttft_ms"] > 0 and tier["meets_budget"]
        assert tier["workers"] >= 1 and tier["ppl_delta_pct"] is not None
    assert plan["recommended_tier"] == "fp32"  # the most accurate, when every tier meets the budget
