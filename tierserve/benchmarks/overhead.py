"""`tierserve bench overhead`: what the router costs, and what its OpenAI-compatible HTTP API costs
beside its gRPC API. The same requests go through the router's gRPC API, through its HTTP API
(`/v1/completions`, streamed) and straight to one worker, in the same run, one at a time,
interleaved (the order rotates from one round to the next, so drift hits every path alike).

    tierserve bench overhead --out bench-results/overhead.json [--router ADDR [--http URL]] [--tier fp32]

With --concurrency N each round sends N copies of the request at once on each path, so a batching
worker decodes them together (the issue-15 figure is the router's per-token cost at 16 streams);
the copies are paired by their order within the round.

Without --router it starts a pool with one worker of --tier on every CPU (or --config's pool), and
measures its HTTP API too; with --router, the HTTP API at --http (its base URL, ".../v1") if given.
Requests through the router pin the worker's tier. Everything is timed by the client, and the same
figures compare two paths: router (gRPC) against the worker directly, and HTTP against gRPC (both
through the router; the HTTP path's targets are the same numbers, over the gRPC path):

- per token: the gaps between arriving tokens, paired by token index across each router/direct pair;
  the figure is the p50 of (router gap - direct gap). Target: <= 0.3 ms.
- per request: TTFT (send to first token) p50 and p99 on each path, and the part of it spent outside
  the worker: the client's TTFT minus the worker's own queue + prefill time from its summary. The
  target figure is the p99 of that outside part, router path minus direct: it holds what the router
  and its extra hop add, without the prefill's run-to-run noise (here the direct TTFT alone spreads
  ~15 ms from p50 to p99, so two raw p99s of a hundred requests differ by more than the router costs
  either way). Target: <= 2 ms. The raw TTFT p50/p99 differences are reported beside it.
- token rate: streamed tokens over the summed stream times (send to last token) on each path; the
  figure is router / direct. Target: >= 0.97.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2_grpc, worker_pb2_grpc

from tierserve.benchmarks.httpcall import completion_body, served_model, timed_http_generate
from tierserve.benchmarks.livepool import (
    bench_pool_config,
    prompt_words,
    running_pool,
    usable_cpus,
    worker_facts,
)
from tierserve.benchmarks.streamcall import CallResult, timed_generate
from tierserve.domain.config import ConfigError, TierserveConfig, default_config, load_config
from tierserve.domain.latency import percentile

WARMUP_PAIRS = 2
PER_TOKEN_TARGET_MS = 0.3
TTFT_P99_TARGET_MS = 2.0
RATE_TARGET = 0.97
PROMPT_WORDS = 24


def overhead_pool_config(
    config_path: str | None, tier: str, cpus: Sequence[int], new_tokens: int
) -> TierserveConfig:
    """The bench's own pool puts the router (and this client) on the first CPU and the worker on
    the rest, as a deployment would: what is measured is the router's work, not its contention
    with the worker for one core. With one CPU, or a --config, everything stays as given."""
    if config_path or len(cpus) < 2:
        return bench_pool_config(config_path, [tier], cpus, new_tokens)
    config = bench_pool_config(None, [tier], cpus[1:], new_tokens)
    return config.model_copy(update={"router": config.router.model_copy(update={"cores": [cpus[0]]})})


def _p(values: Sequence[float], fraction: float) -> float | None:
    return percentile(values, fraction) if values else None


def _rate(calls: Sequence[CallResult]) -> float | None:
    tokens = sum(len(c.token_times_s) for c in calls)
    seconds = sum(c.token_times_s[-1] - c.sent_s for c in calls if c.token_times_s)
    return tokens / seconds if seconds > 0 else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def overhead_figures(
    pairs: Sequence[tuple[CallResult, CallResult]], names: tuple[str, str] = ("router", "direct")
) -> dict[str, Any]:
    """The figures from (router, direct) pairs of the same request (see the module docstring); the
    paths are keyed by `names` (("http", "grpc") for the HTTP API over gRPC)."""
    a, b = names
    routed = [r for r, _ in pairs if r.status == "OK"]
    direct = [d for _, d in pairs if d.status == "OK"]
    token_diffs = [
        gr - gd
        for r, d in pairs
        if r.status == d.status == "OK"
        for gr, gd in zip(r.token_gaps_ms(), d.token_gaps_ms(), strict=False)
    ]
    ttft_r = [t for c in routed if (t := c.ttft_ms()) is not None]
    ttft_d = [t for c in direct if (t := c.ttft_ms()) is not None]
    outside_r = [t for c in routed if (t := c.outside_worker_ttft_ms()) is not None]
    outside_d = [t for c in direct if (t := c.outside_worker_ttft_ms()) is not None]
    gaps_r = [g for c in routed for g in c.token_gaps_ms()]
    gaps_d = [g for c in direct for g in c.token_gaps_ms()]
    rate_r, rate_d = _rate(routed), _rate(direct)
    figures: dict[str, Any] = {
        "pairs": len(pairs),
        "failed": {a: len(pairs) - len(routed), b: len(pairs) - len(direct)},
        "per_token_diff_p50_ms": _p(token_diffs, 0.50),
        "per_token_diff_p99_ms": _p(token_diffs, 0.99),
        "token_gap_p50_ms": {a: _p(gaps_r, 0.50), b: _p(gaps_d, 0.50)},
        "ttft_p50_ms": {a: _p(ttft_r, 0.50), b: _p(ttft_d, 0.50)},
        "ttft_p99_ms": {a: _p(ttft_r, 0.99), b: _p(ttft_d, 0.99)},
        "ttft_p50_diff_ms": _diff(_p(ttft_r, 0.50), _p(ttft_d, 0.50)),
        "ttft_p99_diff_ms": _diff(_p(ttft_r, 0.99), _p(ttft_d, 0.99)),
        "outside_worker_ttft_p50_ms": {a: _p(outside_r, 0.50), b: _p(outside_d, 0.50)},
        "outside_worker_ttft_p99_ms": {a: _p(outside_r, 0.99), b: _p(outside_d, 0.99)},
        "added_ttft_p50_ms": _diff(_p(outside_r, 0.50), _p(outside_d, 0.50)),
        "added_ttft_p99_ms": _diff(_p(outside_r, 0.99), _p(outside_d, 0.99)),
        "tokens_per_s": {a: rate_r, b: rate_d},
        "rate_ratio": rate_r / rate_d if rate_r and rate_d else None,
        "tokens_compared": len(token_diffs),
    }
    figures["targets"] = check_targets(figures)
    return figures


def check_targets(figures: Mapping[str, Any]) -> dict[str, Any]:
    def within(value: float | None, ok: bool) -> bool | None:
        return None if value is None else ok

    per_token, ttft, ratio = (
        figures["per_token_diff_p50_ms"],
        figures["added_ttft_p99_ms"],
        figures["rate_ratio"],
    )
    return {
        "per_token_p50_le_0.3ms": within(
            per_token, per_token is not None and per_token <= PER_TOKEN_TARGET_MS
        ),
        "ttft_p99_le_2ms": within(ttft, ttft is not None and ttft <= TTFT_P99_TARGET_MS),
        "token_rate_ge_0.97x": within(ratio, ratio is not None and ratio >= RATE_TARGET),
    }


def _f(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def markdown_report(
    figures: Mapping[str, Any], meta: Mapping[str, Any], http_figures: Mapping[str, Any] | None = None
) -> str:
    lines = [
        "# tierserve router overhead",
        "",
        f"{figures['pairs']} pairs from interleaved rounds of the same greedy request "
        f"({meta['new_tokens']} new tokens, worker {meta['worker_id']}, tier {meta['tier']}, "
        f"{meta.get('concurrency', 1)} concurrent stream(s) per path and round), "
        "timed by the client. TTFT outside the worker: the client's TTFT minus the worker's own queue "
        "and prefill time (its summary); the added TTFT is judged on it.",
        "",
        "## The router (gRPC) against the worker directly",
        "",
        *_table(figures, "router", "direct"),
    ]
    if http_figures is not None:
        lines += [
            "",
            "## The HTTP API (OpenAI-compatible, /v1/completions streamed) against gRPC, both through "
            "the router",
            "",
            *_table(http_figures, "http", "grpc"),
        ]
    lines += [f"- note: {n}" for n in meta.get("notes", [])]
    return "\n".join(lines) + "\n"


def _table(figures: Mapping[str, Any], a: str, b: str) -> list[str]:
    """The figures of `a` against `b` (the pairs' first and second calls) as a markdown table."""
    t, gap = figures["targets"], figures["token_gap_p50_ms"]
    ttft50, ttft99, rate = figures["ttft_p50_ms"], figures["ttft_p99_ms"], figures["tokens_per_s"]
    out50, out99 = figures["outside_worker_ttft_p50_ms"], figures["outside_worker_ttft_p99_ms"]
    lines = [
        f"| figure | {a} | {b} | {a} - {b} | target | verdict |",
        "|---|---:|---:|---:|---|---|",
        f"| per-token gap p50 ms | {_f(gap[a])} | {_f(gap[b])} "
        f"| {_f(figures['per_token_diff_p50_ms'])} (paired p50) | <= {PER_TOKEN_TARGET_MS} ms "
        f"| {_verdict(t['per_token_p50_le_0.3ms'])} |",
        f"| TTFT p50 ms | {_f(ttft50[a])} | {_f(ttft50[b])} | {_f(figures['ttft_p50_diff_ms'])} | | |",
        f"| TTFT p99 ms | {_f(ttft99[a])} | {_f(ttft99[b])} | {_f(figures['ttft_p99_diff_ms'])} | | |",
        f"| TTFT outside the worker p50 ms | {_f(out50[a])} | {_f(out50[b])} "
        f"| {_f(figures['added_ttft_p50_ms'])} | | |",
        f"| TTFT outside the worker p99 ms | {_f(out99[a])} | {_f(out99[b])} "
        f"| {_f(figures['added_ttft_p99_ms'])} | <= {TTFT_P99_TARGET_MS} ms "
        f"| {_verdict(t['ttft_p99_le_2ms'])} |",
        f"| streamed tokens/s | {_f(rate[a], '.1f')} | {_f(rate[b], '.1f')} "
        f"| ratio {_f(figures['rate_ratio'])} | >= {RATE_TARGET}x | {_verdict(t['token_rate_ge_0.97x'])} |",
    ]
    if any(figures["failed"].values()):
        lines += ["", f"Failed calls: {figures['failed']}"]
    return lines


# One round: the same request through the router (gRPC), straight to the worker, and through the
# router's HTTP API (None when not measured).
Round = tuple[CallResult, CallResult, CallResult | None]


async def _measure_rounds(
    router_address: str,
    worker_address: str,
    http_url: str | None,
    request: generate_pb2.GenerateRequest,
    count: int,
    timeout_s: float,
    console: Console,
    concurrency: int = 1,
) -> list[Round]:
    rounds: list[Round] = []
    async with (
        grpc.aio.insecure_channel(router_address, options=CHANNEL_OPTIONS) as to_router,
        grpc.aio.insecure_channel(worker_address, options=CHANNEL_OPTIONS) as to_worker,
        aiohttp.ClientSession() as session,
    ):
        router, worker = router_pb2_grpc.RouterStub(to_router), worker_pb2_grpc.WorkerStub(to_worker)
        body = completion_body(await served_model(session, http_url), request) if http_url else {}

        async def via_router() -> CallResult:
            return await timed_generate(router, request, timeout_s)

        async def direct() -> CallResult:
            return await timed_generate(worker, request, timeout_s)

        async def via_http() -> CallResult:
            assert http_url is not None
            return await timed_http_generate(session, http_url, body, timeout_s)

        paths = [via_router, direct, *([via_http] if http_url else [])]
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            what = f"rounds of {len(paths)} paths" + (
                f", {concurrency} streams each" if concurrency > 1 else ""
            )
            task = progress.add_task(what, total=count + WARMUP_PAIRS)
            for index in range(count + WARMUP_PAIRS):
                results: dict[Any, list[CallResult]] = {}
                # Each path goes first in turn; its streams run at once.
                for path in paths[index % len(paths) :] + paths[: index % len(paths)]:
                    results[path] = list(await asyncio.gather(*(path() for _ in range(concurrency))))
                if index >= WARMUP_PAIRS:
                    for stream in range(concurrency):
                        http_call = results[via_http][stream] if via_http in results else None
                        rounds.append((results[via_router][stream], results[direct][stream], http_call))
                progress.advance(task)
    return rounds


def http_pairs(rounds: Sequence[Round]) -> list[tuple[CallResult, CallResult]]:
    """(HTTP, gRPC) pairs of the rounds that measured the HTTP path: what it adds over gRPC."""
    return [(http, routed) for routed, _, http in rounds if http is not None]


def _measure(
    router_address: str,
    http_url: str | None,
    tier: str,
    words: Sequence[str],
    requests: int,
    new_tokens: int,
    timeout_s: float,
    console: Console,
    concurrency: int = 1,
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    facts = [f for f in worker_facts(router_address) if f.tier == tier]
    if not facts:
        raise ConfigError(f"no serving worker of tier {tier!r} behind {router_address}")
    target = facts[0]
    request = generate_pb2.GenerateRequest(
        prompt=" ".join(words[:PROMPT_WORDS]), max_new_tokens=new_tokens, temperature=0.0, tier=tier
    )
    console.print(f"router {router_address} vs worker {target.worker_id} at {target.address} directly")
    if http_url:
        console.print(f"and the router's HTTP API at {http_url}")
    rounds = asyncio.run(
        _measure_rounds(
            router_address, target.address, http_url, request, requests, timeout_s, console, concurrency
        )
    )
    pairs = [(routed, direct) for routed, direct, _ in rounds]
    notes = []
    others = sorted({r.worker_id for r, _ in pairs if r.status == "OK" and r.worker_id != target.worker_id})
    if others:
        notes.append(
            f"the router also sent some requests to {', '.join(others)} (another worker of tier {tier}); "
            "pairs are then not the same worker"
        )
    if not http_url:
        notes.append("the HTTP API was not measured (give --http with --router)")
    meta = {
        "worker_id": target.worker_id,
        "tier": tier,
        "router": router_address,
        "worker": target.address,
        "http": http_url or "",
    }
    http_figures = overhead_figures(http_pairs(rounds), ("http", "grpc")) if http_url else None
    return overhead_figures(pairs), http_figures, {**meta, "notes": notes}


def run_overhead_benchmark(
    out: Path,
    config_path: str | None,
    *,
    router: str | None,
    tier: str,
    http: str | None = None,
    requests: int,
    new_tokens: int,
    timeout_s: float,
    run_dir: Path | None,
    console: Console,
    concurrency: int = 1,
) -> int:
    if requests < 1 or new_tokens < 2 or concurrency < 1:
        raise ConfigError("--requests and --concurrency must be at least 1 and --new-tokens at least 2")
    started = time.perf_counter()
    if router:
        config: TierserveConfig = load_or_default(config_path)
        figures, http_figures, meta = _measure(
            router, http, tier, prompt_words(config), requests, new_tokens, timeout_s, console, concurrency
        )
    else:
        config = overhead_pool_config(config_path, tier, usable_cpus(), new_tokens)
        with running_pool(config, run_dir, console) as launcher:
            if config.router.cores:
                # After the pool started (its processes inherit affinity): the client beside the router.
                os.sched_setaffinity(0, set(config.router.cores))
            figures, http_figures, meta = _measure(
                launcher.router_address,
                launcher.http_url or None,
                tier,
                prompt_words(config),
                requests,
                new_tokens,
                timeout_s,
                console,
                concurrency,
            )
    meta.update(
        requests=requests,
        concurrency=concurrency,
        new_tokens=new_tokens,
        warmup_pairs=WARMUP_PAIRS,
        router_cores=config.router.cores,
        worker_cores={w.name: w.cores for w in config.workers},
        usable_cpus=usable_cpus(),
        elapsed_s=round(time.perf_counter() - started, 1),
    )
    stem = out.with_suffix("") if out.suffix == ".json" else out
    md_path = stem.with_name(stem.name + ".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "figures": figures, "http_figures": http_figures}
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report = markdown_report(figures, meta, http_figures)
    md_path.write_text(report, encoding="utf-8")
    print(report)
    console.print(f"wrote {out}, {md_path}", highlight=False, markup=False)
    failed = any(figures["failed"].values()) or (
        http_figures is not None and any(http_figures["failed"].values())
    )
    return 1 if failed else 0


def load_or_default(config_path: str | None) -> TierserveConfig:
    """Only the text set matters for an existing pool: the config's, or the bundled one."""
    return load_config(Path(config_path)) if config_path else default_config(usable_cpus())
