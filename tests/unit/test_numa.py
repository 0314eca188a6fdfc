"""Memory binding to the cores' NUMA node: the real libnuma here, fakes for the other cases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierserve.ops.topology import read_topology
from tierserve.worker.numa import LibNuma, bind_memory

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "topology"


class FakeLibNuma(LibNuma):
    def __init__(self) -> None:
        self.bound: list[int] = []

    def bind(self, nodes: list[int]) -> None:
        self.bound = nodes

    def membind(self) -> list[int]:
        return self.bound or [0, 1]


def test_binds_to_the_node_of_the_cores() -> None:
    fake = FakeLibNuma()
    binding = bind_memory([56, 57, 168], read_topology(FIXTURES / "xeon-2s-56c-smt"), fake)
    assert (binding.node, binding.memory_nodes, fake.bound) == (1, [1], [1])
    assert binding.description == "libnuma membind to node 1" and binding.notices == []


def test_cores_across_nodes_are_left_unbound_and_said_so() -> None:
    fake = FakeLibNuma()
    binding = bind_memory([0, 56], read_topology(FIXTURES / "xeon-2s-56c-smt"), fake)
    assert binding.node == -1 and fake.bound == []
    assert "span NUMA nodes 0-1" in binding.notices[0]


def test_without_libnuma_the_notice_says_what_to_install() -> None:
    binding = bind_memory([0], read_topology(FIXTURES / "xeon-2s-56c-smt"), libnuma=False)
    assert binding.memory_nodes == [] and binding.node == 0
    assert "libnuma not found" in binding.notices[0] and "numactl --membind" in binding.notices[0]


def test_real_libnuma_binding_is_read_back_from_the_kernel() -> None:
    if LibNuma.load() is None:
        pytest.skip("libnuma is not installed or the kernel reports no NUMA support")
    # In a child process: a memory policy cannot be undone cleanly in the test process.
    cpu = min(os.sched_getaffinity(0))
    code = f"from worker.numa import bind_memory; b = bind_memory([{cpu}]); print(b.node, b.memory_nodes)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    node = read_topology().cpus[cpu].node
    assert out.split() == [str(node), f"[{node}]"]
