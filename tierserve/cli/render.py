"""Terminal rendering of streams, summaries and worker tables (rich)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text
from tierserve_client.v1 import generate_pb2, router_pb2, worker_pb2

from tierserve.domain.cores import format_cpu_list

if TYPE_CHECKING:  # the worker package imports torch; the CLI's other commands need not
    from tierserve.worker.cache import CacheEntry


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
        ("budget met", ("yes" if summary.budget_met else "no") + (" (best effort)" * summary.best_effort)),
    ]
    if summary.predicted_ttft_us or summary.predicted_tpot_us:
        rows.append(
            (
                "predicted",
                f"wait {ms(summary.predicted_queue_us)}, TTFT {ms(summary.predicted_ttft_us)}, "
                f"TPOT {ms(summary.predicted_tpot_us)} ms (policy {summary.policy})",
            )
        )
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
        "warm-up", "relayed", "busy", "batch", "KV", "load s",
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
            batch_cell(worker),
            kv_cell(worker),
            f"{info.load_time_ms / 1e3:.1f}" if info.load_time_ms else "-",
        )
    return table


def _ewma_p50_p95(ewma_us: float, p50_us: int, p95_us: int) -> str:
    if not ewma_us and not p50_us:
        return "-"
    return f"{ms(ewma_us)} / {ms(p50_us)} / {ms(p95_us)}"


# Batch figures older than this are marked with their age (the router describes workers every few
# health rounds).
STALE_BATCH_MS = 10_000


def _tokens(count: int) -> str:
    return f"{count / 1e3:.1f}k" if count >= 1000 else str(count)


def batch_cell(worker: router_pb2.WorkerStatus) -> str:
    """Streams decoding / most the worker decodes together, "+N" waiting on the worker; "off" when
    it serves one at a time; "-" before it has reported."""
    if not worker.HasField("batch"):
        return "-"
    batch = worker.batch
    text = f"{batch.running}/{batch.max_batch}" if batch.enabled else "off"
    if batch.waiting:
        text += f" +{batch.waiting}"
    if batch.age_ms > STALE_BATCH_MS:
        text += f" ({batch.age_ms / 1e3:.0f}s ago)"
    return text


def kv_cell(worker: router_pb2.WorkerStatus) -> str:
    """KV-cache positions used / budget and its memory; "-" without a budget."""
    batch = worker.batch
    if not worker.HasField("batch") or not batch.kv_tokens_budget:
        return "-"
    return (
        f"{_tokens(batch.kv_tokens_used)}/{_tokens(batch.kv_tokens_budget)} "
        f"({batch.kv_share:.0%}, {batch.kv_cache_mb:.0f} MiB)"
    )


def _concurrency(figures: router_pb2.LiveFigures) -> str:
    return " ".join(f"{c.streams}:{ms(c.tpot_us)}" for c in figures.tpot_by_concurrency) or "-"


def top_table(stats: router_pb2.PoolStats) -> Table:
    """The `tierserve top` dashboard: every worker's live latency, load and throughput."""
    when = time.strftime("%H:%M:%S", time.localtime(stats.timestamp_us / 1e6))
    table = Table(
        title=f"tierserve top — policy {stats.policy or '?'} — {when}",
        title_justify="left",
        caption=(
            "ms; TTFT/TPOT: moving average / p50 / p95 of relayed tokens; prefill: fixed + per prompt token; "
            "TPOT@n: by streams on the worker's cores; wait: predicted for a request now; "
            "basis: warm-up (worker's self-measurement) until traffic, then live; batch: streams decoding "
            "/ most, +waiting, as the worker last reported; KV: cache positions used / budget"
        ),
        caption_justify="left",
    )
    for column in (
        "worker", "tier", "health", "loss %", "busy", "queued", "TTFT", "TPOT", "TPOT@n",
        "prefill", "tok/s", "wait", "basis", "batch", "KV",
    ):  # fmt: skip
        table.add_column(column, overflow="fold")
    for worker in stats.workers:
        live, relayed, card = worker.live, worker.relayed_latency, worker.info.accuracy
        health = router_pb2.WorkerHealth.Name(worker.health).removeprefix("WORKER_HEALTH_").lower()
        table.add_row(
            worker.worker_id,
            worker.info.tier,
            Text(health, style="green" if worker.health == router_pb2.WORKER_HEALTH_SERVING else "red"),
            f"{card.perplexity_delta_pct:+.2f}" if card.measured else "-",
            str(worker.in_flight - worker.queued),
            f"{worker.queued}/{worker.queue_limit}",
            _ewma_p50_p95(live.ttft_ewma_us, relayed.ttft_p50_us, relayed.ttft_p95_us),
            _ewma_p50_p95(live.tpot_ewma_us, relayed.tpot_p50_us, relayed.tpot_p95_us),
            _concurrency(live),
            f"{ms(live.prefill_base_us)} + {live.prefill_per_token_us / 1e3:.2f}/tok"
            if live.prefill_per_token_us or live.prefill_base_us
            else "-",
            f"{relayed.tokens_per_second:.1f}",
            ms(live.predicted_wait_us),
            live.basis or "-",
            batch_cell(worker),
            kv_cell(worker),
        )
    return table


def mib(size_bytes: int) -> str:
    return f"{size_bytes / (1 << 20):,.1f} MiB"


def cache_table(cache_dir: Path, entries: list[CacheEntry]) -> Table:
    table = Table(title=f"tierserve cache {cache_dir}", title_justify="left")
    for column in ("kind", "name", "size", "used", "why"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for entry in entries:
        used = Text("yes", style="green") if entry.kept else Text("no", style="yellow")
        table.add_row(entry.kind.value, entry.path.name, mib(entry.size_bytes), used, entry.reason)
    return table
