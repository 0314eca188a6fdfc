"""The routing interface with fake workers: pinned tiers, health, and clear refusals."""

from dataclasses import dataclass

import pytest

from router.policy import POLICIES, FirstHealthyPolicy, RouteRequest, make_policy
from tierserve.config import ConfigError
from tierserve.errors import InvalidRequest, NoWorkerAvailable


@dataclass
class FakeWorker:
    worker_id: str
    tier: str
    healthy: bool = True


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
    assert set(POLICIES) >= {"first_healthy"}
    with pytest.raises(ConfigError, match="known: first_healthy"):
        make_policy("random")
