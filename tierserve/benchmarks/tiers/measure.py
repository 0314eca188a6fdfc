"""One torch path measured inside its own subprocess: the plain-transformers baseline or a tier,
loaded, warmed up as a worker warms up, then timed through the worker's own `Engine`.

The reply (a JSON object) carries every token's latency, memory, load time, the accuracy card and
the bytes of weights a decode step reads; `report` turns it into figures. Nothing heavy is imported
at module level: the llama.cpp peer's subprocess imports this module too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from tierserve.domain.config import TierserveConfig, WorkerConfig, parse_config
from tierserve.worker.warmup import long_prefill_params, warm_up

if TYPE_CHECKING:
    from tierserve.worker.accuracy import AccuracyCard
    from tierserve.worker.engine import Engine, GenerationOutcome
    from tierserve.worker.tiers.base import LoadedModel

BASELINE = "hf-eager-fp32"
SHORT_PROMPT_TOKENS = 32
LONG_PROMPT_TOKENS = 256
# As many warm-up rounds as a worker runs by default.
WARMUP_RUNS: int = WorkerConfig.model_fields["warmup_runs"].default


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
    # llama.cpp model parameters set before its model loads (see llamacpp.llama_model_params).
    llama_params: dict[str, bool] = field(default_factory=dict)

    def save(self, file: Path) -> None:
        file.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @staticmethod
    def load(file: Path) -> WorkerSpec:
        return WorkerSpec(**json.loads(file.read_text(encoding="utf-8")))


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


# --- shared by the measured subprocesses ------------------------------------------------------------------


def log(path: str, message: str) -> None:
    print(f"[{path}] {message}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


@contextlib.contextmanager
def cpu_share(threads: int, sink: list[float]) -> Iterator[None]:
    """Appends to sink the CPU time used inside the block over its wall time x threads."""
    cpu, wall = time.process_time(), time.perf_counter()
    yield
    elapsed = time.perf_counter() - wall
    sink.append((time.process_time() - cpu) / (elapsed * threads) if elapsed > 0 else 0.0)


def eval_token_chunks(config: TierserveConfig, tokenizer: Any) -> list[list[int]]:
    from tierserve.domain.textsets import eval_path, read_paragraphs
    from tierserve.worker.accuracy import eval_chunks

    paragraphs = read_paragraphs(eval_path(config.data))
    return eval_chunks(tokenizer, paragraphs, config.data.eval_tokens, config.data.eval_chunk_tokens)


# --- the torch paths ----------------------------------------------------------------------------------------


def _engine_generate(
    engine: Engine, prompt: str, new_tokens: int, expect_tokens: int | None
) -> GenerationOutcome:
    from tierserve.domain.requests import GenerationParams, SamplingParams

    params = GenerationParams(prompt, new_tokens, SamplingParams(), (), "bench")
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

    from tierserve.benchmarks.tiers.floor import decode_weight_bytes
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
                log(spec.path, stage)

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
    log(spec.path, f"loaded in {load_s:.1f} s: {loaded.kernel}")

    engine = Engine(loaded, config.limits.max_context_tokens)
    warm_up(engine, WARMUP_RUNS, long_prefill_params(engine))
    log(spec.path, f"warmed up ({WARMUP_RUNS} rounds)")
    _engine_generate(engine, spec.short_prompt, spec.new_tokens, SHORT_PROMPT_TOKENS)
    _engine_generate(engine, spec.long_prompt, 1, LONG_PROMPT_TOKENS)
    memory_mb = rss_mb()

    runs_us: list[list[int]] = []
    ttft_256_us: list[int] = []
    text = ""
    share: list[float] = []
    with cpu_share(pinning.threads, share):
        for _ in range(spec.runs):
            outcome = _engine_generate(engine, spec.short_prompt, spec.new_tokens, SHORT_PROMPT_TOKENS)
            runs_us.append(outcome.token_latencies_us)
            text = outcome.text
            ttft_256_us.append(_engine_generate(engine, spec.long_prompt, 1, LONG_PROMPT_TOKENS).ttft_us)
    log(spec.path, f"measured {spec.runs} run(s); CPU share {share[0]:.0%}")

    if card is None:  # the baseline: scored like a tier, against the same fp32 reference
        card = asdict(_baseline_card(config, loaded, model_dir, spec.path))
    return {
        **reply,
        "status": "measured",
        "backend": loaded.backend,
        "kernel": loaded.kernel,
        "load_s": load_s,
        "rss_mb": memory_mb,
        "threads": torch.get_num_threads(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "runs_us": runs_us,
        "ttft_256_us": ttft_256_us,
        "cpu_share": share[0],
        "text": text,
        "card": card,
        "weight_bytes": decode_weight_bytes(loaded.model),
    }


def _baseline_card(config: TierserveConfig, loaded: LoadedModel, model_dir: Path, path: str) -> AccuracyCard:
    from tierserve.worker.accuracy import measure_card, reference_log_probs

    log(path, "measuring the accuracy card")
    chunks = eval_token_chunks(config, loaded.tokenizer)
    return measure_card(loaded, chunks, reference_log_probs(model_dir, chunks))
