"""Core placement: from `[placement]` (or hand-written `[[workers]]`) to core sets and NUMA nodes.

A generated plan keeps every worker inside one socket (and so, on common machines, one NUMA
node) unless asked otherwise, and never gives a core to two workers. Hand-written worker core
sets are checked against the same rules. A plan that cannot work is refused with a message
that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierserve.domain.config import PlacementConfig, TierserveConfig, WorkerConfig
from tierserve.domain.cores import format_cpu_list
from tierserve.domain.errors import StartupError
from tierserve.ops.topology import Topology


class PlacementError(StartupError):
    """The pool cannot be placed on this machine as configured; the message says what to change."""


@dataclass(frozen=True)
class PlacedWorker:
    name: str
    tier: str
    cpus: list[int]
    cores: int  # physical cores
    sockets: list[int]
    nodes: list[int]
    port: int

    @property
    def numa_node(self) -> int:
        """The one NUMA node holding all its CPUs, -1 when they span several (or none is known)."""
        return self.nodes[0] if len(self.nodes) == 1 else -1


@dataclass(frozen=True)
class Plan:
    workers: list[PlacedWorker]
    topology: Topology
    generated: bool
    warnings: list[str] = field(default_factory=list)


def _socket_cores(topology: Topology, smt: bool) -> dict[int, list[list[int]]]:
    """Per socket, its usable physical cores in NUMA-node then core order, each as the CPUs to use."""
    by_socket: dict[int, list[list[int]]] = {s: [] for s in topology.sockets}
    ordered = sorted(topology.cores().items(), key=lambda item: (topology.cpus[item[1][0]].node, item[1][0]))
    for (socket, _), threads in ordered:
        by_socket[socket].append(threads if smt else threads[:1])
    return {s: cores for s, cores in by_socket.items() if cores}


def _free_summary(free: dict[int, list[list[int]]]) -> str:
    return ", ".join(f"socket {s}: {len(c)}" for s, c in free.items())


def generate_workers(placement: PlacementConfig, topology: Topology) -> list[tuple[str, str, list[int]]]:
    """(name, tier, cpus) for every worker `[placement]` asks for, or PlacementError."""
    free = _socket_cores(topology, placement.smt)
    if not free:
        raise PlacementError("this process may use no CPU at all: check its affinity and cgroup cpuset")
    sockets = list(free)
    # The workers, as (tier, socket it must use or None).
    wanted: list[tuple[str, int | None]] = []
    if placement.per_socket:
        wanted = [(t, s) for s in sockets for t in placement.tiers for _ in range(placement.workers_per_tier)]
    else:
        wanted = [(t, None) for t in placement.tiers for _ in range(placement.workers_per_tier)]
    size = placement.cores_per_worker or _even_share(wanted, free)
    if size == 0:
        raise PlacementError(
            f"{len(wanted)} workers but only {sum(len(c) for c in free.values())} usable cores "
            f"({_free_summary(free)}): lower [placement] workers_per_tier or serve fewer tiers"
            + (", or set per_socket = false" if placement.per_socket else "")
            + (
                ""
                if placement.smt or topology.smt == 1
                else ", or set smt = true to use SMT threads as cores"
            )
        )
    placed: list[tuple[str, str, list[int]]] = []
    counts: dict[str, int] = {}
    for tier, socket in wanted:
        name = f"{tier}-{counts.setdefault(tier, 0)}"
        counts[tier] += 1
        cores = _take(free, size, socket, placement.allow_cross_socket, name, len(wanted))
        placed.append((name, tier, sorted(cpu for core in cores for cpu in core)))
    return placed


def _even_share(wanted: list[tuple[str, int | None]], free: dict[int, list[list[int]]]) -> int:
    """cores_per_worker = 0: the largest equal share that fits every worker in one socket."""
    pinned = [s for _, s in wanted if s is not None]
    if pinned:
        return min(len(free[s]) // pinned.count(s) for s in set(pinned))
    # Spread the workers over the sockets as evenly as they go, then size to the tightest socket.
    per_socket = -(-len(wanted) // len(free))
    share = min(len(c) for c in free.values()) // per_socket
    total = sum(len(c) for c in free.values())
    return share if share else (1 if total >= len(wanted) else 0)


def _take(
    free: dict[int, list[list[int]]], size: int, socket: int | None, cross: bool, name: str, count: int
) -> list[list[int]]:
    candidates = [socket] if socket is not None else sorted(free, key=lambda s: -len(free[s]))
    for s in candidates:
        if len(free[s]) >= size:
            taken, free[s] = free[s][:size], free[s][size:]
            return taken
    if cross and socket is None and sum(len(c) for c in free.values()) >= size:
        taken = []
        for s in sorted(free, key=lambda s: -len(free[s])):
            need = size - len(taken)
            taken += free[s][:need]
            free[s] = free[s][need:]
        return taken
    where = f"socket {socket}" if socket is not None else "any one socket"
    largest = max(len(c) for c in free.values())
    raise PlacementError(
        f"worker {name} needs {size} cores but {where} has only "
        f"{len(free[socket]) if socket is not None else largest} free ({_free_summary(free)}) "
        f"after placing the workers before it ({count} workers in all): lower [placement] "
        f"cores_per_worker (0 splits evenly), lower workers_per_tier, set smt = true to count SMT "
        f"threads as cores, or set allow_cross_socket = true"
    )


def check_workers(
    workers: list[WorkerConfig], placement: PlacementConfig, topology: Topology
) -> tuple[list[str], list[str]]:
    """What is wrong with hand-written worker core sets on this machine: (what cannot work as
    asked: shared CPUs or sets across sockets that [placement] does not allow; what the worker
    can get around, naming it: CPUs that do not exist here or that this process may not use)."""
    problems: list[str] = []
    refused: list[str] = []
    owner: dict[int, str] = {}
    for worker in workers:
        if worker.address:
            continue  # runs on another host, against that host's topology
        cpus = worker.cores
        missing = [c for c in cpus if c not in topology.cpus]
        if missing:
            problems.append(
                f"worker {worker.name}: CPUs {format_cpu_list(missing)} do not exist here "
                f"(CPUs {format_cpu_list(topology.cpus)}); change its `cores`"
            )
        barred = [c for c in cpus if c in topology.cpus and c not in topology.allowed]
        if barred:
            problems.append(
                f"worker {worker.name}: CPUs {format_cpu_list(barred)} are outside this process's "
                f"affinity/cpuset ({format_cpu_list(topology.allowed)}); change its `cores`"
            )
        sockets = topology.sockets_of(cpus)
        if len(sockets) > 1 and not placement.allow_cross_socket:
            refused.append(
                f"worker {worker.name}: cores {format_cpu_list(cpus)} span sockets "
                f"{format_cpu_list(sockets)}; keep them in one socket or set [placement] "
                "allow_cross_socket = true"
            )
        for cpu in cpus:
            if cpu in owner and not placement.allow_shared_cores:
                refused.append(
                    f"workers {owner[cpu]} and {worker.name} share CPU {cpu}; give them disjoint "
                    "`cores` or set [placement] allow_shared_cores = true"
                )
                break
            owner.setdefault(cpu, worker.name)
    return refused, problems


def plan_pool(config: TierserveConfig, topology: Topology) -> Plan:
    """The pool's placement on `topology`: generated from `[placement]` when it names tiers,
    else the configured workers as written. Refused (PlacementError) when it cannot work:
    more cores than there are, workers sharing CPUs or spanning sockets without
    allow_shared_cores / allow_cross_socket. Hand-written CPUs that do not exist here or lie
    outside the cpuset are warned about (each worker pins to what it may use, or refuses to
    start), and refused under `[placement] strict = true`."""
    placement = config.placement
    warnings = list(topology.notices)
    if placement.tiers:
        generated = generate_workers(placement, topology)
        workers = [
            _placed(topology, name, tier, cpus, placement.base_port + i if placement.base_port else 0)
            for i, (name, tier, cpus) in enumerate(generated)
        ]
        return Plan(workers, topology, generated=True, warnings=warnings)
    refused, problems = check_workers(config.workers, placement, topology)
    if refused or (problems and placement.strict):
        raise PlacementError("; ".join(refused + (problems if placement.strict else [])))
    workers = [
        _placed(topology, w.name, w.tier, w.cores or sorted(topology.allowed), w.port)
        for w in config.workers
        if not w.address
    ]
    return Plan(workers, topology, generated=False, warnings=warnings + problems)


def _placed(topology: Topology, name: str, tier: str, cpus: list[int], port: int) -> PlacedWorker:
    return PlacedWorker(
        name=name,
        tier=tier,
        cpus=cpus,
        cores=len({topology.cpus[c].core_key for c in cpus if c in topology.cpus}),
        sockets=topology.sockets_of(cpus),
        nodes=topology.nodes_of(cpus),
        port=port,
    )


def apply_plan(config: TierserveConfig, plan: Plan) -> TierserveConfig:
    """The config with generated workers written out, so every process reads the same core sets."""
    if not plan.generated:
        return config
    workers = [WorkerConfig(name=w.name, tier=w.tier, cores=w.cpus, port=w.port) for w in plan.workers]
    placement = config.placement.model_copy(update={"tiers": []})
    return config.model_copy(update={"workers": workers, "placement": placement})
