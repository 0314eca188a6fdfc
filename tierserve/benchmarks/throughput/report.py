"""The markdown report and the plot of `bench throughput` (tokens/s against TPOT)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tierserve.benchmarks.livepool import MATPLOTLIB_MISSING, import_pyplot

# The markdown and the plot beside the JSON (FILE.md, FILE.png), as bench routing writes them.
from tierserve.benchmarks.routing import output_paths as output_paths
from tierserve.benchmarks.throughput.figures import MODES, ON


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| tier | batching | streams | tokens/s | vs 1 stream | vs batching off | TPOT p50 / p99 ms "
        "| TTFT p50 / p99 ms | worker RSS MiB (peak) | batch peak | KV tokens peak | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        failed = ", ".join(f"{k} {v}" for k, v in r["failures"].items()) or "-"
        lines.append(
            f"| {r['tier']} | {r['batching']} | {r['concurrency']} | {_f(r['tokens_per_s'], '.1f')} "
            f"| {_x(r['tokens_per_s_vs_1'])} | {_x(r['tokens_per_s_vs_off'])} "
            f"| {_f(r['tpot_p50_ms'], '.1f')} / {_f(r['tpot_p99_ms'], '.1f')} "
            f"| {_f(r['ttft_p50_ms'], '.0f')} / {_f(r['ttft_p99_ms'], '.0f')} "
            f"| {_f(r['worker_rss_mib_peak'], '.0f')} | {_f(r['batch_running_peak'], 'd')} "
            f"| {_f(r['kv_tokens_peak'], 'd')} | {failed} |"
        )
    return "\n".join(lines)


def _agreement(agreement: Mapping[str, Any]) -> str:
    if not agreement["compared"]:
        return "n/a"
    text = (
        f"{agreement['identical']}/{agreement['compared']} identical "
        f"({agreement['share']:.0%}; common prefix {agreement['prefix_share']:.0%})"
    )
    return text if agreement["reference_consistent"] else text + ", one-at-a-time runs differ too"


def summary_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| tier | batching served | 8 vs 1 stream | 16 vs 1 stream | TPOT p50 at 8 vs 1 "
        "| batching off: 8 vs 1 | greedy text, batched vs one at a time |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for s in summaries:
        served = "n/a" if s["batching_enabled"] is None else ("yes" if s["batching_enabled"] else "NO")
        if s["batching_enabled"]:
            served += f" (max {s['max_batch']}, KV {s['kv_tokens_budget']} tokens)"
        lines.append(
            f"| {s['tier']} | {served} | {_x(s['ratio_8_vs_1'])} | {_x(s['ratio_16_vs_1'])} "
            f"| {_x(s['tpot_p50_vs_1'][ON].get('8'))} | {_x(s['scaling']['off'].get('8'))} "
            f"| {_agreement(s['agreement'])} |"
        )
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("MET" if met else "NOT MET")


def render_markdown(
    rows: Sequence[Mapping[str, Any]],
    summaries: Sequence[Mapping[str, Any]],
    targets: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> str:
    lines = [
        "# tierserve throughput: concurrent streams, continuous batching on and off",
        "",
        f"Closed loop through the router: at each level that many streams each send the next greedy "
        f"request as soon as the last one ends ({meta['requests_rule']}); prompts of "
        f"{', '.join(map(str, meta['prompt_words']))} words in turn; {meta['new_tokens']} new tokens. "
        "tokens/s: every token received over the level's wall time; TPOT: every gap between tokens as "
        "the client saw it; TTFT: send to first token, waiting included. Batching off is a second pool "
        "with `[batching] enabled = false` (one request at a time), in the same run. "
        f"Workers: {meta['layout']}.",
        "",
        "## Per tier",
        "",
        summary_table(summaries),
        "",
        "## Every level",
        "",
        rows_table(rows),
    ]
    if targets:
        lines += ["", "## Targets", ""]
        lines += [f"- {t['tier']}: {t['rule']}: {_x(t['value'])}, {_verdict(t['met'])}" for t in targets]
    notes = [n for s in summaries for n in s["notes"]] + list(meta.get("notes", []))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _point_labels(points: Sequence[tuple[float, float, int]]) -> list[tuple[tuple[float, float], str]]:
    """One label per run of points that lie on top of each other (one at a time, every level has the
    same TPOT and rate): "1-16" rather than five labels in one place."""
    groups: list[list[tuple[float, float, int]]] = []
    for point in points:
        last = groups[-1][-1] if groups else None
        if last is not None and all(
            abs(a - b) <= 0.03 * abs(b) for a, b in zip(point[:2], last[:2], strict=True)
        ):
            groups[-1].append(point)
        else:
            groups.append([point])
    labels = []
    for group in groups:
        first, last_streams = group[0][2], group[-1][2]
        label = str(first) if first == last_streams else f"{first}-{last_streams}"
        labels.append(((group[-1][0], group[-1][1]), label))
    return labels


def write_plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> str:
    """Aggregate tokens/s against TPOT p50, one line per tier and mode, each point labelled with its
    streams; or the notice that matplotlib is missing."""
    pyplot = import_pyplot()
    if pyplot is None:
        return MATPLOTLIB_MISSING
    figure, axes = pyplot.subplots(figsize=(8, 5))
    tiers = list(dict.fromkeys(str(r["tier"]) for r in rows))
    colors = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for t, tier in enumerate(tiers):
        for mode in MODES:
            mine = sorted(
                (r for r in rows if r["tier"] == tier and r["batching"] == mode and r["tokens_per_s"]),
                key=lambda r: int(r["concurrency"]),
            )
            points = [(r["tpot_p50_ms"], r["tokens_per_s"], r["concurrency"]) for r in mine]
            points = [p for p in points if p[0] is not None]
            if not points:
                continue
            axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o" if mode == ON else "s",
                linestyle="-" if mode == ON else "--",
                color=colors[t % len(colors)],
                label=f"{tier}, batching {mode}",
            )
            for (tpot, rate), label in _point_labels(points):
                axes.annotate(label, (tpot, rate), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("TPOT p50, ms (each token's gap as the client saw it)")
    axes.set_ylabel("aggregate tokens/s")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return f"wrote {path}"
