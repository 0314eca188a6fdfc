"""`tierserve bench routing`: every routing policy on the same open-loop Poisson trace, at several
offered loads, against one set of running workers.

    tierserve bench routing --out bench-results/routing.json [--loads 0.25,0.5,0.75,1,1.25] [--requests 120]

The workers start once; then one router per policy starts in front of them (config router.policy =
the policy's name). For each offered load, each policy in turn (the order rotated from load to load)
receives the same trace: `--requests` requests drawn once from a seeded mix (tight and loose budgets;
tolerances 0, 1 and 10%; varied prompt and output lengths) with Poisson arrivals scaled to the load.

Offered loads are fractions of the pool's measured capacity: each tier first serves the trace's
first requests one at a time (see `calibration`), and the capacity is the sum over workers of the
requests per busy second their tier completed. Budgets are derived from the same calibration (tight:
3x the fastest TTFT and 1.25x the fastest TPOT; loose: 10x the slowest TTFT and 2x the slowest TPOT)
unless --budgets sets them. `--calibrate-only` stops after the calibration and writes its figures.
Figures: see routing_metrics.

Writes <out> (JSON), <out>.md (the table) and <out>.png (attainment and goodput against load).
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

from tierserve.benchmarks.calibration import (
    CALIBRATION_REQUESTS,
    TierService,
    calibrate,
    calibrated_facts,
    pool_capacity,
)
from tierserve.benchmarks.livepool import (
    MATPLOTLIB_MISSING,
    WorkerFacts,
    bench_pool_config,
    import_pyplot,
    prompt_words,
    running_pool,
    tier_cards,
    usable_cpus,
    worker_facts,
)
from tierserve.benchmarks.loadgen import (
    Budgets,
    RequestMix,
    SentCall,
    TraceItem,
    make_trace,
    run_open_loop,
    to_request,
)
from tierserve.benchmarks.reach import beyond_lines, reach_line, trace_reach
from tierserve.benchmarks.routing_metrics import Observed, goodput_target, summarize_level
from tierserve.domain.config import ConfigError
from tierserve.domain.tiers import TIER_NAMES

DEFAULT_LOADS = (0.25, 0.5, 0.75, 1.0, 1.25)
REFERENCE_POLICY = "slo"
SETTLE_S = 1.0


def available_policies() -> list[str]:
    """Every registered policy, read at run time (policies are added to router.policy.POLICIES by name)."""
    from tierserve.router.policies.registry import POLICIES

    return list(POLICIES)


def default_policies(registered: Sequence[str]) -> list[str]:
    """The policies to compare: all registered, without the placeholder first_healthy once real ones exist."""
    chosen = [p for p in registered if p != "first_healthy"]
    return chosen or list(registered)


def derive_budgets(facts: Sequence[WorkerFacts]) -> Budgets:
    return Budgets(
        tight_ttft_ms=round(3 * min(f.ttft_ms for f in facts), 1),
        tight_tpot_ms=round(1.25 * min(f.tpot_ms for f in facts), 2),
        loose_ttft_ms=round(10 * max(f.ttft_ms for f in facts), 1),
        loose_tpot_ms=round(2 * max(f.tpot_ms for f in facts), 2),
    )


def parse_budgets(text: str) -> Budgets:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or any(v < 0 for v in values):
        raise ConfigError(
            f"--budgets wants four non-negative ms: TIGHT_TTFT,TIGHT_TPOT,LOOSE_TTFT,LOOSE_TPOT; got {text!r}"
        )
    return Budgets(*values)


def observe(call: SentCall, budgets: Budgets) -> Observed:
    ttft_budget, tpot_budget = budgets.of(call.item.budget_class)
    r = call.result
    return Observed(
        ttft_budget_ms=ttft_budget,
        tpot_budget_ms=tpot_budget,
        tolerance_pct=call.item.tolerance_pct,
        status=r.status,
        sent_s=r.sent_s,
        done_s=r.done_s,
        ttft_ms=r.ttft_ms(),
        tpot_ms=r.tpot_mean_ms(),
        tier=r.tier,
        summary_budget_met=r.budget_met,
    )


def request_record(call: SentCall) -> dict[str, Any]:
    """One request as sent and served: what the router predicted beside what the client saw."""
    r = call.result
    ttft, tpot = r.ttft_ms(), r.tpot_mean_ms()
    return {
        "index": call.item.index,
        "budget_class": call.item.budget_class,
        "tolerance_pct": call.item.tolerance_pct,
        "new_tokens": call.item.new_tokens,
        "status": r.status,
        "tier": r.tier,
        "best_effort": r.best_effort,
        "predicted_ttft_ms": round(r.predicted_ttft_ms, 1),
        "ttft_ms": None if ttft is None else round(ttft, 1),
        "predicted_tpot_ms": round(r.predicted_tpot_ms, 2),
        "tpot_ms": None if tpot is None else round(tpot, 2),
        # Why it was refused or failed (a strict refusal names the budget no worker was predicted to meet).
        **({"error": r.error} if r.status != "OK" else {}),
    }


async def _warm_router(address: str, tiers: Sequence[str], words: Sequence[str]) -> None:
    """One short request pinned to each tier, so the router has relayed figures from every worker."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for tier in tiers:
            request = generate_pb2.GenerateRequest(
                prompt=" ".join(words[:16]), max_new_tokens=4, tier=tier, request_id=f"warm-{tier}"
            )
            async for _ in stub.Generate(request, timeout=120):
                pass


async def _run_levels(
    routers: Mapping[str, str],
    trace: Sequence[TraceItem],
    rates: Sequence[tuple[float, float]],
    budgets: Budgets,
    words: Sequence[str],
    cards: Mapping[str, float | None],
    timeout_s: float,
    console: Console,
) -> list[dict[str, Any]]:
    policies = list(routers)
    rows: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("routing", total=len(trace) * len(rates) * len(policies))
        for level, (load, rate) in enumerate(rates):
            # Rotate who goes first, so no policy always meets the pool freshest.
            order = policies[level % len(policies) :] + policies[: level % len(policies)]
            for policy in order:
                progress.update(task, description=f"load {load:g} ({rate:.2f} req/s): {policy}")
                label = f"{policy}-{level}"

                def make_request(item: TraceItem, label: str = label) -> generate_pb2.GenerateRequest:
                    return to_request(item, budgets, words, label)

                async with grpc.aio.insecure_channel(routers[policy], options=CHANNEL_OPTIONS) as channel:
                    start, calls = await run_open_loop(
                        router_pb2_grpc.RouterStub(channel),
                        trace,
                        rate,
                        make_request,
                        timeout_s,
                        on_done=lambda _: progress.advance(task),
                    )
                lag = statistics.median(c.result.sent_s - c.scheduled_s for c in calls) * 1e3
                figures = summarize_level([observe(c, budgets) for c in calls], cards, start)
                rows.append(
                    {
                        "policy": policy,
                        "load": load,
                        "rate_rps": rate,
                        **figures,
                        "send_lag_p50_ms": round(lag, 3),
                        "requests": [request_record(c) for c in calls],
                    }
                )
                progress.console.print(
                    f"load {load:g} {policy}: attainment {figures['attainment']:.0%}, goodput "
                    f"{figures['goodput_rps']:.2f}/s, accuracy violations {figures['accuracy_violations']}, "
                    f"rejected {figures['rejected_total']}",
                    highlight=False,
                )
                await asyncio.sleep(SETTLE_S)
    return rows


@dataclass(frozen=True)
class _LevelPlan:
    """What the command line said about budgets and loads; resolved once the pool is measured."""

    budgets: str | None
    loads: str | None
    rates: str | None
    trace: Sequence[TraceItem]

    def resolve(
        self, facts: Sequence[WorkerFacts], capacity: float
    ) -> tuple[Budgets, list[tuple[float, float]]]:
        budgets = parse_budgets(self.budgets) if self.budgets else derive_budgets(facts)
        if self.rates:
            levels = [(r / capacity, r) for r in _floats(self.rates, "--rates")]
        else:
            loads = self.loads or ",".join(map(str, DEFAULT_LOADS))
            levels = [(f, f * capacity) for f in _floats(loads, "--loads")]
        return budgets, [(round(load, 4), rate) for load, rate in levels]


async def _measure(
    routers: Mapping[str, str],
    main_router: str,
    tiers: Sequence[str],
    words: Sequence[str],
    plan: _LevelPlan,
    timeout_s: float,
    console: Console,
    calibrate_only: bool = False,
) -> _Measured:
    """Warm every router, calibrate the pool, then run every level (one event loop for all of it)."""
    for address in routers.values():
        await _warm_router(address, tiers, words)
    services = await calibrate(main_router, tiers, plan.trace, words, timeout_s)
    facts = calibrated_facts(worker_facts(main_router), services)
    capacity = pool_capacity(facts, services)
    budgets, levels = plan.resolve(facts, capacity)
    for s in services:
        console.print(
            f"calibration {s.tier}: {s.requests} requests, {s.service_rate_rps:.3f} req/s busy, "
            f"TTFT p50 {s.ttft_ms:.1f} ms, TPOT p50 {s.tpot_ms:.2f} ms",
            highlight=False,
        )
    reach = trace_reach(plan.trace, budgets, services, tier_cards(facts)).to_json()
    console.print(reach_line(reach), highlight=False)
    console.print(
        f"capacity {capacity:.3f} req/s; budgets {asdict(budgets)}; "
        f"loads {', '.join(f'{load:g}' for load, _ in levels)}; policies {', '.join(routers)}",
        highlight=False,
    )
    rows = (
        []
        if calibrate_only
        else await _run_levels(
            routers, plan.trace, levels, budgets, words, tier_cards(facts), timeout_s, console
        )
    )
    return _Measured(facts, tier_cards(facts), budgets, capacity, services, levels, rows, reach)


@dataclass(frozen=True)
class _Measured:
    facts: list[WorkerFacts]
    cards: dict[str, float | None]
    budgets: Budgets
    capacity: float
    services: list[TierService]
    levels: list[tuple[float, float]]
    rows: list[dict[str, Any]]
    reach: dict[str, Any]


# --- report ---------------------------------------------------------------------------------------------


def _cell(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| load | req/s | policy | SLO attained | summary budget_met | goodput/s | accuracy violations "
        "| full service level | TTFT p50 / p99 ms | TPOT p50 / p99 ms | tiers | rejected |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["load"], r["policy"])):
        tiers = ", ".join(f"{t} {s:.0%}" for t, s in r["tier_share"].items()) or "-"
        rejected = ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "-"
        lines.append(
            f"| {r['load']:g} | {r['rate_rps']:.2f} | {r['policy']} | {r['attainment']:.1%} "
            f"| {r['summary_attainment']:.1%} | {r['goodput_rps']:.3f} | {r['accuracy_violations']} "
            f"| {r['service_level_attainment']:.1%} "
            f"| {_cell(r['ttft_p50_ms'], '.1f')} / {_cell(r['ttft_p99_ms'], '.1f')} "
            f"| {_cell(r['tpot_p50_ms'], '.2f')} / {_cell(r['tpot_p99_ms'], '.2f')} | {tiers} | {rejected} |"
        )
    return "\n".join(lines)


def target_text(target: Mapping[str, Any]) -> str:
    if target.get("ratio") is None:
        note = target.get("note", "no comparison point")
        verdict = "NOT MET" if target.get("met") is False else "not computed"
        return f"target: {verdict}: {note}. Rule: {target['rule']}."
    verdict = "MET" if target["met"] else "NOT MET"
    return (
        f"target (slo's goodput at 90% attainment >= {target['goal_ratio']}x the best other policy's, zero "
        f"accuracy violations): {verdict}. slo {target['reference_goodput_rps']:.3f}/s at load "
        f"{target['load']:.3f} vs {target['best_other_policy']} {target['other_goodput_rps']:.3f}/s at load "
        f"{target['other_load']:.3f} = {target['ratio']:.2f}x; slo accuracy violations "
        f"{target['reference_accuracy_violations']}. Rule: {target['rule']}."
        + (f" Note: {target['note']}." if target.get("note") else "")
    )


def render_markdown(
    rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], target: Mapping[str, Any]
) -> str:
    b = meta["budgets"]
    return (
        "\n".join(
            [
                "# tierserve routing policies",
                "",
                f"{meta['requests']} requests per level (seed {meta['seed']}), Poisson arrivals; offered "
                f"loads are fractions of the measured capacity {meta['capacity_rps']:.2f} req/s. "
                f"Budgets: tight TTFT {b['tight_ttft_ms']} ms / TPOT {b['tight_tpot_ms']} ms, loose TTFT "
                f"{b['loose_ttft_ms']} ms / TPOT {b['loose_tpot_ms']} ms. "
                "Latencies and SLO attainment as measured by the client. SLO attained and goodput count "
                "both latency budgets (the routing target's definition); full service level also asks "
                "for the tier to be within the request's accuracy tolerance.",
                "",
                *(
                    [f"{reach_line(meta['reach'])}.", *beyond_lines(meta["reach"]), ""]
                    if "reach" in meta
                    else []
                ),
                markdown_table(rows),
                "",
                target_text(target),
                "",
                *[f"- note: {n}" for n in meta.get("notes", [])],
            ]
        )
        + "\n"
    )


def write_plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> str:
    pyplot = import_pyplot()
    if pyplot is None:
        return MATPLOTLIB_MISSING
    figure, (attained, goodput) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    for policy in sorted({str(r["policy"]) for r in rows}):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["load"])
        loads = [r["load"] for r in mine]
        attained.plot(loads, [100 * r["attainment"] for r in mine], marker="o", label=policy)
        goodput.plot(loads, [r["goodput_rps"] for r in mine], marker="o", label=policy)
    attained.axhline(90, color="grey", linestyle=":", linewidth=1)
    attained.set_ylabel("SLO attainment, %")
    goodput.set_ylabel("goodput, SLO-meeting requests/s")
    for axes in (attained, goodput):
        axes.set_xlabel("offered load, fraction of estimated capacity")
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return f"wrote {path}"


def output_paths(out: Path) -> tuple[Path, Path]:
    stem = out.with_suffix("") if out.suffix == ".json" else out
    return stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".png")


# --- the run -------------------------------------------------------------------------------------------


def _floats(text: str, name: str, allow_zero: bool = False) -> list[float]:
    """Comma-separated numbers, each positive (or, with `allow_zero`, at least 0)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    kind = "numbers >= 0" if allow_zero else "positive numbers"
    if not values or any(not (v >= 0 if allow_zero else v > 0) for v in values):
        raise ConfigError(f"{name}: expected comma-separated {kind}, got {text!r}")
    return values


def _ints(text: str, name: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _floats(text, name))


def run_routing_benchmark(
    out: Path,
    config_path: str | None,
    *,
    policies: str | None,
    tiers: str | None,
    loads: str | None,
    rates: str | None,
    requests: int,
    seed: int,
    prompt_words_mix: str,
    new_tokens_mix: str,
    budgets: str | None,
    timeout_s: float,
    tight_share: float = 0.5,
    strict_share: float = 0.0,
    tight_tolerances: str | None = None,
    tolerances: str | None = None,
    run_dir: Path | None,
    console: Console,
    calibrate_only: bool = False,
) -> int:
    registered = available_policies()
    chosen = [p.strip() for p in policies.split(",")] if policies else default_policies(registered)
    unknown = [p for p in chosen if p not in registered]
    if unknown:
        raise ConfigError(f"unknown policies {', '.join(unknown)}; registered: {', '.join(registered)}")
    notes: list[str] = []
    if REFERENCE_POLICY not in chosen:
        notes.append(f"policy {REFERENCE_POLICY!r} is not among {', '.join(chosen)}: no target computed")
    for flag, share in (("--tight-share", tight_share), ("--strict-share", strict_share)):
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{flag} must be in [0, 1], got {share:g}")
    mix = RequestMix(
        tight_share=tight_share,
        strict_share=strict_share,
        tight_tolerances_pct=tuple(_floats(tight_tolerances, "--tight-tolerances", allow_zero=True))
        if tight_tolerances
        else None,
        **(
            {"tolerances_pct": tuple(_floats(tolerances, "--tolerances", allow_zero=True))}
            if tolerances
            else {}
        ),
        prompt_words=_ints(prompt_words_mix, "--prompt-words"),
        new_tokens=_ints(new_tokens_mix, "--new-tokens"),
    )
    if requests < 1:
        raise ConfigError("--requests must be at least 1")
    trace = make_trace(requests, mix, seed)
    tier_list = [t.strip() for t in tiers.split(",")] if tiers else list(TIER_NAMES)
    config = bench_pool_config(config_path, tier_list, usable_cpus(), max(mix.new_tokens))
    config = config.model_copy(update={"router": config.router.model_copy(update={"policy": chosen[0]})})
    words = prompt_words(config)
    started = time.perf_counter()
    with running_pool(config, run_dir, console) as launcher:
        routers = {chosen[0]: launcher.router_address}
        for policy in chosen[1:]:
            routers[policy] = launcher.add_router(f"router-{policy}", policy)
            console.print(f"router for policy {policy} at {routers[policy]}")
        served = sorted({w.tier for w in config.workers}, key=TIER_NAMES.index)
        plan = _LevelPlan(budgets, loads, rates, trace)
        measured = asyncio.run(
            _measure(
                routers, launcher.router_address, served, words, plan, timeout_s, console, calibrate_only
            )
        )
    facts, cards, chosen_budgets, capacity = (
        measured.facts,
        measured.cards,
        measured.budgets,
        measured.capacity,
    )
    levels, rows = measured.levels, measured.rows
    if calibrate_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        calibration = {
            "capacity_rps": capacity,
            "services": [asdict(s) for s in measured.services],
            "workers": [asdict(f) for f in facts],
            "budgets": asdict(chosen_budgets),
            "requests_per_tier": min(CALIBRATION_REQUESTS, len(trace)),
            "seed": seed,
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        out.write_text(json.dumps({"calibration": calibration}, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {out}", highlight=False)
        return 0
    target = goodput_target(rows, REFERENCE_POLICY)
    meta: dict[str, Any] = {
        "machine": {"usable_cpus": usable_cpus(), "python": platform.python_version()},
        "policies": chosen,
        "workers": [asdict(f) for f in facts],
        "cards": cards,
        "budgets": asdict(chosen_budgets),
        "mix": asdict(mix),
        "requests": requests,
        "seed": seed,
        "capacity_rps": capacity,
        "mean_new_tokens": statistics.fmean(item.new_tokens for item in trace),
        "loads": [load for load, _ in levels],
        "rates_rps": [rate for _, rate in levels],
        "capacity_rule": (
            f"sum over workers of their tier's requests per busy second, serving the trace's first "
            f"{CALIBRATION_REQUESTS} requests one at a time"
        ),
        "calibration": [asdict(s) for s in measured.services],
        "reach": measured.reach,
        "budget_rule": "tight: 3x fastest TTFT, 1.25x fastest TPOT; loose: 10x slowest TTFT, 2x slowest TPOT"
        if not budgets
        else "set by --budgets",
        "config": config_path or "one worker per tier on this machine's CPUs",
        "elapsed_s": round(time.perf_counter() - started, 1),
        "notes": notes,
    }
    md_path, png_path = output_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "results": rows, "target": target}, indent=2) + "\n", encoding="utf-8"
    )
    md_path.write_text(render_markdown(rows, meta, target), encoding="utf-8")
    plot_message = write_plot(rows, png_path, f"routing policies, {requests} requests per level, seed {seed}")
    print(markdown_table(rows))
    print()
    print(target_text(target))
    console.print(f"wrote {out}, {md_path}; {escape(plot_message)}", highlight=False)
    return 0
