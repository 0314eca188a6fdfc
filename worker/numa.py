"""Bind the worker's memory to the NUMA node of its cores, through libnuma (ctypes), and report
the binding really in effect. Without libnuma the worker runs unbound and says so."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field
from pathlib import Path

from tierserve.domain.cores import format_cpu_list
from tierserve.ops.topology import Topology, read_topology


@dataclass(frozen=True)
class NumaBinding:
    # The one node holding every pinned CPU; -1 when they span nodes or none is known.
    node: int
    # Nodes memory allocations are bound to now, as the kernel reports them (empty: not bound).
    memory_nodes: list[int]
    description: str
    notices: list[str] = field(default_factory=list)


class LibNuma:
    """The few libnuma calls needed; None from `load` when the library is absent or reports no NUMA."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.numa_parse_nodestring.restype = ctypes.c_void_p
        lib.numa_parse_nodestring.argtypes = [ctypes.c_char_p]
        lib.numa_set_membind.argtypes = [ctypes.c_void_p]
        lib.numa_get_membind.restype = ctypes.c_void_p
        lib.numa_bitmask_isbitset.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.numa_bitmask_free.argtypes = [ctypes.c_void_p]

    @classmethod
    def load(cls) -> LibNuma | None:
        name = ctypes.util.find_library("numa") or "libnuma.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            return None
        return cls(lib) if lib.numa_available() >= 0 else None

    def bind(self, nodes: list[int]) -> None:
        mask = self._lib.numa_parse_nodestring(format_cpu_list(nodes).encode())
        if not mask:
            raise OSError(f"libnuma rejected node list {format_cpu_list(nodes)}")
        try:
            # Applies to this thread and every thread it starts later (torch's pool, the model thread).
            self._lib.numa_set_membind(mask)
        finally:
            self._lib.numa_bitmask_free(mask)

    def membind(self) -> list[int]:
        mask = self._lib.numa_get_membind()
        try:
            return [
                n
                for n in range(int(self._lib.numa_max_node()) + 1)
                if self._lib.numa_bitmask_isbitset(mask, n)
            ]
        finally:
            self._lib.numa_bitmask_free(mask)


def bind_memory(
    cpus: list[int], topology: Topology | None = None, libnuma: LibNuma | bool | None = True
) -> NumaBinding:
    """Bind memory to the node of `cpus` when they sit on one node; `libnuma=False` skips binding."""
    topology = topology or read_topology(Path("/"))
    nodes = topology.nodes_of(cpus)
    node = nodes[0] if len(nodes) == 1 else -1
    lib = LibNuma.load() if libnuma is True else (libnuma or None)
    if lib is None:
        return NumaBinding(
            node,
            [],
            "not bound: libnuma not available",
            [
                f"memory not bound to NUMA node {format_cpu_list(nodes)}: libnuma not found (install "
                "libnuma1, or start the worker under `numactl --membind`)"
            ],
        )
    if node < 0:
        return NumaBinding(
            node,
            lib.membind(),
            f"not bound: cores span NUMA nodes {format_cpu_list(nodes)}",
            [f"cores {format_cpu_list(cpus)} span NUMA nodes {format_cpu_list(nodes)}; memory left unbound"],
        )
    lib.bind([node])
    in_effect = lib.membind()
    notices = []
    if len(topology.nodes) == 1:
        notices.append("one NUMA node on this machine: memory binding changes nothing here")
    return NumaBinding(node, in_effect, f"libnuma membind to node {node}", notices)
