"""The placement plan as a rich table, for `tierserve up --dry-run`."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tierserve.domain.cores import format_cpu_list
from tierserve.ops.placement import Plan


def plan_table(plan: Plan) -> Table:
    how = "planned from \\[placement]" if plan.generated else "as written in \\[\\[workers]]"
    table = Table(title=f"placement ({how}) on {escape(plan.topology.source)}", title_justify="left")
    for column in ("worker", "tier", "CPUs", "cores", "threads", "socket", "NUMA node", "port"):
        table.add_column(column, justify="right" if column in ("cores", "threads", "port") else "left")
    for worker in plan.workers:
        table.add_row(
            worker.name,
            worker.tier,
            format_cpu_list(worker.cpus),
            str(worker.cores),
            str(len(worker.cpus)),
            format_cpu_list(worker.sockets) or "?",
            str(worker.numa_node) if worker.numa_node >= 0 else f"[yellow]{format_cpu_list(worker.nodes)}[/]",
            str(worker.port) if worker.port else "auto",
        )
    return table


def print_plan(console: Console, plan: Plan) -> None:
    console.print(f"[bold]topology:[/] {escape(plan.topology.summary())}", highlight=False)
    console.print(plan_table(plan))
    topology = plan.topology
    used = {c for w in plan.workers for c in w.cpus}
    used_cores = {topology.cpus[c].core_key for c in used if c in topology.cpus}
    idle_siblings = sorted(c for c in topology.allowed - used if topology.cpus[c].core_key in used_cores)
    unused = sorted(c for c in topology.allowed - used if topology.cpus[c].core_key not in used_cores)
    if idle_siblings:
        console.print(f"SMT siblings left idle (smt = false): {format_cpu_list(idle_siblings)}")
    if unused:
        cores = len({topology.cpus[c].core_key for c in unused})
        console.print(f"unused: {cores} core(s), CPUs {format_cpu_list(unused)}", highlight=False)
    for warning in plan.warnings:
        console.print(f"[yellow]note:[/] {escape(warning)}", highlight=False)
