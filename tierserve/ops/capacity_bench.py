"""Measured figures for `tierserve plan` from benchmark files: `bench tiers` (one stream per tier,
with the accuracy card's perplexity change) and `bench throughput` (TPOT and TTFT p50 by concurrent
streams, batching on and off, and each tier's max_batch). Several files combine per tier."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tierserve.ops.capacity import PlanningError, TierFigures, combine_by_tier
from tierserve.ops.capacity_streams import Level

# `bench throughput`'s batching modes (tierserve/benchmarks/throughput/figures.py: ON, OFF).
BATCHING_ON, BATCHING_OFF = "on", "off"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanningError(f"bench file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PlanningError(f"{path}: cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise PlanningError(f"{path}: not valid JSON: {error}") from None


def load_bench_file(path: Path) -> list[Mapping[str, Any]]:
    """The rows of a `bench tiers` file: a JSON list (or {"results": [...]})."""
    return _tier_rows(read_json(path), path)


def _tier_rows(data: Any, path: Path) -> list[Mapping[str, Any]]:
    if isinstance(data, Mapping):
        data = data.get("results")
    if not isinstance(data, list):
        raise PlanningError(
            f"{path}: expected a JSON list of tier results (from `tierserve bench tiers`) or the object "
            "`tierserve bench throughput` writes"
        )
    return data


def figures_from_bench(rows: Sequence[Mapping[str, Any]], source: str) -> tuple[list[TierFigures], list[str]]:
    """From a `tierserve bench tiers` JSON list (keys tier, tpot_ms, ttft_ms, ppl_delta_pct)."""
    figures: list[TierFigures] = []
    notes: list[str] = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping) or "tier" not in row:
            raise PlanningError(f"{source}: entry {index} is not an object with a 'tier' key")
        tpot = _number(row, "tpot_ms", f"{source}: entry {index}")
        if tpot is None:
            notes.append(f"{row['tier']}: no tpot_ms in {source}; left out")
            continue
        figures.append(
            TierFigures(
                tier=str(row["tier"]),
                tpot_ms=tpot,
                ttft_ms=_number(row, "ttft_ms", f"{source}: entry {index}") or 0.0,
                ppl_delta_pct=_number(row, "ppl_delta_pct", f"{source}: entry {index}", signed=True),
                source=source,
            )
        )
    return figures, notes


def _number(row: Mapping[str, Any], key: str, where: str, signed: bool = False) -> float | None:
    """A row's figure: a finite number (not negative unless `signed`) or null/absent (None)."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PlanningError(f"{where}: {key} must be a number or null, got {value!r}")
    if value < 0 and not signed:
        raise PlanningError(f"{where}: {key} must not be negative, got {value!r}")
    return float(value)


def is_throughput_file(data: Any) -> bool:
    """A `bench throughput` file: an object whose meta or rows give concurrencies."""
    if not isinstance(data, Mapping):
        return False
    meta, rows = data.get("meta"), data.get("results")
    if isinstance(meta, Mapping) and "concurrency" in meta:
        return True
    return isinstance(rows, list) and any(isinstance(r, Mapping) and "concurrency" in r for r in rows)


def _throughput_row(row: Any, where: str) -> tuple[str, str, int, float | None, float | None]:
    """(tier, batching, concurrency, TPOT p50, TTFT p50) of one row, checked."""
    if not isinstance(row, Mapping):
        raise PlanningError(f"{where}: expected an object, got {type(row).__name__}")
    tier, mode, streams = row.get("tier"), row.get("batching"), row.get("concurrency")
    if not isinstance(tier, str) or not tier:
        raise PlanningError(f"{where}: no tier (expected a 'tier' name)")
    if mode not in (BATCHING_ON, BATCHING_OFF):
        raise PlanningError(f"{where} ({tier}): batching must be 'on' or 'off', got {mode!r}")
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
        raise PlanningError(f"{where} ({tier}): concurrency must be a whole number >= 1, got {streams!r}")
    return tier, mode, streams, _number(row, "tpot_p50_ms", where), _number(row, "ttft_p50_ms", where)


def _summaries(data: Mapping[str, Any], source: str) -> dict[str, Mapping[str, Any]]:
    """Each tier's summary (max_batch, batching_enabled), by tier; checked."""
    summaries = data.get("tiers", [])
    if not isinstance(summaries, list):
        raise PlanningError(f"{source}: 'tiers' must be a list of tier summaries")
    by_tier: dict[str, Mapping[str, Any]] = {}
    for index, summary in enumerate(summaries):
        where = f"{source}: tiers[{index}]"
        if not isinstance(summary, Mapping) or not isinstance(summary.get("tier"), str):
            raise PlanningError(f"{where}: expected an object with a 'tier' name")
        max_batch = summary.get("max_batch")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)):
            raise PlanningError(f"{where}: max_batch must be a whole number or null, got {max_batch!r}")
        if summary.get("batching_enabled") not in (True, False, None):
            raise PlanningError(f"{where}: batching_enabled must be true, false or null")
        by_tier[summary["tier"]] = summary
    return by_tier


def figures_from_throughput(data: Mapping[str, Any], source: str) -> tuple[list[TierFigures], list[str]]:
    """From a `tierserve bench throughput` JSON object: per tier, the batching-on rows' TPOT and TTFT
    p50 by concurrency; one stream's figures from the batching-on row at 1 stream (else batching
    off's, else the lowest measured concurrency's); max_batch and whether the worker really batched
    from the tier's summary."""
    rows = data.get("results")
    if not isinstance(rows, list):
        raise PlanningError(f"{source}: expected a 'results' list (from `tierserve bench throughput`)")
    measured: dict[str, dict[str, dict[int, tuple[float, float | None]]]] = {}
    for index, row in enumerate(rows):
        tier, mode, streams, tpot, ttft = _throughput_row(row, f"{source}: results[{index}]")
        modes = measured.setdefault(tier, {BATCHING_ON: {}, BATCHING_OFF: {}})
        if tpot is not None:  # a level whose every request failed has no figures
            modes[mode][streams] = (tpot, ttft)
    summaries = _summaries(data, source)
    meta = data.get("meta")
    listed = meta.get("tiers", []) if isinstance(meta, Mapping) else []
    for tier in [*summaries, *(t for t in listed if isinstance(t, str))]:
        if tier not in measured:
            raise PlanningError(f"{source}: tier {tier} is listed but has no rows in 'results'")
    figures: list[TierFigures] = []
    notes: list[str] = []
    for tier, modes in measured.items():
        on, off = modes[BATCHING_ON], modes[BATCHING_OFF]
        base = on.get(1) or off.get(1) or (on[min(on)] if on else None)
        if base is None:
            notes.append(f"{tier}: no TPOT measured in {source}; left out")
            continue
        summary = summaries.get(tier, {})
        enabled = summary.get("batching_enabled")
        figures.append(
            TierFigures(
                tier=tier,
                tpot_ms=base[0],
                ttft_ms=base[1] or 0.0,
                source=f"{source} (bench throughput p50)",
                levels=tuple(Level(streams, tpot, ttft) for streams, (tpot, ttft) in sorted(on.items())),
                max_batch=summary.get("max_batch"),
                batching=enabled if enabled is not None else (True if on else None),
            )
        )
        if summary.get("max_batch") is None and on:
            notes.append(f"{tier}: max_batch not in {source}; capped at the highest measured concurrency")
        if enabled is False:
            notes.append(f"{tier}: served one request at a time in {source} although batching was on")
    notes.append(
        f"streams per worker from {source}: `bench throughput` TPOT and TTFT p50 by concurrent streams "
        "with batching on (closed loop, TTFT includes waiting)"
    )
    return figures, notes


def figures_from_file(path: Path) -> tuple[list[TierFigures], list[str]]:
    """The figures of a `bench tiers` or `bench throughput` file, told apart by their shape."""
    data = read_json(path)
    if is_throughput_file(data):
        return figures_from_throughput(data, str(path))
    return figures_from_bench(_tier_rows(data, path), str(path))


def figures_from_files(paths: Sequence[Path]) -> tuple[list[TierFigures], list[str]]:
    """Every file's figures, combined per tier (e.g. `bench tiers` for the accuracy cards and
    `bench throughput` for the figures by concurrency)."""
    figures: list[TierFigures] = []
    notes: list[str] = []
    for path in paths:
        found, said = figures_from_file(path)
        figures += found
        notes += said
    if len(paths) > 1:
        notes.append("figures of one tier from several files combined: the slower at each concurrency")
    return combine_by_tier(figures), notes
