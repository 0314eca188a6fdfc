"""The placement planner on fixture topologies: sensible plans, and refusals that say what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tierserve.domain.config import parse_config
from tierserve.domain.cores import parse_cpu_list
from tierserve.ops.placement import PlacementError, apply_plan, plan_pool
from tierserve.ops.topology import Topology, read_topology

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "topology"
ALL_TIERS = ["fp32", "bf16", "int8-sq", "int8-woq", "int4-woq"]


def topology(name: str) -> Topology:
    return read_topology(FIXTURES / name)


def planned(name: str, **placement: Any) -> list[tuple[str, list[int], list[int]]]:
    """(worker, cpus, NUMA nodes) for a [placement] on a fixture."""
    plan = plan_pool(parse_config({"placement": placement}), topology(name))
    return [(w.name, w.cpus, w.nodes) for w in plan.workers]


def test_one_set_per_socket_on_the_xeon_stays_on_each_socket_and_node() -> None:
    workers = planned("xeon-2s-56c-smt", tiers=ALL_TIERS, per_socket=True)
    assert len(workers) == 10
    assert workers[0] == ("fp32-0", list(range(0, 11)), [0])
    assert workers[5] == ("fp32-1", list(range(56, 67)), [1])
    for name, cpus, nodes in workers:
        assert len(cpus) == 11 and len(nodes) == 1, name
    every = [c for _, cpus, _ in workers for c in cpus]
    assert len(every) == len(set(every)), "a core was given twice"


def test_smt_gives_each_worker_its_cores_sibling_threads() -> None:
    workers = planned("xeon-2s-56c-smt", tiers=["fp32", "bf16"], cores_per_worker=28, smt=True)
    assert workers[0] == ("fp32-0", parse_cpu_list("0-27,112-139"), [0])
    # Spread over sockets, not piled onto the first.
    assert workers[1] == ("bf16-0", parse_cpu_list("56-83,168-195"), [1])


def test_several_workers_per_tier_are_named_and_split_evenly() -> None:
    workers = planned("desktop-1s-8c", tiers=["bf16"], workers_per_tier=4)
    # Siblings are numbered next to each other here: one thread per core is every other CPU.
    assert workers == [
        ("bf16-0", [0, 2], [0]),
        ("bf16-1", [4, 6], [0]),
        ("bf16-2", [8, 10], [0]),
        ("bf16-3", [12, 14], [0]),
    ]


def test_container_plans_only_within_its_cpuset() -> None:
    workers = planned("container-cpuset", tiers=["fp32", "bf16"], smt=True)
    assert workers == [
        ("fp32-0", parse_cpu_list("4-7,116-119"), [0]),
        ("bf16-0", parse_cpu_list("8-11,120-123"), [0]),
    ]


def test_a_worker_bigger_than_a_socket_is_refused_unless_allowed() -> None:
    with pytest.raises(PlacementError, match=r"needs 60 cores.*allow_cross_socket = true"):
        planned("xeon-2s-56c-smt", tiers=["fp32"], cores_per_worker=60)
    [(_, cpus, nodes)] = planned(
        "xeon-2s-56c-smt", tiers=["fp32"], cores_per_worker=60, allow_cross_socket=True
    )
    assert len(cpus) == 60 and nodes == [0, 1]


def test_more_cores_than_the_container_has_are_refused() -> None:
    with pytest.raises(PlacementError, match=r"needs 6 cores.*socket 0: 2"):
        planned("container-cpuset", tiers=["fp32", "bf16"], cores_per_worker=6)


def test_more_workers_than_cores_are_refused_with_remedies() -> None:
    with pytest.raises(PlacementError, match=r"10 workers but only 8 usable cores.*smt = true"):
        planned("desktop-1s-8c", tiers=["fp32", "bf16"], workers_per_tier=5)


def hand_written(workers: list[dict[str, Any]], **placement: Any) -> Any:
    return parse_config({"workers": workers, "placement": placement})


def test_hand_written_overlap_and_cross_socket_are_refused_saying_what_to_change() -> None:
    config = hand_written(
        [
            {"name": "a", "tier": "fp32", "cores": "50-60"},
            {"name": "b", "tier": "bf16", "cores": "60-61"},
            {"name": "c", "tier": "bf16", "cores": "300"},
        ]
    )
    with pytest.raises(PlacementError) as refused:
        plan_pool(config, topology("xeon-2s-56c-smt"))
    text = str(refused.value)
    assert "worker a: cores 50-60 span sockets 0-1" in text and "allow_cross_socket = true" in text
    assert "workers a and b share CPU 60" in text and "allow_shared_cores = true" in text
    assert "CPUs 300" not in text  # not refused: the worker itself refuses what it cannot use
    allowed = hand_written(
        [
            {"name": "a", "tier": "fp32", "cores": "50-60"},
            {"name": "b", "tier": "bf16", "cores": "60-61"},
            {"name": "c", "tier": "bf16", "cores": "300"},
        ],
        allow_shared_cores=True,
        allow_cross_socket=True,
    )
    [warning] = plan_pool(allowed, topology("xeon-2s-56c-smt")).warnings
    assert "worker c: CPUs 300 do not exist here" in warning
    strict = allowed.model_copy(update={"placement": allowed.placement.model_copy(update={"strict": True})})
    with pytest.raises(PlacementError, match="CPUs 300 do not exist here"):
        plan_pool(strict, topology("xeon-2s-56c-smt"))


def test_hand_written_cores_outside_the_cpuset_are_reported() -> None:
    config = hand_written([{"name": "a", "tier": "fp32", "cores": "0-5"}])
    [warning] = [w for w in plan_pool(config, topology("container-cpuset")).warnings if "worker a" in w]
    assert "CPUs 0-3 are outside" in warning


def test_shared_cores_pass_when_allowed() -> None:
    config = hand_written(
        [{"name": "a", "tier": "fp32", "cores": "0"}, {"name": "b", "tier": "bf16", "cores": "0"}],
        allow_shared_cores=True,
        strict=True,
    )
    assert [w.cpus for w in plan_pool(config, topology("desktop-1s-8c")).workers] == [[0], [0]]


def test_applied_plan_writes_workers_every_process_reads() -> None:
    config = parse_config({"placement": {"tiers": ["fp32", "bf16"], "base_port": 0}})
    applied = apply_plan(config, plan_pool(config, topology("desktop-1s-8c")))
    assert [(w.name, w.cores, w.port) for w in applied.workers] == [
        ("fp32-0", [0, 2, 4, 6], 0),
        ("bf16-0", [8, 10, 12, 14], 0),
    ]
    assert applied.placement.tiers == []


def test_no_workers_and_no_placement_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"add \[\[workers\]\] entries or list tiers in \[placement\]"):
        parse_config({})


@pytest.mark.parametrize("tree", ["xeon-2s-56c-smt", "desktop-1s-8c", "container-cpuset"])
def test_dry_run_prints_a_plan_for_each_fixture(tree: str, tmp_path: Path) -> None:
    config = tmp_path / "pool.toml"
    config.write_text('[placement]\ntiers = ["fp32", "bf16", "int8-sq"]\nper_socket = true\n')
    result = subprocess.run(
        [sys.executable, "-m", "tierserve.cli", "up", "--config", str(config), "--dry-run",
         "--topology-root", str(FIXTURES / tree)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "int8-sq-0" in result.stderr and "NUMA node" in result.stderr
    assert 'name = "int8-sq-0"' in result.stdout
    if tree == "xeon-2s-56c-smt":
        assert 'name = "int8-sq-1"' in result.stdout and 'cores = "74-91"' in result.stdout
