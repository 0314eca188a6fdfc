"""A pool for the benchmarks that need live servers (routing, overhead): its config, its start and
stop, and the measured facts about its workers that the benchmarks plan with."""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from tierserve_client.v1 import router_pb2

from tierserve.domain.config import ConfigError, TierserveConfig, load_config, parse_config
from tierserve.domain.textsets import eval_path, read_paragraphs
from tierserve.domain.tiers import REFERENCE_TIER, TIER_NAMES
from tierserve.ops.capacity import freshest_latency
from tierserve.rpc.calls import list_workers

MATPLOTLIB_MISSING = "matplotlib is not installed (pip install 'tierserve[bench]'): no plot written"


def bench_pool_config(
    config_path: str | None, tiers: Sequence[str], cpus: Sequence[int], max_new_tokens: int
) -> TierserveConfig:
    """The given config, or one worker per tier named over these CPUs (an even split, or one CPU each in
    turn when there are fewer CPUs than tiers); every port left to the OS so the pool never collides."""
    if config_path:
        data = load_config(Path(config_path)).model_dump()
    else:
        unknown = [t for t in tiers if t not in TIER_NAMES]
        if unknown or not tiers:
            raise ConfigError(
                f"unknown tiers {', '.join(unknown) or '(none)'}; known: {', '.join(TIER_NAMES)}"
            )
        share = len(cpus) // len(tiers)
        workers = [
            {
                # A tier named twice gets two workers: fp32-0, fp32-1.
                "name": f"{tier}-{tiers[:i].count(tier)}",
                "tier": tier,
                "cores": list(cpus[i * share : (i + 1) * share]) if share else [cpus[i % len(cpus)]],
            }
            for i, tier in enumerate(tiers)
        ]
        data = {"workers": workers, "limits": {"max_new_tokens": max(512, max_new_tokens)}}
        if not share:  # more tiers than CPUs: they take turns, sharing on purpose
            data["placement"] = {"allow_shared_cores": True}
    data.setdefault("router", {}).update(port=0, http_port=0)
    for worker in data["workers"]:
        if not worker.get("address"):
            worker["port"] = 0
    limits = data.setdefault("limits", {})
    if limits.get("max_new_tokens", max_new_tokens) < max_new_tokens:
        raise ConfigError(
            f"the config's limits.max_new_tokens ({limits['max_new_tokens']}) is below the benchmark's "
            f"largest request ({max_new_tokens} new tokens)"
        )
    return parse_config(data, source=config_path or "bench config")


@contextlib.contextmanager
def running_pool(config: TierserveConfig, run_dir: Path | None, console: Console) -> Iterator[Any]:
    """Start the pool (`tierserve up` style); yields the PoolLauncher and stops everything on exit."""
    from tierserve.ops.launcher import PoolLauncher

    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tierserve-bench-"))
    launcher = PoolLauncher(config, run_dir, console)
    try:
        launcher.start()
        console.print(f"pool serving at {launcher.router_address} (run dir {run_dir})")
        yield launcher
    finally:
        launcher.stop()


@dataclass(frozen=True)
class WorkerFacts:
    worker_id: str
    tier: str
    address: str
    ttft_ms: float
    tpot_ms: float
    # Perplexity change against fp32 from the card; None when not measured.
    ppl_delta_pct: float | None


def worker_facts(router_address: str) -> list[WorkerFacts]:
    facts = []
    for worker in list_workers(router_address).workers:
        if worker.health != router_pb2.WORKER_HEALTH_SERVING:
            continue
        stats, _ = freshest_latency(worker)
        card = worker.info.accuracy
        facts.append(
            WorkerFacts(
                worker_id=worker.worker_id,
                tier=worker.info.tier,
                address=worker.address,
                ttft_ms=stats.ttft_p50_us / 1e3,
                tpot_ms=stats.tpot_p50_us / 1e3,
                ppl_delta_pct=float(card.perplexity_delta_pct) if card.measured else None,
            )
        )
    if not facts:
        raise RuntimeError(f"no worker behind {router_address} is serving")
    return facts


def tier_cards(facts: Sequence[WorkerFacts]) -> dict[str, float | None]:
    """Each tier's loss as tolerances are judged: the reference tier loses exactly 0 (its card's
    +0.0001% is noise against itself), as the router also counts it."""
    return {f.tier: 0.0 if f.tier == REFERENCE_TIER else f.ppl_delta_pct for f in facts}


def prompt_words(config: TierserveConfig) -> list[str]:
    """The words of the evaluation text set: prompts are windows of it."""
    return " ".join(read_paragraphs(eval_path(config.data))).split()


def import_pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend, or None when matplotlib (the `bench` extra) is missing."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))
