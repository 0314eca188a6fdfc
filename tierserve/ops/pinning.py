"""Pin the worker process to its configured cores and size torch's thread pool to match."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

from tierserve.domain.cores import format_cpu_list
from tierserve.domain.errors import StartupError


class PinningError(StartupError):
    """The configured cores cannot be used here; the message says which can."""


class Affinity(Protocol):
    """Reads and sets the CPUs this process may run on (faked in tests)."""

    def get(self) -> set[int]: ...

    def set(self, cpus: set[int]) -> None: ...


class OsAffinity:
    def get(self) -> set[int]:
        return set(os.sched_getaffinity(0))

    def set(self, cpus: set[int]) -> None:
        os.sched_setaffinity(0, cpus)


@dataclass(frozen=True)
class Pinning:
    cpus: list[int]
    threads: int
    notices: list[str] = field(default_factory=list)


def plan_pinning(requested: list[int], allowed: set[int]) -> Pinning:
    """The CPUs to pin to: the requested ones this process may use (all allowed ones if none requested)."""
    if not allowed:
        raise PinningError("this process may run on no CPU at all")
    if not requested:
        cpus = sorted(allowed)
        return Pinning(
            cpus, len(cpus), [f"no cores configured; using every allowed CPU ({format_cpu_list(cpus)})"]
        )
    usable = sorted(set(requested) & allowed)
    if not usable:
        raise PinningError(
            f"none of the configured cores ({format_cpu_list(requested)}) may be used by this process; "
            f"it may use {format_cpu_list(allowed)}: change the worker's `cores`"
        )
    notices = []
    if len(usable) < len(set(requested)):
        notices.append(
            f"configured cores {format_cpu_list(requested)}, but this process is restricted to "
            f"{format_cpu_list(allowed)}; pinned to {format_cpu_list(usable)} "
            f"with {len(usable)} thread(s)"
        )
    return Pinning(usable, len(usable), notices)


def pin_process(requested: list[int], affinity: Affinity | None = None) -> Pinning:
    """Apply the plan: CPU affinity, then torch and OpenMP threads equal to the number of CPUs."""
    import torch

    affinity = affinity or OsAffinity()
    pinning = plan_pinning(requested, affinity.get())
    affinity.set(set(pinning.cpus))
    # OMP_NUM_THREADS only matters for pools created later (e.g. by extensions); torch's is set directly.
    os.environ["OMP_NUM_THREADS"] = str(pinning.threads)
    torch.set_num_threads(pinning.threads)
    return pinning
