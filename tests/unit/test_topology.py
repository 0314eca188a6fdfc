"""Topology from sysfs fixture trees (2-socket Xeon, 8-core desktop, cpuset-limited container)
and from this machine."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import psutil
import pytest

from tierserve.domain.cores import parse_cpu_list
from tierserve.ops.topology import read_topology

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "topology"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("topology_fixtures", FIXTURES / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _same_tree(a: Path, b: Path) -> list[str]:
    """Paths that differ between two trees (missing on either side, or different content)."""
    compared = filecmp.dircmp(a, b)
    diffs = [str(a / n) for n in compared.left_only + compared.right_only + compared.diff_files]
    for sub in compared.common_dirs:
        diffs += _same_tree(a / sub, b / sub)
    return diffs


def test_checked_in_fixtures_equal_the_generator_output(tmp_path: Path) -> None:
    _generator().write_all(tmp_path)
    for tree in ("xeon-2s-56c-smt", "desktop-1s-8c", "container-cpuset"):
        assert _same_tree(tmp_path / tree, FIXTURES / tree) == [], f"rerun {FIXTURES / 'generate.py'}"


def test_two_socket_xeon_with_smt() -> None:
    topo = read_topology(FIXTURES / "xeon-2s-56c-smt")
    assert len(topo.cpus) == 224 and topo.sockets == [0, 1] and topo.nodes == [0, 1]
    assert topo.smt == 2 and len(topo.cores()) == 112
    # Intel numbering: core n's sibling is n + 112; socket 1 starts at CPU 56.
    assert topo.cores()[(0, 0)] == [0, 112] and topo.cores()[(1, 0)] == [56, 168]
    assert topo.node_cpus(1) == parse_cpu_list("56-111,168-223")
    assert topo.allowed == frozenset(range(224)) and topo.allowed_nodes == {0, 1}
    assert topo.notices == ()


def test_one_socket_desktop_with_adjacent_siblings() -> None:
    topo = read_topology(FIXTURES / "desktop-1s-8c")
    assert (len(topo.cpus), topo.sockets, topo.nodes, topo.smt) == (16, [0], [0], 2)
    assert topo.cores()[(0, 3)] == [6, 7]


def test_container_cpuset_narrows_cpus_and_memory_nodes() -> None:
    topo = read_topology(FIXTURES / "container-cpuset")
    assert len(topo.cpus) == 224
    assert topo.allowed == frozenset(parse_cpu_list("4-11,116-123"))
    assert topo.allowed_nodes == {0}
    assert sorted(topo.cores()) == [(0, core) for core in range(4, 12)]
    assert any("cpuset" in n for n in topo.notices)


def test_affinity_narrows_a_fixture_further() -> None:
    topo = read_topology(FIXTURES / "container-cpuset", affinity={4, 5, 200})
    assert topo.allowed == {4, 5}


def test_not_a_sysfs_tree_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a sysfs tree"):
        read_topology(tmp_path)


def test_this_machine_agrees_with_the_os_and_psutil() -> None:
    topo = read_topology()
    assert topo.allowed == frozenset(os.sched_getaffinity(0))
    assert len(topo.cpus) == psutil.cpu_count(logical=True)
    physical = psutil.cpu_count(logical=False)
    if physical:  # psutil counts unique (socket, core) pairs from the same sysfs files
        assert len(topo.cores(usable_only=False)) == physical
