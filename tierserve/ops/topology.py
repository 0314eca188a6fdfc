"""The machine's CPU topology: sockets, physical cores, SMT siblings and NUMA nodes.

Read from sysfs under an injectable root (tests point it at fixture trees), narrowed to
the CPUs this process may use: its affinity (psutil) and its cgroup cpuset.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tierserve.domain.cores import format_cpu_list, parse_cpu_list

CPU_DIR = "sys/devices/system/cpu"
NODE_DIR = "sys/devices/system/node"
# cgroup v2 (unified, and what a container sees at its own root), then v1's cpuset controller.
CPUSET_FILES = (
    ("sys/fs/cgroup/cpuset.cpus.effective", "sys/fs/cgroup/cpuset.mems.effective"),
    ("sys/fs/cgroup/cpuset/cpuset.effective_cpus", "sys/fs/cgroup/cpuset/cpuset.effective_mems"),
    ("sys/fs/cgroup/cpuset/cpuset.cpus", "sys/fs/cgroup/cpuset/cpuset.mems"),
)


@dataclass(frozen=True)
class Cpu:
    """One logical CPU (hardware thread)."""

    id: int
    socket: int
    core: int  # physical core id, unique within its socket
    node: int  # NUMA node; 0 when the kernel exposes none

    @property
    def core_key(self) -> tuple[int, int]:
        return (self.socket, self.core)


@dataclass(frozen=True)
class Topology:
    """Every online CPU, and which of them (and which NUMA nodes) this process may use."""

    cpus: dict[int, Cpu]
    allowed: frozenset[int]
    allowed_nodes: frozenset[int]
    source: str
    notices: tuple[str, ...] = field(default=())

    @property
    def sockets(self) -> list[int]:
        return sorted({c.socket for c in self.cpus.values()})

    @property
    def nodes(self) -> list[int]:
        return sorted({c.node for c in self.cpus.values()})

    def node_cpus(self, node: int) -> list[int]:
        return sorted(c.id for c in self.cpus.values() if c.node == node)

    def cores(self, usable_only: bool = True) -> dict[tuple[int, int], list[int]]:
        """(socket, core id) -> its hardware threads, in CPU order; usable ones only by default."""
        threads: dict[tuple[int, int], list[int]] = defaultdict(list)
        for cpu in sorted(self.cpus.values(), key=lambda c: c.id):
            if not usable_only or cpu.id in self.allowed:
                threads[cpu.core_key].append(cpu.id)
        return dict(threads)

    @property
    def smt(self) -> int:
        """Hardware threads per physical core (1 without SMT)."""
        return max((len(t) for t in self.cores(usable_only=False).values()), default=1)

    def nodes_of(self, cpus: list[int]) -> list[int]:
        return sorted({self.cpus[c].node for c in cpus if c in self.cpus})

    def sockets_of(self, cpus: list[int]) -> list[int]:
        return sorted({self.cpus[c].socket for c in cpus if c in self.cpus})

    def summary(self) -> str:
        per_socket = len(self.cores(usable_only=False)) // max(len(self.sockets), 1)
        usable = self.cores()
        return (
            f"{len(self.sockets)} socket(s) x {per_socket} cores x {self.smt} thread(s) = "
            f"{len(self.cpus)} CPUs, NUMA nodes {format_cpu_list(self.nodes)}; this process may use "
            f"{len(self.allowed)} CPUs ({format_cpu_list(self.allowed)}) on {len(usable)} cores, "
            f"memory on node(s) {format_cpu_list(self.allowed_nodes)}"
        )


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


def _read_int(path: Path, default: int) -> int:
    text = _read(path)
    try:
        return int(text) if text else default
    except ValueError:
        return default


def _cpuset(root: Path) -> tuple[set[int] | None, set[int] | None, str]:
    """The cgroup cpuset's CPUs and memory nodes, where the tree exposes one (empty files mean no limit)."""
    for cpus_file, mems_file in CPUSET_FILES:
        cpus_text = _read(root / cpus_file)
        if cpus_text:
            mems_text = _read(root / mems_file)
            return (
                set(parse_cpu_list(cpus_text)),
                set(parse_cpu_list(mems_text)) if mems_text else None,
                cpus_file,
            )
    return None, None, ""


def read_topology(root: Path = Path("/"), affinity: set[int] | None = None) -> Topology:
    """The topology under `root`. On the real machine (root "/") the process affinity comes from
    psutil; for a fixture tree pass `affinity`, or None for no restriction beyond its cpuset."""
    notices: list[str] = []
    cpu_dir = root / CPU_DIR
    online_text = _read(cpu_dir / "online")
    if online_text:
        online = parse_cpu_list(online_text)
    elif root == Path("/"):
        online = list(range(psutil.cpu_count(logical=True) or 1))
        notices.append("no sysfs CPU list; assumed one socket, one NUMA node, no SMT")
    else:
        raise FileNotFoundError(f"{cpu_dir / 'online'} not found: {root} is not a sysfs tree")

    node_of: dict[int, int] = {}
    node_dir = root / NODE_DIR
    for entry in sorted(node_dir.glob("node[0-9]*")) if node_dir.is_dir() else []:
        for cpu in parse_cpu_list(_read(entry / "cpulist") or ""):
            node_of[cpu] = int(entry.name.removeprefix("node"))
    if not node_of:
        notices.append("the kernel exposes no NUMA nodes; all CPUs counted as node 0")

    cpus: dict[int, Cpu] = {}
    for cpu in online:
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        # Without topology files (some VMs), every CPU is its own core on socket 0.
        cpus[cpu] = Cpu(
            id=cpu,
            socket=_read_int(topo / "physical_package_id", 0),
            core=_read_int(topo / "core_id", cpu),
            node=node_of.get(cpu, 0),
        )

    allowed = set(cpus)
    if affinity is None and root == Path("/"):
        affinity = set(psutil.Process().cpu_affinity() or [])
    if affinity is not None:
        allowed &= affinity
    cpuset_cpus, cpuset_mems, cpuset_file = _cpuset(root)
    if cpuset_cpus is not None and cpuset_cpus != set(cpus):
        allowed &= cpuset_cpus
        notices.append(f"cgroup cpuset ({cpuset_file}) limits this process to {format_cpu_list(cpuset_cpus)}")
    nodes = {c.node for c in cpus.values()}
    allowed_nodes = nodes & cpuset_mems if cpuset_mems is not None else nodes
    return Topology(
        cpus=cpus,
        allowed=frozenset(allowed),
        allowed_nodes=frozenset(allowed_nodes or nodes),
        source=str(root),
        notices=tuple(notices),
    )
