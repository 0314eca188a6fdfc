"""`tierserve bench tiers`: every quantization tier, a plain transformers baseline and llama.cpp,
measured the same way on the same CPUs, speed against accuracy.

    tierserve bench tiers --out bench-results/tiers.json [--tiers fp32,bf16] [--runs 5] [--new-tokens 64]

Each path runs in its own subprocess (`python -m tierserve.benchmarks.tiers --worker --spec FILE`,
which prints one JSON object as its last line of output), one after the other, never two at once.
Every subprocess is pinned to all CPUs this process may use, with torch (or llama.cpp) threads equal
to their count.

Paths:

- `hf-eager-fp32`: a plain `AutoModelForCausalLM` in fp32 (no IPEX), wrapped in a `LoadedModel` and
  driven by the worker's own `Engine`, so it is timed exactly as the tiers are. Its accuracy card is
  measured against the fp32 reference like any tier's (expected: about zero).
- every tier: `prepare_tier` (the cached artifact and card; a tier whose artifact is missing is built
  first in a separate subprocess, so load time and memory always describe a start from the cache).
- `llamacpp-gguf-q4_1` (when `llama_cpp` imports, the `bench` extra): llama-cpp-python on the GGUF file
  the default model was converted from, fed the very same prompt token ids; its card is computed from
  `logits_all` scores of `eval()` on the same evaluation chunks, against the same fp32 reference.

Figures:

- load_s: wall time of `prepare_tier` (baseline: `from_pretrained`; llama.cpp: `Llama(...)`).
- rss_mb: the process's resident memory after warm-up (greedy and sampled runs, as a worker does,
  then one greedy run of each measured prompt).
- ttft_ms / ttft_256_ms: median over the runs of the first token's latency for a prompt of exactly
  32 / 256 tokens (cut from the evaluation text), prefill included.
- tpot_ms: median of every per-token latency except each run's first, over `--runs` greedy runs of
  `--new-tokens` tokens from the 32-token prompt; tokens_per_s: their tokens over their summed latencies.
- speedup_vs_hf_fp32: the baseline's tpot_ms divided by the path's.
- ppl, ppl_delta_pct, kld, top1_agree: the path's accuracy card against the fp32 reference.
- cpu_share: CPU time used during the measured runs over wall time x CPUs; well below 1, something else
  competed for the CPUs and the latencies are inflated.
- dominated_by: the paths that are both faster (lower tpot_ms) and more accurate (ppl_delta_pct, a
  gain counted as zero, lower by more than ACCURACY_TIE_PCT points), or null.

Besides the JSON list (one object per path) it writes `<out>.meta.json` (machine, settings, notes),
`<out>.md` (the table) and `<out>.png` (TPOT against perplexity delta), where <out> is --out without
its `.json` suffix.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from tierserve.domain.config import ConfigError, TierserveConfig, default_config, load_config, parse_config
from tierserve.domain.cores import format_cpu_list
from tierserve.domain.latency import percentile
from tierserve.domain.quality import effective_loss
from tierserve.domain.tiers import TIER_NAMES

if TYPE_CHECKING:
    import torch

    from tierserve.worker.accuracy import AccuracyCard
    from tierserve.worker.engine import Engine, GenerationOutcome
    from tierserve.worker.tiers.base import LoadedModel

BASELINE = "hf-eager-fp32"
LLAMACPP = "llamacpp-gguf-q4_1"
SHORT_PROMPT_TOKENS = 32
LONG_PROMPT_TOKENS = 256
LLAMACPP_CONTEXT_TOKENS = 1024
# Like a worker's default warm-up: this many rounds of a greedy and a sampled generation of this
# prompt (worker.server's; copied, since importing worker.server imports IPEX into the baseline).
WARMUP_RUNS = 2
WARMUP_PROMPT = (
    "The history of computing is a story of machines that grew smaller and faster every decade, "
    "from rooms full of vacuum tubes to chips that fit in a pocket."
)
WARMUP_NEW_TOKENS = 16
# Below this CPU share the measured process evidently shared its CPUs with something else
# (the same threshold as bench/skeleton_latency.py).
CONTENDED_CPU_SHARE = 0.85
# Perplexity deltas closer than this many percentage points count as equally accurate.
ACCURACY_TIE_PCT = 0.05
# A subprocess that builds an artifact for a slow tier (card scored token by token) takes long.
WORKER_TIMEOUT_S = 4 * 3600.0
RECOMMENDED_RUNS = 5
RESULT_MARKER = "TIERSERVE-BENCH-RESULT "


# --- prompts ------------------------------------------------------------------------------------------


def exact_token_prompt(tokenizer: Any, text: str, n_tokens: int, search: int = 16) -> str:
    """A prefix of `text` that `tokenizer(prompt)` (as the Engine calls it) encodes to exactly n_tokens.

    Cutting the token ids of `text` and decoding does not always re-encode to the same count (a word
    cut mid-way may merge differently), so nearby cut points are tried, nearest first.
    """

    def count(candidate: str) -> int:
        return len(tokenizer(candidate)["input_ids"])

    ids: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    target = n_tokens - count("")  # the special tokens the tokenizer adds (SmolLM2's: a BOS token)
    if target < 1:
        raise ValueError(f"a {n_tokens}-token prompt leaves no room for text after the special tokens")
    if len(ids) < target + search:
        raise ValueError(f"the text has {len(ids)} tokens; too short for a {n_tokens}-token prompt")
    for offset in sorted(range(-search, search + 1), key=lambda o: (abs(o), o)):
        if target + offset < 1:
            continue
        candidate = tokenizer.decode(ids[: target + offset], clean_up_tokenization_spaces=False)
        if count(candidate) == n_tokens:
            return str(candidate)
    raise ValueError(f"no prefix of the text encodes to exactly {n_tokens} tokens")


# --- figures, dominance and reports (pure) ----------------------------------------------------------


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


def result_row(measurement: PathMeasurement, baseline_tpot_ms: float | None) -> dict[str, Any]:
    """One object of the JSON list; dominance fields are filled in by `mark_dominated`."""
    m, card = measurement, measurement.card or {}
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


def _cell(value: Any, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| path | TPOT ms | TTFT@32 ms | TTFT@256 ms | tokens/s | speed-up vs HF eager fp32 | ppl "
        "| ppl delta % | KL | top-1 agree | RSS MB | load s | CPU share | dominated by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        cached = "" if row.get("artifact_cached") in (None, True) else " (built)"
        lines.append(
            f"| {row['tier']} | {_cell(row['tpot_ms'], '.2f')} | {_cell(row['ttft_ms'], '.1f')} "
            f"| {_cell(row['ttft_256_ms'], '.1f')} | {_cell(row['tokens_per_s'], '.1f')} "
            f"| {_cell(row['speedup_vs_hf_fp32'], '.2f', 'x')} | {_cell(row['ppl'], '.3f')} "
            f"| {_cell(row['ppl_delta_pct'], '+.2f')} | {_cell(row['kld'], '.5f')} "
            f"| {_cell(row['top1_agree'], '.1%')} | {_cell(row['rss_mb'], '.0f')} "
            f"| {_cell(row['load_s'], '.1f')}{cached} | {_cell(row['cpu_share'], '.0%')} "
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
    dominated = [row for row in rows if row.get("dominated_note")]
    parts += ["", "Dominated (slower and less accurate than another path):", ""]
    parts += [f"- {row['dominated_note']}" for row in dominated] or ["- none"]
    if meta.get("notes"):
        parts += ["", "Notes:", "", *[f"- {note}" for note in meta["notes"]]]
    return "\n".join(parts) + "\n"


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


def card_from_log_probs(
    chunks: Sequence[Sequence[int]],
    mine: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
) -> AccuracyCard:
    """An accuracy card from another runtime's log-probabilities, with worker.accuracy.measure_card's
    arithmetic (that function scores a LoadedModel through `generate`, which llama.cpp is not)."""
    import torch

    from tierserve.worker.accuracy import AccuracyCard

    total = sum(len(c) - 1 for c in chunks)
    nll = ref_nll = kl = agree = 0.0
    for chunk, my_lp, ref in zip(chunks, mine, reference, strict=True):
        targets = torch.tensor(list(chunk[1:]))
        nll -= my_lp.gather(1, targets[:, None]).sum().item()
        ref_nll -= ref.gather(1, targets[:, None]).sum().item()
        kl += (ref.exp() * (ref - my_lp)).sum().item()
        agree += (ref.argmax(-1) == my_lp.argmax(-1)).sum().item()
    perplexity, reference_perplexity = math.exp(nll / total), math.exp(ref_nll / total)
    return AccuracyCard(
        perplexity=perplexity,
        perplexity_delta_pct=100.0 * (perplexity - reference_perplexity) / reference_perplexity,
        kl_divergence=max(0.0, kl / total),
        top1_agreement=agree / total,
        eval_tokens=total,
        reference_perplexity=reference_perplexity,
    )


# --- the measured subprocess ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a path's subprocess needs; the same prompts and settings for every path."""

    path: str
    config: dict[str, Any]
    model_dir: str
    gguf_file: str
    cpus: list[int]
    runs: int
    new_tokens: int
    short_prompt: str
    long_prompt: str
    short_ids: list[int]
    long_ids: list[int]
    eos_ids: list[int]

    def save(self, file: Path) -> None:
        file.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @staticmethod
    def load(file: Path) -> WorkerSpec:
        return WorkerSpec(**json.loads(file.read_text(encoding="utf-8")))


def _log(path: str, message: str) -> None:
    print(f"[{path}] {message}", file=sys.stderr, flush=True)


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


@contextlib.contextmanager
def _cpu_share(threads: int, sink: list[float]) -> Iterator[None]:
    """Appends to sink the CPU time used inside the block over its wall time x threads."""
    cpu, wall = time.process_time(), time.perf_counter()
    yield
    elapsed = time.perf_counter() - wall
    sink.append((time.process_time() - cpu) / (elapsed * threads) if elapsed > 0 else 0.0)


def _engine_generate(
    engine: Engine, prompt: str, new_tokens: int, expect_tokens: int | None, sampled: bool = False
) -> GenerationOutcome:
    from tierserve.domain.requests import GenerationParams, SamplingParams

    sampling = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=1) if sampled else SamplingParams()
    params = GenerationParams(prompt, new_tokens, sampling, (), "bench")
    prepared = engine.prepare(params)
    if expect_tokens is not None and prepared.prompt_tokens != expect_tokens:
        raise RuntimeError(f"the prompt is {prepared.prompt_tokens} tokens, expected {expect_tokens}")
    return engine.generate(prepared, params, emit=lambda _: None)


def _load_hf_eager(model_dir: Path) -> LoadedModel:
    """Plain transformers fp32, no IPEX: the baseline, in the shape the Engine drives."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tierserve.worker.tiers.base import LoadedModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        backend=f"transformers {transformers.__version__}",
        kernel=(
            f"transformers eager fp32 (no IPEX), torch {torch.__version__}, "
            f"CPU ISA {torch.backends.cpu.get_cpu_capability()}"
        ),
        dtype=torch.float32,
        context_tokens=int(model.config.max_position_embeddings),
    )


def _manifest_times(artifacts_root: Path) -> dict[Path, int]:
    if not artifacts_root.is_dir():
        return {}
    return {
        folder: (folder / "manifest.json").stat().st_mtime_ns
        for folder in artifacts_root.iterdir()
        if (folder / "manifest.json").is_file()
    }


def torch_worker(spec: WorkerSpec) -> dict[str, Any]:
    """A tier or the baseline: load, warm up, measure with the Engine."""
    import torch

    from tierserve.ops.pinning import pin_process
    from tierserve.worker.engine import Engine

    pinning = pin_process(spec.cpus)
    config = parse_config(spec.config, source="benchmark spec")
    model_dir = Path(spec.model_dir)
    reply: dict[str, Any] = {"tier": spec.path, "artifact_cached": None, "build_s": None}

    started = time.perf_counter()
    if spec.path == BASELINE:
        loaded = _load_hf_eager(model_dir)
        card = None
    else:
        from tierserve.worker.preparation import prepare_tier

        stages: list[str] = []

        def progress(stage: str, done: int, total: int) -> None:
            if not stages or stages[-1] != stage:
                stages.append(stage)
                _log(spec.path, stage)

        artifacts_root = config.model.resolved_cache_dir() / "artifacts"
        before = _manifest_times(artifacts_root)
        prepared = prepare_tier(config, spec.path, progress, Console(stderr=True))
        loaded, card = prepared.loaded, asdict(prepared.card)
        manifest = prepared.artifact_dir / "manifest.json"
        cached = before.get(prepared.artifact_dir) == manifest.stat().st_mtime_ns
        if not cached:
            # Building leaves calibration and scoring garbage behind; the parent measures again.
            return {**reply, "status": "built", "build_s": time.perf_counter() - started}
        reply["artifact_cached"] = True
    load_s = time.perf_counter() - started
    _log(spec.path, f"loaded in {load_s:.1f} s: {loaded.kernel}")

    engine = Engine(loaded, config.limits.max_context_tokens)
    for run in range(WARMUP_RUNS):
        for sampled in (False, True):
            _engine_generate(engine, WARMUP_PROMPT, WARMUP_NEW_TOKENS, None, sampled)
        _log(spec.path, f"warm-up {run + 1}/{WARMUP_RUNS}")
    _engine_generate(engine, spec.short_prompt, spec.new_tokens, SHORT_PROMPT_TOKENS)
    _engine_generate(engine, spec.long_prompt, 1, LONG_PROMPT_TOKENS)
    rss_mb = _rss_mb()

    runs_us: list[list[int]] = []
    ttft_256_us: list[int] = []
    text = ""
    share: list[float] = []
    with _cpu_share(pinning.threads, share):
        for _ in range(spec.runs):
            outcome = _engine_generate(engine, spec.short_prompt, spec.new_tokens, SHORT_PROMPT_TOKENS)
            runs_us.append(outcome.token_latencies_us)
            text = outcome.text
            ttft_256_us.append(_engine_generate(engine, spec.long_prompt, 1, LONG_PROMPT_TOKENS).ttft_us)
    _log(spec.path, f"measured {spec.runs} run(s); CPU share {share[0]:.0%}")

    if card is None:  # the baseline: scored like a tier, against the same fp32 reference
        card = asdict(_baseline_card(config, loaded, model_dir, spec.path))
    return {
        **reply,
        "status": "measured",
        "backend": loaded.backend,
        "kernel": loaded.kernel,
        "load_s": load_s,
        "rss_mb": rss_mb,
        "threads": torch.get_num_threads(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "runs_us": runs_us,
        "ttft_256_us": ttft_256_us,
        "cpu_share": share[0],
        "text": text,
        "card": card,
    }


def _eval_chunks(config: TierserveConfig, tokenizer: Any) -> list[list[int]]:
    from tierserve.domain.textsets import eval_path, read_paragraphs
    from tierserve.worker.accuracy import eval_chunks

    paragraphs = read_paragraphs(eval_path(config.data))
    return eval_chunks(tokenizer, paragraphs, config.data.eval_tokens, config.data.eval_chunk_tokens)


def _baseline_card(config: TierserveConfig, loaded: LoadedModel, model_dir: Path, path: str) -> AccuracyCard:
    from tierserve.worker.accuracy import measure_card, reference_log_probs

    _log(path, "measuring the accuracy card")
    chunks = _eval_chunks(config, loaded.tokenizer)
    return measure_card(loaded, chunks, reference_log_probs(model_dir, chunks))


def _llama_generate(
    llm: Any, prompt_ids: Sequence[int], max_tokens: int, eos_ids: set[int], sampled: bool = False
) -> tuple[list[int], list[int]]:
    """One generation through llama-cpp-python's token stream, each token timestamped as it arrives
    (and detokenized, as a streaming client's text would be): (latencies in us, token ids)."""
    if sampled:
        llm.set_seed(1)
        sampling: dict[str, Any] = {"temp": 0.8, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.0}
    else:
        sampling = {"temp": 0.0, "repeat_penalty": 1.0}
    llm.reset()  # no reuse of the previous run's KV cache: every run pays its full prefill
    latencies: list[int] = []
    tokens: list[int] = []
    last = time.perf_counter()
    for token in llm.generate(list(prompt_ids), reset=True, **sampling):
        now = time.perf_counter()
        latencies.append(int((now - last) * 1e6))
        last = now
        tokens.append(int(token))
        llm.detokenize([token])
        if token in eos_ids or len(tokens) >= max_tokens:
            break
    return latencies, tokens


def llamacpp_worker(spec: WorkerSpec) -> dict[str, Any]:
    """llama-cpp-python on the GGUF file: timed first (with nothing but llama_cpp imported, so its memory
    is its own), then scored against the fp32 reference."""
    from tierserve.ops.pinning import OsAffinity, plan_pinning

    pinning = plan_pinning(spec.cpus, OsAffinity().get())
    os.sched_setaffinity(0, set(pinning.cpus))
    llama_cpp = importlib.import_module("llama_cpp")
    threads = pinning.threads
    eos_ids = set(spec.eos_ids)

    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=spec.gguf_file,
        n_ctx=LLAMACPP_CONTEXT_TOKENS,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    for _ in range(WARMUP_RUNS):
        for sampled in (False, True):
            _llama_generate(llm, spec.short_ids, WARMUP_NEW_TOKENS, eos_ids, sampled)
    _llama_generate(llm, spec.short_ids, spec.new_tokens, eos_ids)
    _llama_generate(llm, spec.long_ids, 1, eos_ids)
    rss_mb = _rss_mb()

    runs_us: list[list[int]] = []
    ttft_256_us: list[int] = []
    tokens: list[int] = []
    share: list[float] = []
    with _cpu_share(threads, share):
        for _ in range(spec.runs):
            latencies, tokens = _llama_generate(llm, spec.short_ids, spec.new_tokens, eos_ids)
            runs_us.append(latencies)
            ttft_256_us.append(_llama_generate(llm, spec.long_ids, 1, eos_ids)[0][0])
    _log(LLAMACPP, f"measured {spec.runs} run(s); CPU share {share[0]:.0%}")
    text = llm.detokenize(tokens).decode("utf-8", errors="replace")
    system_info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    version = str(llama_cpp.__version__)
    del llm
    gc.collect()

    _log(LLAMACPP, "measuring the accuracy card")
    card, tokenization = _llamacpp_card(spec, llama_cpp, threads)
    return {
        "status": "measured",
        "tier": LLAMACPP,
        "backend": f"llama-cpp-python {version}",
        "kernel": (
            f"llama.cpp via llama-cpp-python {version}, GGUF {Path(spec.gguf_file).name}, "
            f"{threads} thread(s), n_ctx {LLAMACPP_CONTEXT_TOKENS}"
        ),
        "load_s": load_s,
        "rss_mb": rss_mb,
        "threads": threads,
        "cpus": sorted(os.sched_getaffinity(0)),
        "runs_us": runs_us,
        "ttft_256_us": ttft_256_us,
        "cpu_share": share[0],
        "text": text,
        "card": asdict(card),
        "extra": {"tokenization": tokenization, "llamacpp_system_info": system_info},
    }


def _llamacpp_card(spec: WorkerSpec, llama_cpp: Any, threads: int) -> tuple[AccuracyCard, dict[str, Any]]:
    import torch
    from transformers import AutoTokenizer

    from tierserve.domain.textsets import eval_path, read_paragraphs
    from tierserve.worker.accuracy import reference_log_probs

    config = parse_config(spec.config, source="benchmark spec")
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    chunks = _eval_chunks(config, tokenizer)
    scorer = llama_cpp.Llama(
        model_path=spec.gguf_file,
        n_ctx=max(LLAMACPP_CONTEXT_TOKENS, config.data.eval_chunk_tokens),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    # llama.cpp is fed the Hugging Face token ids (prompts and eval chunks, special tokens included);
    # check that both tokenizers turn the same text into the same ids, and which special tokens each adds.
    tokenization = compare_tokenizations(
        lambda text, special: list(tokenizer(text, add_special_tokens=special)["input_ids"]),
        lambda text, special: [
            int(t) for t in scorer.tokenize(text.encode("utf-8"), add_bos=special, special=False)
        ],
        ["\n\n".join(read_paragraphs(eval_path(config.data))), spec.short_prompt, spec.long_prompt],
    )
    _log(LLAMACPP, f"tokenization, Hugging Face against GGUF: {json.dumps(tokenization)}")

    reference = reference_log_probs(Path(spec.model_dir), chunks)
    if int(scorer.n_vocab()) != int(reference[0].shape[-1]):
        raise RuntimeError(f"GGUF vocabulary {scorer.n_vocab()} != model vocabulary {reference[0].shape[-1]}")
    mine = []
    for chunk in chunks:
        scorer.reset()
        scorer.eval(chunk)
        logits = torch.from_numpy(scorer.scores[: len(chunk) - 1].copy())
        mine.append(torch.log_softmax(logits.float(), dim=-1))
    return card_from_log_probs(chunks, mine, reference), tokenization


def compare_tokenizations(
    hf: Callable[[str, bool], list[int]], gguf: Callable[[str, bool], list[int]], texts: Sequence[str]
) -> dict[str, Any]:
    """Whether two tokenizers give the same ids for each text (without special tokens), and the special
    tokens each prepends on its own (its ids with special tokens, minus the text's)."""
    mismatches: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        a, b = hf(text, False), gguf(text, False)
        if a != b:
            first = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
            )
            mismatches.append(
                {"text": index, "hf_tokens": len(a), "gguf_tokens": len(b), "first_mismatch": first}
            )

    def prefix(tokenize: Callable[[str, bool], list[int]]) -> list[int]:
        plain, special = tokenize(texts[0], False), tokenize(texts[0], True)
        return special[: len(special) - len(plain)]

    return {
        "matches": not mismatches,
        "texts_compared": len(texts),
        "tokens_compared": sum(len(hf(text, False)) for text in texts),
        "mismatches": mismatches,
        "hf_special_prefix": prefix(hf),
        "gguf_special_prefix": prefix(gguf),
    }


def tokenization_note(tokenization: Mapping[str, Any]) -> str:
    hf_prefix, gguf_prefix = tokenization["hf_special_prefix"], tokenization["gguf_special_prefix"]
    verdict = (
        f"identical token ids from both tokenizers on the eval text and both prompts "
        f"({tokenization['tokens_compared']} tokens)"
        if tokenization["matches"]
        else f"the tokenizers DIFFER: {json.dumps(tokenization['mismatches'])}"
    )
    prefixes = (
        "both prepend the same special tokens"
        if hf_prefix == gguf_prefix
        else f"the Hugging Face tokenizer prepends {hf_prefix}, the GGUF one {gguf_prefix}"
    )
    return f"llama.cpp tokenization: {verdict}; {prefixes}; llama.cpp is fed the Hugging Face ids"


def run_worker(spec_file: Path) -> int:
    spec = WorkerSpec.load(spec_file)
    reply = llamacpp_worker(spec) if spec.path == LLAMACPP else torch_worker(spec)
    # Libraries print to stdout too; the parent takes the marked line.
    print(RESULT_MARKER + json.dumps(reply), flush=True)
    return 0


# --- the orchestrating process --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def select_tiers(requested: str | None, registered: Sequence[str]) -> tuple[list[str], list[str]]:
    """The tiers to measure (in TIER_NAMES order) and notes on the requested ones that are not registered."""
    names = [n.strip() for n in requested.split(",") if n.strip()] if requested else list(TIER_NAMES)
    unknown = [n for n in names if n not in TIER_NAMES]
    if unknown:
        raise ConfigError(f"--tiers: unknown tier(s) {', '.join(unknown)}; known: {', '.join(TIER_NAMES)}")
    chosen = [t for t in TIER_NAMES if t in names and t in registered]
    notes = [
        f"tier {t} skipped: not registered in worker.tiers (registered: {', '.join(registered)})"
        for t in TIER_NAMES
        if t in names and t not in registered
    ]
    return chosen, notes


def _eos_ids(tokenizer: Any, model_dir: Path) -> list[int]:
    """End of sequence as the Engine defines it: the tokenizer's and the generation config's."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    sources: list[Any] = [tokenizer.eos_token_id]
    with contextlib.suppress(OSError):
        sources.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return sorted(ids)


def _run_subprocess(spec: WorkerSpec, work_dir: Path) -> dict[str, Any]:
    spec_file = work_dir / f"{spec.path}.spec.json"
    spec.save(spec_file)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(len(spec.cpus)),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    }
    command = [sys.executable, "-m", "tierserve.benchmarks.tiers", "--worker", "--spec", str(spec_file)]
    completed = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=WORKER_TIMEOUT_S,
        check=False,
    )
    lines = completed.stdout.decode("utf-8", errors="replace").splitlines()
    replies = [line.removeprefix(RESULT_MARKER) for line in lines if line.startswith(RESULT_MARKER)]
    if completed.returncode != 0 or not replies:
        tail = "\n".join(lines[-5:])
        raise RuntimeError(f"the {spec.path} subprocess exited with code {completed.returncode}\n{tail}")
    reply: dict[str, Any] = json.loads(replies[-1])
    return reply


def measure_path(spec: WorkerSpec, work_dir: Path, console: Console) -> PathMeasurement:
    console.print(f"[bold]{spec.path}[/]: measuring on CPUs {format_cpu_list(spec.cpus)}")
    reply = _run_subprocess(spec, work_dir)
    build_s = None
    if reply["status"] == "built":
        build_s = float(reply["build_s"])
        console.print(
            f"  built the {spec.path} artifact in {build_s:.0f} s; measuring again from the cached artifact"
        )
        reply = _run_subprocess(spec, work_dir)
        if reply["status"] != "measured":
            raise RuntimeError(f"the {spec.path} artifact was rebuilt twice in a row")
        reply["artifact_cached"], reply["build_s"] = False, build_s
    measurement = PathMeasurement.from_json(reply)
    console.print(
        f"  TPOT {_cell(measurement.tpot_ms(), '.2f')} ms, TTFT {_cell(measurement.ttft_ms(), '.1f')} ms, "
        f"CPU share {measurement.cpu_share:.0%}"
    )
    if measurement.cpu_share < CONTENDED_CPU_SHARE:
        console.print(
            f"  [yellow]warning:[/] {spec.path} got only {measurement.cpu_share:.0%} of CPUs "
            f"{format_cpu_list(measurement.cpus)} while measured: another process competed for them, "
            "so its latencies are inflated"
        )
    return measurement


def _llamacpp_available(config: TierserveConfig) -> tuple[bool, str | None]:
    if config.model.path:
        return False, "llama.cpp peer skipped: it runs the default model's GGUF file, and [model] path is set"
    if importlib.util.find_spec("llama_cpp") is None:
        return False, "llama.cpp peer skipped: llama_cpp does not import (pip install 'tierserve[bench]')"
    return True, None


def run_tiers_benchmark(
    out: Path,
    config_path: str | None,
    tiers: str | None,
    runs: int,
    new_tokens: int,
    llamacpp: bool,
    console: Console,
) -> int:
    from transformers import AutoTokenizer

    from tierserve.domain.textsets import eval_path, read_paragraphs
    from tierserve.ops.modelprep import default_gguf_file, prepare_model
    from tierserve.worker.isa import CpuIsa
    from tierserve.worker.tiers import registered_tiers

    if runs < 1 or new_tokens < 2:
        raise ConfigError("--runs must be at least 1 and --new-tokens at least 2")
    started = time.perf_counter()
    cpus = sorted(os.sched_getaffinity(0))
    config = load_config(Path(config_path)) if config_path else default_config(cpus)
    chosen, notes = select_tiers(tiers, registered_tiers())
    if runs < RECOMMENDED_RUNS:
        notes.append(f"only {runs} run(s) per path: medians are noisier than with {RECOMMENDED_RUNS}")
    if llamacpp:
        llamacpp, why_not = _llamacpp_available(config)
        if why_not:
            notes.append(why_not)
    else:
        notes.append("llama.cpp peer skipped: --no-llamacpp")
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")

    model_dir = prepare_model(config.model, console)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "\n\n".join(read_paragraphs(eval_path(config.data)))
    short_prompt = exact_token_prompt(tokenizer, text, SHORT_PROMPT_TOKENS)
    long_prompt = exact_token_prompt(tokenizer, text, LONG_PROMPT_TOKENS)
    spec = WorkerSpec(
        path="",
        config=config.model_dump(mode="json"),
        model_dir=str(model_dir),
        gguf_file=str(default_gguf_file()) if llamacpp else "",
        cpus=cpus,
        runs=runs,
        new_tokens=new_tokens,
        short_prompt=short_prompt,
        long_prompt=long_prompt,
        short_ids=list(tokenizer(short_prompt)["input_ids"]),
        long_ids=list(tokenizer(long_prompt)["input_ids"]),
        eos_ids=_eos_ids(tokenizer, model_dir),
    )

    paths = [BASELINE, *chosen, *([LLAMACPP] if llamacpp else [])]
    measurements: list[PathMeasurement] = []
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tierserve-bench-tiers-") as work:
        for path in paths:
            try:
                measurements.append(measure_path(_with_path(spec, path), Path(work), console))
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as error:
                failed[path] = str(error)
                console.print(f"[red]{path} failed:[/] {escape(str(error))}")
    notes += [f"{path} failed: {why.splitlines()[0]}" for path, why in failed.items()]
    notes += [tokenization_note(m.extra["tokenization"]) for m in measurements if "tokenization" in m.extra]

    isa = CpuIsa.detect()
    baseline = next((m for m in measurements if m.tier == BASELINE), None)
    rows = [result_row(m, baseline.tpot_ms() if baseline else None) for m in measurements]
    # Only the default model (no [model] path) is known to come from a 4-bit file.
    source_note = None if config.model.path else four_bit_source_note(config.recipe(INT4_TIER).group_size)
    dominated = mark_dominated(rows, isa.ipex_woq_fast, isa.summary(), source_note)
    short_of_tokens = [r["tier"] for r in rows if r["generated_tokens"] < new_tokens]
    if short_of_tokens:
        notes.append(f"stopped at end of sequence before {new_tokens} tokens: {', '.join(short_of_tokens)}")

    meta_path, md_path, png_path = output_paths(out)
    meta: dict[str, Any] = {
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_isa": isa.summary(),
            "ipex_woq_fast": isa.ipex_woq_fast,
            "usable_cpus": cpus,
            "python": platform.python_version(),
            **{
                name: package_version(name)
                for name in ("torch", "intel-extension-for-pytorch", "transformers", "llama_cpp_python")
            },
        },
        "settings": {
            "paths": paths,
            "runs": runs,
            "new_tokens": new_tokens,
            "threads": len(cpus),
            "prompt_tokens": [SHORT_PROMPT_TOKENS, LONG_PROMPT_TOKENS],
            "short_prompt": short_prompt,
            "long_prompt": long_prompt,
            "eval_tokens": config.data.eval_tokens,
            "eval_chunk_tokens": config.data.eval_chunk_tokens,
            "accuracy_tie_pct": ACCURACY_TIE_PCT,
            "config": config_path or "default config for this machine",
            "model_dir": str(model_dir),
            "gguf_file": spec.gguf_file or None,
        },
        "dominated": dominated,
        "failed": failed,
        "notes": notes,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "outputs": {"results": str(out), "markdown": str(md_path), "plot": str(png_path)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(rows, meta), encoding="utf-8")
    plot_title = f"{config.model.name} on {cpu_model()}, {len(cpus)} thread(s): latency against accuracy"
    plot_message = write_plot(rows, png_path, plot_title)

    print(markdown_table(rows))
    print("\nDominated (slower and less accurate than another path):")
    for note in dominated or ["none"]:
        print(f"- {note}")
    console.print(f"wrote {out}, {meta_path}, {md_path}; {plot_message}", markup=False, highlight=False)
    return 1 if failed or not rows else 0


def _with_path(spec: WorkerSpec, path: str) -> WorkerSpec:
    return WorkerSpec(**{**asdict(spec), "path": path})


# --- entry point of the subprocess ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tierserve.benchmarks.tiers",
        description="One measured path of `tierserve bench tiers` (run that command instead).",
    )
    parser.add_argument("--worker", action="store_true", help="measure one path and print its JSON")
    parser.add_argument("--spec", type=Path, help="the path's spec file, written by the parent")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.worker or args.spec is None:
        parser.error("only --worker --spec FILE is run directly; use `tierserve bench tiers`")
    return run_worker(args.spec)


if __name__ == "__main__":
    sys.exit(main())
