"""The figures of `bench tiers` and the files it writes: one JSON row per path, which paths are
dominated (both slower and less accurate than another), the markdown table and the plot. Pure but
for the plot.
"""

from __future__ import annotations

import importlib
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve.benchmarks.tiers.floor import floor_ms, percent_of_floor
from tierserve.benchmarks.tiers.measure import SHORT_PROMPT_TOKENS
from tierserve.domain.cores import format_cpu_list
from tierserve.domain.latency import percentile
from tierserve.domain.quality import effective_loss

# Perplexity deltas closer than this many percentage points count as equally accurate.
ACCURACY_TIE_PCT = 0.05


@dataclass
class PathMeasurement:
    """What one path's subprocess measured (its JSON reply, typed)."""

    tier: str
    backend: str
    kernel: str
    load_s: float
    rss_mb: float
    threads: int
    cpus: list[int]
    # Per measured run: every token's latency from the 32-token prompt (the first is the TTFT).
    runs_us: list[list[int]]
    # Per measured run: the TTFT from the 256-token prompt.
    ttft_256_us: list[int]
    cpu_share: float
    text: str = ""
    card: dict[str, float] | None = None
    artifact_cached: bool | None = None
    build_s: float | None = None
    # Bytes of weights one decode step reads (floor.decode_weight_bytes; llama.cpp: the GGUF file).
    weight_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> PathMeasurement:
        return PathMeasurement(
            tier=str(data["tier"]),
            backend=str(data["backend"]),
            kernel=str(data["kernel"]),
            load_s=float(data["load_s"]),
            rss_mb=float(data["rss_mb"]),
            threads=int(data["threads"]),
            cpus=[int(c) for c in data["cpus"]],
            runs_us=[[int(v) for v in run] for run in data["runs_us"]],
            ttft_256_us=[int(v) for v in data["ttft_256_us"]],
            cpu_share=float(data["cpu_share"]),
            text=str(data.get("text", "")),
            card=None if data.get("card") is None else {k: float(v) for k, v in data["card"].items()},
            artifact_cached=data.get("artifact_cached"),
            build_s=None if data.get("build_s") is None else float(data["build_s"]),
            weight_bytes=None if data.get("weight_bytes") is None else int(data["weight_bytes"]),
            extra=dict(data.get("extra") or {}),
        )

    def tpot_us(self) -> list[int]:
        return [latency for run in self.runs_us for latency in run[1:]]

    def tpot_ms(self) -> float | None:
        tpot = self.tpot_us()
        return statistics.median(tpot) / 1e3 if tpot else None

    def tpot_p95_ms(self) -> float | None:
        tpot = self.tpot_us()
        return percentile(tpot, 0.95) / 1e3 if tpot else None

    def ttft_ms(self) -> float | None:
        return statistics.median(run[0] for run in self.runs_us) / 1e3 if self.runs_us else None

    def ttft_256_ms(self) -> float | None:
        return statistics.median(self.ttft_256_us) / 1e3 if self.ttft_256_us else None

    def tokens_per_s(self) -> float | None:
        tokens = sum(len(run) for run in self.runs_us)
        seconds = sum(sum(run) for run in self.runs_us) / 1e6
        return tokens / seconds if seconds else None


def speedup(baseline_tpot_ms: float | None, tpot_ms: float | None) -> float | None:
    """How many times faster per token than the baseline; None when either figure is missing."""
    if not baseline_tpot_ms or not tpot_ms:
        return None
    return baseline_tpot_ms / tpot_ms


def _rounded(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def result_row(
    measurement: PathMeasurement, baseline_tpot_ms: float | None, bandwidth_bytes_per_s: float | None = None
) -> dict[str, Any]:
    """One object of the JSON list; dominance fields are filled in by `mark_dominated`. With the
    measured read bandwidth, also the path's memory-bandwidth floor and how close it comes to it."""
    m, card = measurement, measurement.card or {}
    floor = floor_ms(m.weight_bytes, bandwidth_bytes_per_s)
    return {
        "tier": m.tier,
        "backend": m.backend,
        "kernel": m.kernel,
        "tpot_ms": _rounded(m.tpot_ms(), 3),
        "tpot_p95_ms": _rounded(m.tpot_p95_ms(), 3),
        "ttft_ms": _rounded(m.ttft_ms(), 3),
        "ttft_256_ms": _rounded(m.ttft_256_ms(), 3),
        "tokens_per_s": _rounded(m.tokens_per_s(), 2),
        "speedup_vs_hf_fp32": _rounded(speedup(baseline_tpot_ms, m.tpot_ms()), 3),
        "weight_mb": _rounded(None if m.weight_bytes is None else m.weight_bytes / 1e6, 2),
        "floor_ms": _rounded(floor, 3),
        "floor_pct": _rounded(percent_of_floor(floor, m.tpot_ms()), 1),
        "ppl": _rounded(card.get("perplexity"), 4),
        "ppl_delta_pct": _rounded(card.get("perplexity_delta_pct"), 4),
        "kld": _rounded(card.get("kl_divergence"), 6),
        "top1_agree": _rounded(card.get("top1_agreement"), 4),
        "eval_tokens": None if "eval_tokens" not in card else int(card["eval_tokens"]),
        "reference_ppl": _rounded(card.get("reference_perplexity"), 4),
        "rss_mb": _rounded(m.rss_mb, 1),
        "load_s": _rounded(m.load_s, 2),
        "artifact_cached": m.artifact_cached,
        "build_s": _rounded(m.build_s, 1),
        "cpu_share": _rounded(m.cpu_share, 3),
        "runs": len(m.runs_us),
        "generated_tokens": min((len(run) for run in m.runs_us), default=0),
        "threads": m.threads,
        "cpus": format_cpu_list(m.cpus),
        "text": m.text,
        "dominated_by": None,
        "dominated_note": None,
        **m.extra,
    }


def _loss(row: Mapping[str, Any]) -> float:
    """The path's loss as the router counts it; paths outside the tiers (transformers eager, the
    llama.cpp peer) are compared by their measured change like any tier."""
    return effective_loss(str(row["tier"]), float(row["ppl_delta_pct"]))


def find_dominators(
    rows: Sequence[Mapping[str, Any]], tie_pct: float = ACCURACY_TIE_PCT
) -> dict[str, list[str]]:
    """For each path, the paths both faster (lower tpot_ms) and more accurate (loss lower by more
    than tie_pct points). Paths missing either figure neither dominate nor are dominated."""
    scored = [r for r in rows if r.get("tpot_ms") is not None and r.get("ppl_delta_pct") is not None]
    return {
        str(row["tier"]): [
            str(other["tier"])
            for other in scored
            if other is not row and other["tpot_ms"] < row["tpot_ms"] and _loss(other) < _loss(row) - tie_pct
        ]
        for row in scored
    }


def _figures(row: Mapping[str, Any]) -> str:
    return f"TPOT {row['tpot_ms']:.2f} ms, perplexity {row['ppl_delta_pct']:+.2f}%"


# The default model's GGUF file stores its weights in Q4_1 blocks of this many weights.
GGUF_Q4_1_BLOCK = 32
INT4_TIER = "int4-woq"


def four_bit_source_note(int4_group_size: int) -> str | None:
    """Why int4-woq beats the higher-precision tiers on accuracy too, when it does on the default
    model: that model's full-precision weights are the dequantized 4-bit weights of its GGUF file
    (an asymmetric scale and minimum per block of 32), which int4 with groups that divide the block
    reproduces almost exactly. None when the group size does not line up (then int4 loses as usual)."""
    if int4_group_size <= 0 or GGUF_Q4_1_BLOCK % int4_group_size:
        return None
    return (
        f" {INT4_TIER}'s accuracy is the model's doing, not the CPU's: the default model's "
        f"full-precision weights are the dequantized 4-bit weights of its GGUF file "
        f"(Q4_1, blocks of {GGUF_Q4_1_BLOCK}), which "
        f"{INT4_TIER} with groups of {int4_group_size} reproduces almost exactly, so on this model no "
        f"8- or 16-bit tier can be more accurate by more than noise, and none reads fewer bytes per "
        f"token. With groups that straddle the blocks (64) int4 loses tens of percent; a model with "
        f"genuinely full-precision weights shows the usual order."
    )


def dominance_note(
    row: Mapping[str, Any],
    dominators: Sequence[Mapping[str, Any]],
    woq_fast: bool,
    isa_summary: str,
    source_note: str | None = None,
) -> str:
    """Why a path is dominated: by whom; for weight-only tiers on CPUs without IPEX's fast kernels,
    the reason it is slow; when int4-woq dominates on a model whose weights came from 4 bits
    (`source_note`), why int4 is that accurate."""
    others = "; ".join(f"{d['tier']} ({_figures(d)})" for d in dominators)
    note = f"{row['tier']} ({_figures(row)}) is both slower and less accurate than {others}."
    if str(row["tier"]).endswith("-woq") and not woq_fast:
        note += (
            " IPEX's fast weight-only-quantization kernels are compiled only for CPUs with AMX and "
            f"AVX512_FP16, which this CPU lacks (it has {isa_summary}), so this tier runs its native "
            f"path: {row['kernel']}."
        )
    if source_note and any(d["tier"] == INT4_TIER for d in dominators):
        note += source_note
    return note


def mark_dominated(
    rows: list[dict[str, Any]], woq_fast: bool, isa_summary: str, source_note: str | None = None
) -> list[str]:
    """Fill in dominated_by / dominated_note on every row; returns the notes, in row order."""
    dominators = find_dominators(rows)
    by_name = {str(r["tier"]): r for r in rows}
    notes = []
    for row in rows:
        names = dominators.get(str(row["tier"]), [])
        if not names:
            row["dominated_by"], row["dominated_note"] = None, None
            continue
        note = dominance_note(row, [by_name[n] for n in names], woq_fast, isa_summary, source_note)
        row["dominated_by"], row["dominated_note"] = names, note
        notes.append(note)
    return notes


def cell(value: Any, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| path | TPOT ms | % of floor | TTFT@32 ms | TTFT@256 ms | tokens/s | speed-up vs HF eager fp32 "
        "| ppl | ppl delta % | KL | top-1 agree | RSS MB | load s | CPU share | dominated by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        cached = "" if row.get("artifact_cached") in (None, True) else " (built)"
        lines.append(
            f"| {row['tier']} | {cell(row['tpot_ms'], '.2f')} | {cell(row.get('floor_pct'), '.0f', '%')} "
            f"| {cell(row['ttft_ms'], '.1f')} | {cell(row['ttft_256_ms'], '.1f')} "
            f"| {cell(row['tokens_per_s'], '.1f')} "
            f"| {cell(row['speedup_vs_hf_fp32'], '.2f', 'x')} | {cell(row['ppl'], '.3f')} "
            f"| {cell(row['ppl_delta_pct'], '+.2f')} | {cell(row['kld'], '.5f')} "
            f"| {cell(row['top1_agree'], '.1%')} | {cell(row['rss_mb'], '.0f')} "
            f"| {cell(row['load_s'], '.1f')}{cached} | {cell(row['cpu_share'], '.0%')} "
            f"| {', '.join(row['dominated_by'] or []) or '-'} |"
        )
    return "\n".join(lines)


def render_markdown(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    machine = meta["machine"]
    settings = meta["settings"]
    parts = [
        "# tierserve tiers: speed against accuracy",
        "",
        f"{machine['cpu_model']} ({machine['cpu_isa']}), CPUs {format_cpu_list(machine['usable_cpus'])}, "
        f"{settings['threads']} thread(s) per path; {settings['runs']} greedy run(s) of "
        f"{settings['new_tokens']} new tokens from a {SHORT_PROMPT_TOKENS}-token prompt; accuracy against "
        "the fp32 reference on the evaluation text.",
        "",
        markdown_table(rows),
        "",
        "Kernels:",
        "",
        *[f"- {row['tier']}: {row['kernel']}" for row in rows],
    ]
    parts += ["", *floor_lines(rows, meta.get("read_bandwidth"))]
    dominated = [row for row in rows if row.get("dominated_note")]
    parts += ["", "Dominated (slower and less accurate than another path):", ""]
    parts += [f"- {row['dominated_note']}" for row in dominated] or ["- none"]
    if meta.get("notes"):
        parts += ["", "Notes:", "", *[f"- {note}" for note in meta["notes"]]]
    return "\n".join(parts) + "\n"


def floor_lines(rows: Sequence[Mapping[str, Any]], bandwidth: Mapping[str, Any] | None) -> list[str]:
    """How the "% of floor" column was computed, and each path's figures behind it."""
    if not bandwidth:
        return ["Memory-bandwidth floor: not measured."]
    return [
        f"Memory-bandwidth floor: bytes of weights read per token / {bandwidth['gb_per_s']:.1f} GB/s, the "
        f"read bandwidth measured here (best of {bandwidth['repeats']} sums of a {bandwidth['buffer_mib']} "
        f"MiB buffer, {bandwidth['threads']} thread(s)); % of floor = floor / TPOT.",
        "",
        *[
            f"- {row['tier']}: {cell(row.get('weight_mb'), '.1f')} MB per token, "
            f"floor {cell(row.get('floor_ms'), '.2f')} ms"
            for row in rows
        ],
    ]


def output_paths(out: Path) -> tuple[Path, Path, Path]:
    """The meta JSON, markdown and plot written next to --out: <out>.meta.json, <out>.md, <out>.png."""
    stem = out.with_suffix("") if out.suffix == ".json" else out
    return (
        stem.with_name(stem.name + ".meta.json"),
        stem.with_name(stem.name + ".md"),
        stem.with_name(stem.name + ".png"),
    )


def write_plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> str:
    """TPOT against perplexity delta, one labelled point per path; returns what was done."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib is not installed (pip install 'tierserve[bench]'): no plot written"
    matplotlib.use("Agg")
    pyplot = importlib.import_module("matplotlib.pyplot")
    points = [r for r in rows if r.get("tpot_ms") is not None and r.get("ppl_delta_pct") is not None]
    if not points:
        return "no path has both a TPOT and a perplexity delta: no plot written"
    figure, axes = pyplot.subplots(figsize=(8, 5.5))
    for row in points:
        dominated = bool(row.get("dominated_by"))
        axes.scatter(
            row["tpot_ms"],
            row["ppl_delta_pct"],
            s=60,
            color="tab:grey" if dominated else "tab:blue",
            marker="x" if dominated else "o",
            zorder=3,
        )
        axes.annotate(
            str(row["tier"]),
            (row["tpot_ms"], row["ppl_delta_pct"]),
            xytext=(6, 5),
            textcoords="offset points",
        )
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_xscale("log")
    axes.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    axes.set_xlabel("TPOT, median ms per token (log scale; lower is faster)")
    axes.set_ylabel("perplexity delta vs fp32 reference, % (lower is more accurate)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return f"wrote {path}"
