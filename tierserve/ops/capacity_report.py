"""Terminal rendering of a capacity plan (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tierserve.ops.capacity import BUDGET_FORMULA, MEETS_RULE, STREAMS_RULE, WORKERS_FORMULA, Plan


def _opt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_plan(console: Console, plan: Plan) -> None:
    req, budget = plan.requirements, plan.budget
    console.print(
        f"[bold]requirements:[/] {req.sessions_per_hour:g} sessions/h x {req.requests_per_session:g} "
        f"requests x {req.tokens_per_request:g} output tokens"
        + (f" ({req.prompt_tokens:g} prompt tokens)" if req.prompt_tokens is not None else "")
        + f"; overhead {req.session_overhead_s:g} s, think time {req.think_time_s:g} s, "
        f"session length {req.session_length_s:g} s",
        highlight=False,
    )
    console.print(f"[dim]{BUDGET_FORMULA}[/]", highlight=False)
    if budget.feasible:
        console.print(
            f"[bold]per-token budget:[/] [green]{budget.per_token_s * 1e3:.2f} ms[/] ({budget.reason})"
        )
    else:
        console.print(f"[bold red]requirements are {budget.reason}[/]")
    console.print(
        f"{plan.requests_per_s:.3f} requests/s, about {plan.concurrent_sessions:.1f} sessions open at once",
        highlight=False,
    )
    if not plan.tiers:
        console.print("no measured tiers (give --router ADDR or --from-bench FILE to size the pool)")
        return
    tolerance = req.max_quality_loss_pct
    table = Table(
        title=f"tiers at target utilization {req.target_utilization:.0%}",
        title_justify="left",
        caption=f"{MEETS_RULE}\n{STREAMS_RULE}\n{WORKERS_FORMULA}",
        caption_justify="left",
    )
    left = ("tier", "meets budget", "source")
    for column in (
        "tier", "TTFT ms", "TPOT ms", "ppl delta %", "streams/worker c", "TPOT ms at c",
        "ms/token incl. TTFT at c", "busy s/request", "load (Erlangs)", "workers", "workers at 1 stream",
        "meets budget", "source",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column in left else "right")
    best = plan.recommended()
    for tier in plan.tiers:
        verdict = "[green]yes[/]" if tier.meets_budget else "[red]no[/]"
        if tolerance is not None and not tier.within_tolerance:
            verdict += f" [yellow](beyond {tolerance:g}% loss)[/]"
        name = f"[bold]{tier.tier}[/] *" if best is tier else tier.tier
        table.add_row(
            name,
            f"{tier.ttft_ms:.1f}",
            f"{tier.tpot_ms:.2f}",
            _opt(tier.ppl_delta_pct, "+.2f"),
            str(tier.streams_per_worker),
            f"{tier.tpot_at_streams_ms:.2f}",
            f"{tier.effective_ms_per_token:.2f}",
            f"{tier.busy_s:.3f}",
            f"{tier.load_erlangs:.2f}",
            str(tier.workers),
            str(tier.one_stream_workers),
            verdict,
            tier.source,
        )
    console.print(table)
    for tier in plan.tiers:
        console.print(f"{tier.tier}: {tier.streams_per_worker} stream(s) per worker: {tier.streams_basis}")
    if best is not None:
        console.print(
            f"* recommended: [bold]{best.tier}[/], the most accurate tier that meets the budget"
            + (f" within {tolerance:g}% loss" if tolerance is not None else "")
            + f": {best.workers} worker(s) at {best.streams_per_worker} stream(s) each"
            + (
                f" ({best.one_stream_workers} at one stream each)"
                if best.one_stream_workers != best.workers
                else ""
            )
        )
    elif budget.feasible:
        console.print(
            "[red]no measured tier meets the budget[/]" + (" within the tolerance" if tolerance else "")
        )
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/]")
