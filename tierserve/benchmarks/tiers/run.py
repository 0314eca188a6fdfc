"""The orchestrating process of `bench tiers`, and the entry point of each path's subprocess.

The parent prepares the model, the prompts and the spec every path shares, measures the machine's
read bandwidth, then starts one subprocess per path (`python -m tierserve.benchmarks.tiers --worker
--spec FILE`), one after the other; each prints its JSON reply as its last marked line. A tier
whose artifact was missing is built by its first subprocess and measured by a second, so load time
and memory always describe a start from the cache. Finally it writes the JSON, meta, markdown and
plot (`report`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata, util
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from tierserve.benchmarks.tiers.floor import measure_read_bandwidth
from tierserve.benchmarks.tiers.llamacpp import (
    LLAMACPP,
    llama_model_params,
    llama_params_note,
    llamacpp_worker,
    tokenization_note,
)
from tierserve.benchmarks.tiers.measure import (
    BASELINE,
    LONG_PROMPT_TOKENS,
    SHORT_PROMPT_TOKENS,
    WorkerSpec,
    exact_token_prompt,
    torch_worker,
)
from tierserve.benchmarks.tiers.report import (
    ACCURACY_TIE_PCT,
    INT4_TIER,
    PathMeasurement,
    cell,
    four_bit_source_note,
    mark_dominated,
    markdown_table,
    output_paths,
    render_markdown,
    result_row,
    write_plot,
)
from tierserve.domain.config import ConfigError, TierserveConfig, default_config, load_config
from tierserve.domain.cores import format_cpu_list
from tierserve.domain.tiers import TIER_NAMES
from tierserve.worker.isa import CpuIsa, cpu_flags

# Below this CPU share the measured process evidently shared its CPUs with something else.
CONTENDED_CPU_SHARE = 0.85
# A subprocess that builds an artifact for a slow tier (card scored token by token) takes long.
WORKER_TIMEOUT_S = 4 * 3600.0
RECOMMENDED_RUNS = 5
RESULT_MARKER = "TIERSERVE-BENCH-RESULT "


# --- the measured subprocess ------------------------------------------------------------------------------


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
        f"  TPOT {cell(measurement.tpot_ms(), '.2f')} ms, TTFT {cell(measurement.ttft_ms(), '.1f')} ms, "
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
    if util.find_spec("llama_cpp") is None:
        return False, "llama.cpp peer skipped: llama_cpp does not import (pip install 'tierserve[bench]')"
    return True, None


def _machine(isa: CpuIsa, cpus: list[int]) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_isa": isa.summary(),
        "ipex_woq_fast": isa.ipex_woq_fast,
        "usable_cpus": cpus,
        "python": platform.python_version(),
        **{
            name: package_version(name)
            for name in ("torch", "intel-extension-for-pytorch", "transformers", "llama_cpp_python")
        },
    }


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
    from tierserve.worker.tiers import registered_tiers

    if runs < 1 or new_tokens < 2:
        raise ConfigError("--runs must be at least 1 and --new-tokens at least 2")
    started = time.perf_counter()
    cpus = sorted(os.sched_getaffinity(0))
    config = load_config(Path(config_path)) if config_path else default_config(cpus)
    chosen, notes = select_tiers(tiers, registered_tiers())
    if runs < RECOMMENDED_RUNS:
        notes.append(f"only {runs} run(s) per path: medians are noisier than with {RECOMMENDED_RUNS}")
    llama_params: dict[str, bool] = {}
    if llamacpp:
        llamacpp, why_not = _llamacpp_available(config)
        if why_not:
            notes.append(why_not)
        else:
            llama_params = llama_model_params(cpu_flags())
            repacking_note = llama_params_note(llama_params)
            if repacking_note:
                notes.append(repacking_note)
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
        llama_params=llama_params,
    )

    bandwidth = measure_read_bandwidth(len(cpus))
    console.print(
        f"read bandwidth {bandwidth.bytes_per_s / 1e9:.1f} GB/s ({len(cpus)} thread(s), "
        f"{bandwidth.buffer_bytes // 2**20} MiB buffer)"
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
    baseline_tpot = baseline.tpot_ms() if baseline else None
    rows = [result_row(m, baseline_tpot, bandwidth.bytes_per_s) for m in measurements]
    # Only the default model (no [model] path) is known to come from a 4-bit file.
    source_note = None if config.model.path else four_bit_source_note(config.recipe(INT4_TIER).group_size)
    dominated = mark_dominated(rows, isa.ipex_woq_fast, isa.summary(), source_note)
    short_of_tokens = [r["tier"] for r in rows if r["generated_tokens"] < new_tokens]
    if short_of_tokens:
        notes.append(f"stopped at end of sequence before {new_tokens} tokens: {', '.join(short_of_tokens)}")

    meta_path, md_path, png_path = output_paths(out)
    meta: dict[str, Any] = {
        "machine": _machine(isa, cpus),
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
            "llama_model_params": llama_params,
        },
        "read_bandwidth": bandwidth.to_json(),
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
