"""Pinning against a fake affinity: configured cores, restricted processes, impossible plans."""

import pytest
import torch

from tierserve.ops.pinning import PinningError, pin_process, plan_pinning


class FakeAffinity:
    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed
        self.set_to: set[int] | None = None

    def get(self) -> set[int]:
        return set(self.allowed)

    def set(self, cpus: set[int]) -> None:
        self.set_to = cpus


def test_pins_to_the_configured_cores() -> None:
    pinning = plan_pinning([2, 3], allowed={0, 1, 2, 3})
    assert (pinning.cpus, pinning.threads, pinning.notices) == ([2, 3], 2, [])


def test_respects_a_tighter_restriction_and_says_so() -> None:
    pinning = plan_pinning([0, 1, 2, 3], allowed={1, 2})
    assert (pinning.cpus, pinning.threads) == ([1, 2], 2)
    assert "restricted to 1-2" in pinning.notices[0]


def test_no_configured_cores_means_all_allowed() -> None:
    pinning = plan_pinning([], allowed={4, 5})
    assert pinning.cpus == [4, 5]
    assert pinning.notices


def test_disjoint_cores_are_refused_with_what_is_usable() -> None:
    with pytest.raises(PinningError, match="may use 0-1"):
        plan_pinning([6, 7], allowed={0, 1})


def test_pin_process_applies_affinity_and_thread_count() -> None:
    before = torch.get_num_threads()
    fake = FakeAffinity({0, 1, 2})
    try:
        pinning = pin_process([1, 2, 9], affinity=fake)
        assert fake.set_to == {1, 2}
        assert torch.get_num_threads() == pinning.threads == 2
    finally:
        torch.set_num_threads(before)
