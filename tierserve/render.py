"""Terminal rendering of streams, summaries and worker tables (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tierserve.cores import format_cpu_list
from tierserve.v1 import generate_pb2, router_pb2, worker_pb2


def ms(microseconds: float) -> str:
    return f"{microseconds / 1e3:.1f}"


def print_token(console: Console, token: generate_pb2.Token) -> None:
    line = Text(f"{token.index:>4}  {ms(token.latency_us):>8} ms  ", style="dim")
    line.append(repr(token.text), style="bold")
    console.print(line, highlight=False)


def summary_table(summary: generate_pb2.Summary) -> Table:
    table = Table(title="summary", show_header=False, title_justify="left")
    table.add_column("field", style="cyan")
    table.add_column("value")
    rows = [
        ("request", summary.request_id),
        ("worker / tier", f"{summary.worker_id} / {summary.tier}"),
        ("routing", summary.routing_reason),
        ("tokens", f"{summary.prompt_tokens} prompt, {summary.generated_tokens} generated"),
        (
            "finish",
            generate_pb2.FinishReason.Name(summary.finish_reason).removeprefix("FINISH_REASON_").lower(),
        ),
        ("queue", f"{ms(summary.queue_time_us)} ms"),
        ("TTFT", f"{ms(summary.ttft_us)} ms"),
        (
            "TPOT mean / p50 / p95",
            f"{ms(summary.tpot_mean_us)} / {ms(summary.tpot_p50_us)} / {ms(summary.tpot_p95_us)} ms",
        ),
        ("total", f"{ms(summary.total_time_us)} ms"),
        ("budget met", "yes" if summary.budget_met else "no"),
    ]
    if summary.seed:
        rows.append(("seed", str(summary.seed)))
    for field, value in rows:
        table.add_row(field, value)
    return table


def kernels_table(workers: list[router_pb2.WorkerStatus]) -> Table:
    table = Table(title="kernels", title_justify="left")
    for column in ("worker", "backend", "dtype", "kernel path", "notices"):
        table.add_column(column, overflow="fold")
    for worker in workers:
        info = worker.info
        table.add_row(worker.worker_id, info.backend, info.dtype, info.kernel, "; ".join(info.notices))
    return table


def _latency(stats: worker_pb2.LatencyStats) -> str:
    if not stats.samples:
        return "-"
    return f"{ms(stats.ttft_p50_us)} / {ms(stats.tpot_p50_us)} / {ms(stats.tpot_p95_us)}"


def _accuracy(card: worker_pb2.AccuracyCard) -> str:
    if not card.measured:
        return "not measured"
    return f"ppl {card.perplexity:.2f} ({card.perplexity_delta_pct:+.2f}%)"


def workers_table(workers: list[router_pb2.WorkerStatus]) -> Table:
    table = Table(
        title="workers",
        title_justify="left",
        caption="latency: TTFT p50 / TPOT p50 / TPOT p95 in ms, measured at warm-up and on relayed tokens",
        caption_justify="left",
    )
    for column in (
        "worker", "tier", "address", "health", "cores", "thr", "accuracy",
        "warm-up", "relayed", "busy", "load s",
    ):  # fmt: skip
        table.add_column(column, overflow="fold")
    for worker in workers:
        info = worker.info
        health = router_pb2.WorkerHealth.Name(worker.health).removeprefix("WORKER_HEALTH_").lower()
        table.add_row(
            worker.worker_id,
            info.tier,
            worker.address,
            health,
            format_cpu_list(info.cores) or "-",
            str(info.threads or "-"),
            _accuracy(info.accuracy),
            _latency(info.warmup_latency),
            _latency(worker.relayed_latency),
            str(worker.in_flight),
            f"{info.load_time_ms / 1e3:.1f}" if info.load_time_ms else "-",
        )
    return table
