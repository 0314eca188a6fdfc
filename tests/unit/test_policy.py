"""The routing interface with fake workers: pinned tiers, health, and clear refusals."""

import pytest

from tests.unit.fake_workers import FakeWorker
from tierserve.domain.config import ConfigError
from tierserve.domain.errors import InvalidRequest, NoWorkerAvailable, Unsatisfiable
from tierserve.router.policies.registry import POLICIES, FirstHealthyPolicy, RouteRequest, make_policy

POOL = [FakeWorker("a", "fp32", healthy=False), FakeWorker("b", "fp32"), FakeWorker("c", "bf16")]


def test_first_healthy_skips_unhealthy_workers() -> None:
    decision = FirstHealthyPolicy().choose(RouteRequest(), POOL)
    assert decision.worker_id == "b"
    assert "first healthy" in decision.reason


def test_pinned_tier_goes_to_that_tier() -> None:
    decision = FirstHealthyPolicy().choose(RouteRequest(tier="bf16"), POOL)
    assert decision.worker_id == "c"
    assert "bf16" in decision.reason


def test_tier_not_in_pool_is_invalid_and_lists_served_tiers() -> None:
    pool = [FakeWorker("b", "fp32")]
    with pytest.raises(InvalidRequest, match="served tiers: fp32") as caught:
        FirstHealthyPolicy().choose(RouteRequest(tier="bf16"), pool)
    assert caught.value.field == "tier"


def test_no_healthy_worker_is_unavailable() -> None:
    pool = [FakeWorker("a", "fp32", healthy=False), FakeWorker("c", "bf16", healthy=False)]
    with pytest.raises(NoWorkerAvailable):
        FirstHealthyPolicy().choose(RouteRequest(), pool)
    with pytest.raises(NoWorkerAvailable, match="tier 'bf16'"):
        FirstHealthyPolicy().choose(RouteRequest(tier="bf16"), pool)


def test_policies_are_registered_by_name() -> None:
    assert isinstance(make_policy("first_healthy"), FirstHealthyPolicy)
    assert set(POLICIES) >= {"first_healthy", "slo", "round_robin", "least_loaded", "power_of_two"}
    with pytest.raises(ConfigError, match="known: first_healthy, least_loaded"):
        make_policy("random")


TIERED = [
    FakeWorker("q4", "int4-woq", quality_loss_pct=6.0),
    FakeWorker("h", "bf16", quality_loss_pct=0.2),
    FakeWorker("new", "int8-sq", quality_loss_pct=None),
]


def test_tolerance_keeps_only_workers_within_their_measured_loss() -> None:
    assert FirstHealthyPolicy().choose(RouteRequest(max_quality_loss_pct=1.0), TIERED).worker_id == "h"
    assert FirstHealthyPolicy().choose(RouteRequest(max_quality_loss_pct=10.0), TIERED).worker_id == "q4"
    assert FirstHealthyPolicy().choose(RouteRequest(), TIERED).worker_id == "q4"


def test_no_worker_within_tolerance_is_unsatisfiable_and_lists_the_losses() -> None:
    with pytest.raises(Unsatisfiable, match=r"max_quality_loss_pct=0.1%.*q4 \+6.00%.*new unknown"):
        FirstHealthyPolicy().choose(RouteRequest(max_quality_loss_pct=0.1), TIERED)


def test_pinned_tier_beyond_tolerance_is_unsatisfiable() -> None:
    with pytest.raises(Unsatisfiable):
        FirstHealthyPolicy().choose(RouteRequest(tier="int4-woq", max_quality_loss_pct=1.0), TIERED)
