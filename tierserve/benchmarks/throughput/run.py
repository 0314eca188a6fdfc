"""`tierserve bench throughput`: aggregate tokens/s, TPOT and TTFT of each tier at 1, 2, 4, 8 and 16
concurrent streams, through the router, with continuous batching on and, in the same run, off.

    tierserve bench throughput --out bench-results/throughput.json [--tiers bf16,int8-sq]
        [--concurrency 1,2,4,8,16] [--new-tokens 128] [--requests-per-level N]

It starts a pool with batching on, measures every tier one after the other (the other workers idle),
stops it, and does the same with a second pool started with `[batching] enabled = false`. Without
--config each tier gets one worker on every usable CPU (the workers share them, measured in turn);
with --config its workers of the measured tiers, as written. At each level that many streams send
greedy requests in a closed loop (each sends the next as soon as its last one ended), with fixed
prompts of mixed length taken in turn, pinned to the tier; the workers' Describe is polled during the
level for RSS, the running batch and the KV cache. Writes FILE.json, FILE.md and FILE.png (tokens/s
against TPOT; skipped with a notice without matplotlib, the `bench` extra). Figures: figures.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tierserve.benchmarks.livepool import bench_pool_config, prompt_words, running_pool, usable_cpus
from tierserve.benchmarks.streamcall import CallResult, timed_generate
from tierserve.benchmarks.throughput.figures import (
    OFF,
    ON,
    LevelRun,
    TierWorkers,
    WorkerSample,
    add_ratios,
    check_targets,
    level_row,
    tier_summary,
)
from tierserve.benchmarks.throughput.report import output_paths, render_markdown, write_plot
from tierserve.domain.config import ConfigError, TierserveConfig, default_config, load_config, parse_config
from tierserve.domain.tiers import TIER_NAMES
from tierserve.rpc.calls import list_workers

DEFAULT_CONCURRENCY = "1,2,4,8,16"
MAX_STREAMS = 256
# Prompt lengths in words, taken in turn: short and long mixed, so rows of a batch differ in length.
PROMPT_WORDS = (16, 160, 48, 320, 8, 96, 32, 224)
WARMUP_NEW_TOKENS = 8
SAMPLE_INTERVAL_S = 0.5
DESCRIBE_TIMEOUT_S = 2.0
SETTLE_S = 1.0


def parse_concurrency(text: str) -> list[int]:
    """Comma-separated stream counts, each in [1, MAX_STREAMS], sorted, without repeats."""
    try:
        levels = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        levels = []
    if not levels or not all(1 <= v <= MAX_STREAMS for v in levels):
        raise ConfigError(f"--concurrency: expected stream counts from 1 to {MAX_STREAMS}, got {text!r}")
    return levels


def requests_at(streams: int, requested: int) -> int:
    """Requests sent at a level: as asked, or two per stream and at least eight."""
    return requested or max(8, 2 * streams)


def requests_rule(requested: int) -> str:
    if requested:
        return f"{requested} requests per level"
    return "two requests per stream and at least eight per level"


def chosen_tiers(config_path: str | None, tiers: str | None, cpus: Sequence[int]) -> list[str]:
    """--tiers, or every tier of the pool: --config's workers, or the default pool's."""
    config = load_config(Path(config_path)) if config_path else default_config(list(cpus))
    served = list(dict.fromkeys(w.tier for w in config.workers))
    if not tiers:
        if not served:
            raise ConfigError("bench throughput needs [[workers]] in the config")
        return served
    chosen = list(dict.fromkeys(t.strip() for t in tiers.split(",") if t.strip()))
    unknown = [t for t in chosen if t not in TIER_NAMES]
    if unknown or not chosen:
        raise ConfigError(
            f"--tiers: unknown tiers {', '.join(unknown) or '(none)'}; known: {', '.join(TIER_NAMES)}"
        )
    missing = [t for t in chosen if t not in served]
    if config_path and missing:
        raise ConfigError(f"--tiers: {', '.join(missing)} not served by {config_path}")
    return chosen


def throughput_pool_config(
    config_path: str | None,
    tiers: Sequence[str],
    cpus: Sequence[int],
    new_tokens: int,
    max_streams: int,
    batching: bool,
) -> TierserveConfig:
    """The pool of one mode: --config's workers of these tiers, or one worker per tier on every CPU;
    ports left to the OS; batching on or off; the router lets every stream of the largest level in
    (a one-at-a-time worker queues them, as it would anyway)."""
    if config_path:
        data = bench_pool_config(config_path, tiers, cpus, new_tokens).model_dump()
        data["workers"] = [w for w in data["workers"] if w["tier"] in tiers]
    else:
        data = {
            "workers": [{"name": f"{t}-0", "tier": t, "cores": list(cpus), "port": 0} for t in tiers],
            "router": {"port": 0, "http_port": 0},
            "limits": {"max_new_tokens": max(512, new_tokens)},
            # Measured one tier at a time: the idle workers only wait.
            "placement": {"allow_shared_cores": len(tiers) > 1},
        }
    router = data.setdefault("router", {})
    for key, default in (("max_queue_per_worker", 8), ("max_streams_per_connection", 100)):
        router[key] = max(int(router.get(key, default)), max_streams)
    if router.get("max_concurrent_per_peer", 64):  # 0: no limit
        router["max_concurrent_per_peer"] = max(int(router.get("max_concurrent_per_peer", 64)), max_streams)
    data.setdefault("batching", {})["enabled"] = batching
    return parse_config(data, source=config_path or "bench throughput")


def make_prompts(words: Sequence[str], lengths: Sequence[int] = PROMPT_WORDS) -> list[str]:
    """Windows of the evaluation text of these lengths, each starting elsewhere."""
    if not words:
        raise ConfigError("the evaluation text set is empty: no prompts")
    prompts = []
    for index, length in enumerate(lengths):
        start = (index * 997) % max(1, len(words) - length)
        window = (list(words) * (1 + length // len(words)))[start : start + length]
        prompts.append(" ".join(window))
    return prompts


WorkerStub = worker_pb2_grpc.WorkerStub


async def _sample_once(stubs: Sequence[WorkerStub]) -> WorkerSample | None:
    answers = await asyncio.gather(
        *(s.Describe(worker_pb2.DescribeRequest(), timeout=DESCRIBE_TIMEOUT_S) for s in stubs),
        return_exceptions=True,
    )
    infos = [a for a in answers if isinstance(a, worker_pb2.WorkerInfo)]
    if not infos:
        return None
    return WorkerSample(
        rss_mib=max(i.rss_mb for i in infos),
        running=sum(i.batch.running for i in infos),
        waiting=sum(i.batch.waiting for i in infos),
        kv_tokens_used=sum(i.batch.kv_tokens_used for i in infos),
        kv_cache_mb=sum(i.batch.kv_cache_mb for i in infos),
    )


async def _sample_until(
    stubs: Sequence[WorkerStub], samples: list[WorkerSample], stop: asyncio.Event
) -> None:
    """Poll the workers until `stop`, then once more (the level's end)."""
    while True:
        if (sample := await _sample_once(stubs)) is not None:
            samples.append(sample)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)


async def closed_loop(
    stub: router_pb2_grpc.RouterStub,
    requests: Sequence[generate_pb2.GenerateRequest],
    streams: int,
    timeout_s: float,
    on_done: Callable[[], None] = lambda: None,
) -> list[tuple[int, CallResult]]:
    """`streams` clients, each sending the next of `requests` as soon as its last call ended; the
    results by request index. A refusal is recorded and its stream waits the retry hint."""
    pending = iter(range(len(requests)))
    results: list[tuple[int, CallResult]] = []

    async def client() -> None:
        for index in pending:  # shared: every client takes the next request
            result = await timed_generate(stub, requests[index], timeout_s)
            results.append((index, result))
            on_done()
            if result.status == "RESOURCE_EXHAUSTED":
                await asyncio.sleep((result.retry_after_ms or 100) / 1e3)

    await asyncio.gather(*(client() for _ in range(streams)))
    return sorted(results, key=lambda r: r[0])


async def _measure_tier(
    router_address: str,
    worker_addresses: Sequence[str],
    tier: str,
    mode: str,
    levels: Sequence[int],
    prompts: Sequence[str],
    new_tokens: int,
    requested: int,
    timeout_s: float,
    advance: Callable[[], None],
) -> list[LevelRun]:
    async with contextlib.AsyncExitStack() as stack:
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(router_address, options=CHANNEL_OPTIONS)
        )
        stub = router_pb2_grpc.RouterStub(channel)
        workers = [
            WorkerStub(await stack.enter_async_context(grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS)))
            for a in worker_addresses
        ]
        warm = [
            generate_pb2.GenerateRequest(
                prompt=p, max_new_tokens=WARMUP_NEW_TOKENS, tier=tier, request_id=f"warm-{mode}-{tier}-{i}"
            )
            for i, p in enumerate(prompts[:2])
        ]
        await asyncio.gather(*(timed_generate(stub, r, timeout_s) for r in warm))
        runs = []
        for streams in levels:
            requests = [
                generate_pb2.GenerateRequest(
                    prompt=prompts[i % len(prompts)],
                    max_new_tokens=new_tokens,
                    temperature=0.0,
                    tier=tier,
                    request_id=f"throughput-{mode}-{tier}-{streams}-{i}",
                )
                for i in range(requests_at(streams, requested))
            ]
            run = LevelRun(tier, mode, streams)
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_until(workers, run.samples, stop))
            try:
                calls = await closed_loop(stub, requests, streams, timeout_s, advance)
            finally:
                stop.set()
                await sampler
            run.calls = [(index % len(prompts), call) for index, call in calls]
            runs.append(run)
            await asyncio.sleep(SETTLE_S)
    return runs


def _tier_workers(reply: router_pb2.ListWorkersResponse, tier: str) -> tuple[TierWorkers, list[str]]:
    mine = [w for w in reply.workers if w.info.tier == tier and w.health == router_pb2.WORKER_HEALTH_SERVING]
    if not mine:
        raise ConfigError(f"no serving worker of tier {tier!r} in the pool")
    infos = [w.info for w in mine]
    described = TierWorkers(
        kernel=infos[0].kernel,
        batching_enabled=all(i.batch.enabled for i in infos),
        notices=tuple(dict.fromkeys(n for i in infos for n in i.notices)),
        max_batch=max(i.batch.max_batch for i in infos),
        kv_tokens_budget=max(i.batch.kv_tokens_budget for i in infos),
    )
    return described, [w.address for w in mine]


def _worker_meta(reply: router_pb2.ListWorkersResponse) -> list[dict[str, Any]]:
    return [
        {
            "worker_id": w.worker_id,
            "tier": w.info.tier,
            "cores": list(w.info.cores),
            "threads": w.info.threads,
            "kernel": w.info.kernel,
            "batching": w.info.batch.enabled,
            "max_batch": w.info.batch.max_batch,
            "kv_tokens_budget": w.info.batch.kv_tokens_budget,
            "notices": list(w.info.notices),
        }
        for w in reply.workers
    ]


def _measure_pool(
    config: TierserveConfig,
    mode: str,
    tiers: Sequence[str],
    levels: Sequence[int],
    prompts: Sequence[str],
    new_tokens: int,
    requested: int,
    timeout_s: float,
    run_dir: Path | None,
    console: Console,
) -> tuple[list[LevelRun], dict[str, TierWorkers], list[dict[str, Any]]]:
    runs: list[LevelRun] = []
    described: dict[str, TierWorkers] = {}
    with running_pool(config, run_dir, console) as launcher:
        reply = list_workers(launcher.router_address)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            total = len(tiers) * sum(requests_at(s, requested) for s in levels)
            task = progress.add_task(f"batching {mode}", total=total)
            for tier in tiers:
                described[tier], addresses = _tier_workers(reply, tier)
                progress.update(task, description=f"batching {mode}: {tier}")
                runs += asyncio.run(
                    _measure_tier(
                        launcher.router_address, addresses, tier, mode, levels, prompts, new_tokens,
                        requested, timeout_s, lambda: progress.advance(task),
                    )
                )  # fmt: skip
    return runs, described, _worker_meta(reply)


def run_throughput_benchmark(
    out: Path,
    config_path: str | None,
    *,
    tiers: str | None,
    concurrency: str,
    requests_per_level: int,
    new_tokens: int,
    timeout_s: float,
    run_dir: Path | None,
    console: Console,
) -> int:
    levels = parse_concurrency(concurrency)
    if new_tokens < 2:
        raise ConfigError("--new-tokens must be at least 2 (TPOT needs two tokens)")
    if requests_per_level and requests_per_level < levels[-1]:
        raise ConfigError(
            f"--requests-per-level ({requests_per_level}) must be at least the most streams ({levels[-1]})"
        )
    cpus = usable_cpus()
    tier_list = chosen_tiers(config_path, tiers, cpus)
    started = time.perf_counter()
    runs: dict[str, list[LevelRun]] = {}
    described: dict[str, dict[str, TierWorkers]] = {}
    pools: dict[str, list[dict[str, Any]]] = {}
    prompts: list[str] = []
    for mode in (ON, OFF):
        config = throughput_pool_config(config_path, tier_list, cpus, new_tokens, levels[-1], mode == ON)
        prompts = prompts or make_prompts(prompt_words(config))
        console.print(f"pool with batching {mode}: tiers {', '.join(tier_list)}", highlight=False)
        runs[mode], described[mode], pools[mode] = _measure_pool(
            config, mode, tier_list, levels, prompts, new_tokens, requests_per_level, timeout_s,
            run_dir / f"batching-{mode}" if run_dir else None, console,
        )  # fmt: skip
    rows = [level_row(run) for mode in (ON, OFF) for run in runs[mode]]
    add_ratios(rows)
    summaries = [
        tier_summary(
            tier,
            rows,
            {mode: [r for r in runs[mode] if r.tier == tier] for mode in (ON, OFF)},
            {mode: described[mode][tier] for mode in (ON, OFF)},
        )
        for tier in tier_list
    ]
    targets = check_targets(summaries)
    notes = [] if 1 in levels else ["no level of 1 stream: no ratios against one stream"]
    meta: dict[str, Any] = {
        "machine": {"usable_cpus": cpus, "python": platform.python_version()},
        "tiers": tier_list,
        "concurrency": levels,
        "new_tokens": new_tokens,
        "requests_per_level": {str(s): requests_at(s, requests_per_level) for s in levels},
        "requests_rule": requests_rule(requests_per_level),
        "prompt_words": list(PROMPT_WORDS),
        "layout": "as --config writes them"
        if config_path
        else f"one per tier, each on every usable CPU ({len(cpus)}), measured one tier at a time",
        "config": config_path or "one worker per tier on this machine's CPUs",
        "pools": pools,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "notes": notes,
    }
    md_path, png_path = output_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "results": rows, "tiers": summaries, "targets": targets}
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report = render_markdown(rows, summaries, targets, meta)
    md_path.write_text(report, encoding="utf-8")
    plot = write_plot(rows, png_path, f"throughput by concurrent streams ({new_tokens} new tokens)")
    print(report)
    console.print(f"wrote {out}, {md_path}; {escape(plot)}", highlight=False)
    return 1 if any(r["failures"] for r in rows) else 0
