"""The accuracy-blind baselines: they honour a pinned tier, health and admission, nothing else."""

import random
from collections import Counter

import pytest

from tests.unit.fake_workers import FakeWorker, tiered_pool
from tierserve.domain.errors import Overloaded
from tierserve.router.policies.registry import (
    LeastLoadedPolicy,
    PowerOfTwoPolicy,
    RoundRobinPolicy,
    RouteRequest,
)

STRICT_ZERO = RouteRequest(max_quality_loss_pct=0.0, max_token_latency_ms=1, strict=True)


def test_round_robin_cycles_skipping_unhealthy_and_ignoring_accuracy_and_budgets() -> None:
    pool = tiered_pool()
    pool[1].healthy = False
    policy = RoundRobinPolicy()
    chosen = [policy.choose(STRICT_ZERO, pool).worker_id for _ in range(8)]
    assert chosen == ["fp32-0", "int8-sq-0", "int8-woq-0", "int4-woq-0"] * 2
    assert "accuracy-blind" in policy.choose(STRICT_ZERO, pool).reason


def test_least_loaded_takes_the_fewest_in_flight_in_configuration_order() -> None:
    pool = tiered_pool()
    for w, load in zip(pool, [3, 1, 2, 1, 4], strict=True):
        w.outstanding = load
    decision = LeastLoadedPolicy().choose(STRICT_ZERO, pool)
    assert decision.worker_id == "bf16-0"
    assert "1 request(s) in flight" in decision.reason
    assert LeastLoadedPolicy().choose(RouteRequest(tier="int4-woq"), pool).worker_id == "int4-woq-0"


def test_power_of_two_never_picks_the_busier_of_its_two_samples() -> None:
    pool = [
        FakeWorker("idle", "bf16"),
        FakeWorker("some", "bf16", outstanding=2),
        FakeWorker("busy", "bf16", outstanding=5),
    ]
    policy = PowerOfTwoPolicy(random.Random(7))
    picks = Counter(policy.choose(RouteRequest(), pool).worker_id for _ in range(60))
    assert picks["busy"] == 0 and picks["idle"] > picks["some"] > 0


def test_baselines_refuse_with_resource_exhausted_when_every_queue_is_full() -> None:
    pool = tiered_pool()
    for w in pool:
        w.outstanding = w.queue_limit + 1
    for policy in (RoundRobinPolicy(), LeastLoadedPolicy(), PowerOfTwoPolicy()):
        with pytest.raises(Overloaded):
            policy.choose(RouteRequest(), pool)
