"""Skeleton latency benchmark: every tier of a real pool, through the router, against Hugging Face eager fp32.

    .venv/bin/python -m bench.skeleton_latency --out bench-results/skeleton.json [--runs 5] [--new-tokens 64]

Starts the default pool for this machine (router and workers on OS-chosen ports, a temporary run dir),
sends one greedy prompt to each tier with the tier pinned (one discarded warm-up call, then `--runs`
measured calls), stops the pool, then runs the baseline -- `transformers` eager fp32, no IPEX -- in a
subprocess pinned to the cores the fp32 worker had, with the same prompt, token count and run count.

Figures (all from the model process's own clock, so router and gRPC overhead are excluded):

- TTFT: median over the runs of the first token's latency, from the start of generation (prefill included).
- TPOT median / p95: over every token of every run except each run's first token
  (p95 is nearest-rank, as the workers report it).
- tokens/s: generated tokens divided by the summed token latencies (TTFT included), over all runs.
- speed-up: the Hugging Face eager fp32 TPOT median divided by the path's TPOT median.

`client_ttft_ms` in the JSON is the router paths' median time from sending the request to receiving
the first token at the client (queueing, tokenization, router and gRPC included).

`cpu_share` in the JSON is the CPU time the measured process (worker, or baseline subprocess) used
during its measured calls divided by wall time x its cores: near 1.0 it had its cores to itself; well
below, something else ran on them and the latencies are inflated (a warning is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from tierserve.benchmarks.tiers import cpu_model, package_version
from tierserve.domain.config import TierserveConfig, default_config, parse_config
from tierserve.domain.cores import format_cpu_list, parse_cpu_list
from tierserve.domain.latency import percentile
from tierserve.domain.tiers import REFERENCE_TIER, TIER_NAMES

PROMPT = "The capital of France is"
BASELINE_PATH = "hf-eager"
RPC_TIMEOUT_S = 600.0
REPO_ROOT = Path(__file__).resolve().parents[1]
# Below this CPU share the measured process evidently shared its cores with something else.
CONTENDED_CPU_SHARE = 0.85


@dataclass
class RunSample:
    """One measured generation: per-token latencies (the first is the TTFT) and its text."""

    latencies_us: list[int]
    text: str
    client_ttft_us: int | None = None
    worker_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "latencies_us": self.latencies_us,
            "text": self.text,
            "client_ttft_us": self.client_ttft_us,
            "worker_id": self.worker_id,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> RunSample:
        return RunSample(
            latencies_us=[int(v) for v in data["latencies_us"]],
            text=str(data["text"]),
            client_ttft_us=None if data.get("client_ttft_us") is None else int(data["client_ttft_us"]),
            worker_id=str(data.get("worker_id", "")),
        )


@dataclass
class PathResult:
    path: str
    tier: str
    cores: list[int]
    samples: list[RunSample] = field(default_factory=list)
    cpu_share: float | None = None

    def ttft_ms(self) -> float:
        return statistics.median(s.latencies_us[0] for s in self.samples) / 1e3

    def tpot_us(self) -> list[int]:
        return [lat for s in self.samples for lat in s.latencies_us[1:]]

    def tpot_ms(self) -> float:
        tpot = self.tpot_us()
        return statistics.median(tpot) / 1e3 if tpot else 0.0

    def tpot_p95_ms(self) -> float:
        return percentile(self.tpot_us(), 0.95) / 1e3

    def tokens_per_s(self) -> float:
        tokens = sum(len(s.latencies_us) for s in self.samples)
        seconds = sum(sum(s.latencies_us) for s in self.samples) / 1e6
        return tokens / seconds if seconds else 0.0

    def client_ttft_ms(self) -> float | None:
        values = [s.client_ttft_us for s in self.samples if s.client_ttft_us is not None]
        return statistics.median(values) / 1e3 if values else None

    def to_json(self, baseline_tpot_ms: float | None, new_tokens: int) -> dict[str, Any]:
        tpot = self.tpot_ms()
        last = self.samples[-1]
        return {
            "path": self.path,
            "tier": self.tier,
            "cores": self.cores,
            "ttft_ms": round(self.ttft_ms(), 3),
            "tpot_ms": round(tpot, 3),
            "tpot_p95_ms": round(self.tpot_p95_ms(), 3),
            "tokens_per_s": round(self.tokens_per_s(), 2),
            "speedup_vs_hf_fp32": round(baseline_tpot_ms / tpot, 3) if baseline_tpot_ms and tpot else None,
            "runs": len(self.samples),
            "new_tokens": new_tokens,
            "text": last.text,
            # Beyond the requested schema: what the last run really produced, and where.
            "generated_tokens": len(last.latencies_us),
            "client_ttft_ms": _round_opt(self.client_ttft_ms()),
            "worker_id": last.worker_id,
            "cpu_share": _round_opt(self.cpu_share),
        }

    def warn_if_contended(self, console: Console) -> None:
        if self.cpu_share is not None and self.cpu_share < CONTENDED_CPU_SHARE:
            console.print(
                f"[yellow]warning:[/] {self.path} got only {self.cpu_share:.0%} of cores "
                f"{format_cpu_list(self.cores)} while measured: another process competed for them, "
                "so its latencies are inflated"
            )


def _round_opt(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --- the pool ---------------------------------------------------------------------------------------


def _bench_config(usable_cpus: list[int]) -> TierserveConfig:
    """default_config for these CPUs, with every port left to the OS so the pool never collides."""
    data = default_config(usable_cpus).model_dump()
    data["router"]["port"] = 0
    for worker in data["workers"]:
        worker["port"] = 0
    return parse_config(data, source="bench config")


def _measure_router_call(address: str, tier: str, new_tokens: int) -> RunSample:
    from tierserve_client.v1 import generate_pb2

    from tierserve.rpc.calls import stream_generate

    request = generate_pb2.GenerateRequest(
        prompt=PROMPT, max_new_tokens=new_tokens, temperature=0.0, tier=tier
    )
    latencies: list[int] = []
    client_ttft_us: int | None = None
    summary: generate_pb2.Summary | None = None
    sent = time.perf_counter()
    for response in stream_generate(address, request, timeout_s=RPC_TIMEOUT_S):
        if response.HasField("token"):
            if client_ttft_us is None:
                client_ttft_us = int((time.perf_counter() - sent) * 1e6)
            latencies.append(int(response.token.latency_us))
        else:
            summary = response.summary
    if summary is None:
        raise RuntimeError(f"tier {tier}: the stream ended without a summary")
    if summary.tier != tier:
        raise RuntimeError(f"asked for tier {tier}, served by {summary.worker_id} ({summary.tier})")
    if not latencies or len(latencies) != summary.generated_tokens:
        raise RuntimeError(
            f"tier {tier}: {len(latencies)} tokens streamed, summary says {summary.generated_tokens}"
        )
    if summary.ttft_us != latencies[0]:
        raise RuntimeError(f"tier {tier}: summary TTFT {summary.ttft_us} us != first token {latencies[0]} us")
    return RunSample(latencies, summary.text, client_ttft_us, summary.worker_id)


def bench_pool(
    console: Console, run_dir: Path, runs: int, new_tokens: int
) -> tuple[list[PathResult], dict[str, str]]:
    """Start the pool, measure every tier through the router, stop the pool; also returns worker versions."""
    from tierserve.ops.launcher import PoolLauncher
    from tierserve.rpc.calls import list_workers

    config = _bench_config(sorted(os.sched_getaffinity(0)))
    launcher = PoolLauncher(config, run_dir, console)
    results: list[PathResult] = []
    versions: dict[str, str] = {}
    try:
        address = launcher.start()
        console.print(f"pool serving at {address} (run dir {run_dir})")
        workers = sorted(list_workers(address).workers, key=lambda w: TIER_NAMES.index(w.info.tier))
        pids = {m.name.removeprefix("worker "): m.process.pid for m in launcher.workers}
        for worker in workers:
            info = worker.info
            versions = versions or dict(info.versions)
            result = PathResult(f"tierserve/{info.tier}", info.tier, sorted(info.cores))
            console.print(
                f"{info.tier}: worker {info.worker_id}, cores {format_cpu_list(result.cores)}, "
                f"{info.threads} thread(s), {info.kernel}"
            )
            _measure_router_call(address, info.tier, new_tokens)  # warm-up, discarded
            process = psutil.Process(pids[info.worker_id])
            cpu_before, wall_before = _cpu_seconds(process), time.perf_counter()
            for _ in range(runs):
                result.samples.append(_measure_router_call(address, info.tier, new_tokens))
            wall = time.perf_counter() - wall_before
            result.cpu_share = (_cpu_seconds(process) - cpu_before) / (wall * max(1, len(result.cores)))
            console.print(
                f"  TPOT median {result.tpot_ms():.2f} ms over {len(result.tpot_us())} tokens, "
                f"CPU share {result.cpu_share:.0%}"
            )
            result.warn_if_contended(console)
            results.append(result)
    finally:
        launcher.stop()
    return results, versions


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


# --- the Hugging Face eager fp32 baseline ---------------------------------------------------------------


def hf_baseline_worker(model_dir: Path, cores: list[int], runs: int, new_tokens: int) -> dict[str, Any]:
    """Runs in its own process: pin, then import torch and generate with plain transformers (no IPEX)."""
    os.sched_setaffinity(0, set(cores))
    os.environ["OMP_NUM_THREADS"] = str(len(cores))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(len(cores))

    class TimingStreamer(BaseStreamer):  # type: ignore[misc]
        """Timestamps each put(); generate() first hands over the prompt, then one put per token."""

        def __init__(self, started: float) -> None:
            self.last = started
            self.prompt_seen = False
            self.latencies_us: list[int] = []
            self.token_ids: list[int] = []

        def put(self, value: torch.Tensor) -> None:
            now = time.perf_counter()
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token_id in value.reshape(-1).tolist():
                self.latencies_us.append(int((now - self.last) * 1e6))
                self.last = now
                self.token_ids.append(int(token_id))

        def end(self) -> None:
            pass

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    # The same generation settings the workers use for a greedy request.
    generation_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    encoded = tokenizer(PROMPT, return_tensors="pt")
    samples: list[dict[str, Any]] = []
    cpu_before = wall_before = 0.0
    with torch.inference_mode():
        for run in range(runs + 1):  # run 0 is the discarded warm-up
            if run == 1:
                cpu_before, wall_before = time.process_time(), time.perf_counter()
            streamer = TimingStreamer(time.perf_counter())
            model.generate(
                input_ids=encoded["input_ids"],
                attention_mask=encoded["attention_mask"],
                generation_config=generation_config,
                streamer=streamer,
            )
            if run:
                text = tokenizer.decode(streamer.token_ids, skip_special_tokens=True)
                samples.append(RunSample(streamer.latencies_us, text).to_json())
    cpu_share = (time.process_time() - cpu_before) / ((time.perf_counter() - wall_before) * len(cores))
    return {
        "cores": sorted(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "cpu_isa": str(torch.backends.cpu.get_cpu_capability()),
        "samples": samples,
        "cpu_share": cpu_share,
    }


def bench_hf_baseline(
    console: Console, model_dir: Path, cores: list[int], runs: int, new_tokens: int
) -> tuple[PathResult, str]:
    command = [
        sys.executable, "-m", "bench.skeleton_latency", "--hf-baseline-worker",
        "--model-dir", str(model_dir), "--cores", format_cpu_list(cores),
        "--runs", str(runs), "--new-tokens", str(new_tokens),
    ]  # fmt: skip
    console.print(f"HF eager fp32 baseline on cores {format_cpu_list(cores)}")
    completed = subprocess.run(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the HF baseline subprocess exited with code {completed.returncode}")
    lines = [line for line in completed.stdout.decode("utf-8").splitlines() if line.strip()]
    data = json.loads(lines[-1])
    result = PathResult(BASELINE_PATH + "/fp32", REFERENCE_TIER, [int(c) for c in data["cores"]])
    result.samples = [RunSample.from_json(s) for s in data["samples"]]
    result.cpu_share = float(data["cpu_share"])
    console.print(
        f"  TPOT median {result.tpot_ms():.2f} ms over {len(result.tpot_us())} tokens, "
        f"CPU share {result.cpu_share:.0%}"
    )
    result.warn_if_contended(console)
    return result, str(data["cpu_isa"])


# --- report -------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| path | cores | TTFT ms | TPOT median ms | TPOT p95 ms | tokens/s | speed-up vs HF eager fp32 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        speedup = row["speedup_vs_hf_fp32"]
        lines.append(
            f"| {row['path']} | {format_cpu_list(row['cores'])} | {row['ttft_ms']:.2f} "
            f"| {row['tpot_ms']:.2f} | {row['tpot_p95_ms']:.2f} | {row['tokens_per_s']:.1f} "
            f"| {'n/a' if speedup is None else f'{speedup:.2f}x'} |"
        )
    return "\n".join(lines)


def run_benchmark(out: Path, runs: int, new_tokens: int, run_dir: Path | None) -> int:
    from tierserve.ops.modelprep import prepare_model

    console = Console(stderr=True)
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tierserve-bench-"))
    started = time.perf_counter()
    pool_results, worker_versions = bench_pool(console, run_dir, runs, new_tokens)
    fp32 = next((r for r in pool_results if r.tier == REFERENCE_TIER), None)
    if fp32 is None:
        raise RuntimeError("the pool has no fp32 worker; the baseline is pinned to its cores")
    model_dir = prepare_model(_bench_config(sorted(os.sched_getaffinity(0))).model, console)
    baseline, cpu_isa = bench_hf_baseline(console, model_dir, fp32.cores, runs, new_tokens)

    baseline_tpot = baseline.tpot_ms()
    rows = [r.to_json(baseline_tpot, new_tokens) for r in [baseline, *pool_results]]
    report = {
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_isa": cpu_isa,
            "usable_cpus": sorted(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": package_version("torch"),
            "intel_extension_for_pytorch": package_version("intel-extension-for-pytorch"),
            "transformers": package_version("transformers"),
            "worker_reported_versions": worker_versions,
        },
        "prompt": PROMPT,
        "model_dir": str(model_dir),
        "run_dir": str(run_dir),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown_table(rows))
    console.print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.skeleton_latency", description=__doc__)
    parser.add_argument("--out", type=Path, help="JSON report to write (parent dirs are created)")
    parser.add_argument("--runs", type=int, default=5, help="measured calls per path (after one warm-up)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens per call")
    parser.add_argument("--run-dir", type=Path, help="the pool's run dir (default: a new temp dir)")
    # Internal: the baseline subprocess.
    parser.add_argument("--hf-baseline-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cores", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < 1 or args.new_tokens < 1:
        parser.error("--runs and --new-tokens must be at least 1")
    if args.hf_baseline_worker:
        if args.model_dir is None or not args.cores:
            parser.error("--hf-baseline-worker needs --model-dir and --cores")
        result = hf_baseline_worker(args.model_dir, parse_cpu_list(args.cores), args.runs, args.new_tokens)
        print(json.dumps(result))
        return 0
    if args.out is None:
        parser.error("--out is required")
    return run_benchmark(args.out, args.runs, args.new_tokens, args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
