"""The figures of `bench throughput`, from what the client timed and what the workers reported: one
row per tier, batching mode and concurrency; per tier the scaling against one stream, the greedy
text's agreement between batched and one-at-a-time runs, the targets, and why a weight-only tier
scales poorly. Pure: no servers, so unit tests feed it made-up calls."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tierserve.benchmarks.streamcall import CallResult
from tierserve.domain.latency import percentile

ON, OFF = "on", "off"
MODES = (ON, OFF)
# The targets (aggregate tokens/s at n streams over one stream; TPOT p50 likewise).
TARGETS: tuple[tuple[str, str, int, str, float], ...] = (
    ("bf16", "tokens_per_s", 8, ">=", 6.0),
    ("bf16", "tpot_p50_ms", 8, "<=", 1.35),
    ("bf16", "tokens_per_s", 16, ">=", 9.0),
    ("int8-sq", "tokens_per_s", 8, ">=", 5.0),
)
# Below this ratio at 8 streams a weight-only tier's report says why.
WEIGHT_ONLY_FLOOR = 3.0
EXPLAINED_AT = 8


@dataclass(frozen=True)
class WorkerSample:
    """One poll of the tier's workers (their Describe) during a level: summed over the tier's
    workers, RSS the largest of them."""

    rss_mib: float
    running: int
    waiting: int
    kv_tokens_used: int
    kv_cache_mb: float


@dataclass
class LevelRun:
    """One tier at one concurrency in one pool: every call, by the index of the prompt it sent."""

    tier: str
    batching: str
    concurrency: int
    calls: list[tuple[int, CallResult]] = field(default_factory=list)
    samples: list[WorkerSample] = field(default_factory=list)


def _p(values: Sequence[float], fraction: float) -> float | None:
    return round(percentile(values, fraction), 3) if values else None


def level_row(run: LevelRun) -> dict[str, Any]:
    """Aggregate tokens/s (every token received over the level's wall time, first send to last
    answer), TPOT p50/p99 over every gap between tokens as the client saw them, TTFT p50/p99 (send to
    first token, waiting included), and the workers' peaks."""
    calls = [c for _, c in run.calls]
    ok = [c for c in calls if c.status == "OK"]
    tokens = sum(len(c.token_times_s) for c in calls)
    wall_s = max(c.done_s for c in calls) - min(c.sent_s for c in calls) if calls else 0.0
    gaps = [g for c in ok for g in c.token_gaps_ms()]
    ttfts = [t for c in ok if (t := c.ttft_ms()) is not None]
    samples = run.samples
    return {
        "tier": run.tier,
        "batching": run.batching,
        "concurrency": run.concurrency,
        "requests": len(calls),
        "completed": len(ok),
        "failures": dict(Counter(c.status for c in calls if c.status != "OK")),
        "tokens": tokens,
        "tokens_per_request": round(tokens / len(calls), 1) if calls else None,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "tpot_p50_ms": _p(gaps, 0.50),
        "tpot_p99_ms": _p(gaps, 0.99),
        "ttft_p50_ms": _p(ttfts, 0.50),
        "ttft_p99_ms": _p(ttfts, 0.99),
        "worker_rss_mib_peak": round(max(s.rss_mib for s in samples), 1) if samples else None,
        "worker_rss_mib_end": round(samples[-1].rss_mib, 1) if samples else None,
        "batch_running_peak": max(s.running for s in samples) if samples else None,
        "kv_tokens_peak": max(s.kv_tokens_used for s in samples) if samples else None,
        "kv_cache_mb_peak": round(max(s.kv_cache_mb for s in samples), 1) if samples else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's tokens/s and TPOT p50 over the same tier and mode at one stream, and its tokens/s
    over the same tier and concurrency with batching off."""
    by_key = {(r["tier"], r["batching"], r["concurrency"]): r for r in rows}
    for row in rows:
        one = by_key.get((row["tier"], row["batching"], 1))
        off = by_key.get((row["tier"], OFF, row["concurrency"]))
        row["tokens_per_s_vs_1"] = _ratio(row["tokens_per_s"], one["tokens_per_s"]) if one else None
        row["tpot_p50_vs_1"] = _ratio(row["tpot_p50_ms"], one["tpot_p50_ms"]) if one else None
        row["tokens_per_s_vs_off"] = _ratio(row["tokens_per_s"], off["tokens_per_s"]) if off else None


def _common_prefix_share(a: str, b: str) -> float:
    longest = max(len(a), len(b))
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return 1.0 if not longest else same / longest


def greedy_agreement(on_runs: Sequence[LevelRun], off_runs: Sequence[LevelRun]) -> dict[str, Any]:
    """Greedy text of each prompt with batching on (every concurrency, so batched with others from
    2 streams up) against the same prompt's text served one at a time (batching off). `share`:
    identical texts; `prefix_share`: the mean length of the common prefix over the longer text."""
    seen: dict[int, Counter[str]] = {}
    for run in off_runs:
        for index, call in run.calls:
            if call.status == "OK":
                seen.setdefault(index, Counter())[call.text] += 1
    reference = {index: texts.most_common(1)[0][0] for index, texts in seen.items()}
    by_level: dict[str, dict[str, Any]] = {}
    everything: list[float] = []
    identical_total = 0
    for run in on_runs:
        pairs = [(c.text, reference[i]) for i, c in run.calls if c.status == "OK" and i in reference]
        prefixes = [_common_prefix_share(a, b) for a, b in pairs]
        identical = sum(a == b for a, b in pairs)
        by_level[str(run.concurrency)] = {
            "compared": len(pairs),
            "identical": identical,
            "share": round(identical / len(pairs), 4) if pairs else None,
            "prefix_share": round(sum(prefixes) / len(prefixes), 4) if prefixes else None,
        }
        everything += prefixes
        identical_total += identical
    return {
        "reference": "the same prompt served one at a time (batching off), greedy",
        # One-at-a-time runs of one prompt always agreeing: otherwise the reference itself moves.
        "reference_consistent": all(len(texts) == 1 for texts in seen.values()),
        "compared": len(everything),
        "identical": identical_total,
        "share": round(identical_total / len(everything), 4) if everything else None,
        "prefix_share": round(sum(everything) / len(everything), 4) if everything else None,
        "by_concurrency": by_level,
    }


@dataclass(frozen=True)
class TierWorkers:
    """What a pool's workers of one tier said about themselves (Describe), for the notes."""

    kernel: str
    batching_enabled: bool
    notices: tuple[str, ...] = ()
    max_batch: int = 1
    kv_tokens_budget: int = 0


def _weight_only_kernels(kernel: str) -> list[str]:
    names = ("aten._weight_int8pack_mm", "aten._weight_int4pack_mm_for_cpu")
    return [name for name in names if name in kernel]


def scaling_note(tier: str, ratio: float | None, workers: TierWorkers) -> str | None:
    """Why a weight-only tier's tokens/s at 8 streams stay below 3x one stream's, in words, from the
    kernel path its worker reported; None when it does not."""
    if not tier.endswith("-woq") or ratio is None or ratio >= WEIGHT_ONLY_FLOOR:
        return None
    head = (
        f"{tier} serves {ratio:.2f}x one stream's tokens/s at {EXPLAINED_AT} streams (below "
        f"{WEIGHT_ONLY_FLOOR:g}x)."
    )
    kernels = _weight_only_kernels(workers.kernel)
    lift = (
        " What would lift it: a weight-only matrix multiply that dequantizes each block of weights once "
        "per step and multiplies it with every row of the batch (as IPEX's weight-only kernels do on "
        "CPUs with AMX and AVX512_FP16), so a step costs reading the compressed weights once whatever "
        "the batch size."
    )
    if kernels:
        return (
            f"{head} Its linear layers run PyTorch's packed weight-only kernels ({', '.join(kernels)}), "
            "which work on 4 rows at a time and dequantize the weights again for every 4 rows: a decode "
            "step of 8 streams dequantizes every weight twice and one of 16 four times, so the step's "
            "cost grows with the batch instead of staying that of reading the weights once, which is "
            'what makes batching pay for bf16 (../shared/FACTS.md, "Batched decode").' + lift
        )
    if "tierserve int8_woq_linear" in workers.kernel or "tierserve int4_woq_linear" in workers.kernel:
        return (
            f"{head} Its linear layers run tierserve's weight-only kernels, which widen the weights to "
            "bfloat16 once per call (int8) or once per four rows in registers (int4) and multiply them "
            "with every row, so the weights are read once whatever the batch. What still grows with "
            "the rows: the bfloat16 products themselves "
            "(VDPBF16PS, without AMX), attention, and each prompt's prefill, which no stream shares "
            "(tools/profiling/throughput_ceiling.py bounds the ratio from these measured parts). What "
            "would lift it: AMX tiles for the products (an AMX Xeon), or int8 products of activations "
            "quantized per token (lowp_mode INT8)."
        )
    if "reference kernels" in workers.kernel:
        return (
            f"{head} It runs IPEX's reference weight-only kernels (this CPU lacks AMX and AVX512_FP16), "
            "which dequantize every weight at every step before multiplying: the step is bound by that "
            "conversion, not by reading the weights." + lift
        )
    return f"{head} Its kernel path: {workers.kernel or 'not reported'}."


def tier_summary(
    tier: str,
    rows: Sequence[Mapping[str, Any]],
    runs: Mapping[str, Sequence[LevelRun]],
    workers: Mapping[str, TierWorkers],
) -> dict[str, Any]:
    """Per tier: tokens/s over one stream at every concurrency (both modes), the greedy agreement,
    and the notes that explain the figures."""
    mine = [r for r in rows if r["tier"] == tier]

    def by_level(mode: str, key: str) -> dict[str, Any]:
        return {str(r["concurrency"]): r[key] for r in mine if r["batching"] == mode}

    scaling = {mode: by_level(mode, "tokens_per_s_vs_1") for mode in MODES}
    on = workers.get(ON)
    notes: list[str] = []
    if on is not None and not on.batching_enabled:
        notes.append(
            f"{tier}: the worker served one request at a time although batching was on: "
            + ("; ".join(on.notices) or "no reason given")
        )
    ratio_8 = scaling[ON].get(str(EXPLAINED_AT))
    if on is not None and (note := scaling_note(tier, ratio_8, on)) is not None:
        notes.append(note)
    return {
        "tier": tier,
        "kernel": on.kernel if on is not None else "",
        "batching_enabled": on.batching_enabled if on is not None else None,
        "max_batch": on.max_batch if on is not None else None,
        "kv_tokens_budget": on.kv_tokens_budget if on is not None else None,
        "tokens_per_s": {mode: by_level(mode, "tokens_per_s") for mode in MODES},
        "scaling": scaling,
        "tpot_p50_vs_1": {mode: by_level(mode, "tpot_p50_vs_1") for mode in MODES},
        "ratio_8_vs_1": ratio_8,
        "ratio_16_vs_1": scaling[ON].get("16"),
        "on_vs_off": by_level(ON, "tokens_per_s_vs_off"),
        "agreement": greedy_agreement(runs.get(ON, ()), runs.get(OFF, ())),
        "notes": notes,
    }


def check_targets(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for the tiers measured; `met` is None when the figure was not measured."""
    results = []
    by_tier = {s["tier"]: s for s in summaries}
    for tier, figure, streams, sense, bound in TARGETS:
        if tier not in by_tier:
            continue
        table = by_tier[tier]["scaling" if figure == "tokens_per_s" else "tpot_p50_vs_1"][ON]
        value = table.get(str(streams))
        met = None if value is None else (value >= bound if sense == ">=" else value <= bound)
        results.append(
            {
                "tier": tier,
                "rule": f"{figure} at {streams} streams {sense} {bound:g}x one stream (batching on)",
                "value": value,
                "met": met,
            }
        )
    return results
