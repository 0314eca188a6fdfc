"""Fixtures shared by the continuous-batching tests (test_batching, test_chunked_prefill): tiny
random models of each supported family and batch engines on them (module-scoped: each test
module builds its own)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_model import FAMILIES, build_tiny_model_dir
from tierserve.domain.config import BatchingConfig
from tierserve.domain.requests import GenerationParams
from tierserve.worker.batching.engine import BatchEngine, BatchLimits
from tierserve.worker.batching.startup import start_batching
from tierserve.worker.engine import Engine
from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import decode_attention
from tierserve.worker.kernels.decode_attention import DecodeKernel
from tierserve.worker.tiers.base import make_tier


def library_op_or_skip(op: Any, instructions: str) -> Any:
    """A kernel op of tierserve's library for a test module: skip where the CPU lacks its
    `instructions` (a `CpuIsa` flag, e.g. "avx512_bf16"), fail where it has them but no op."""
    if op is None:
        name = instructions.upper()
        if getattr(CpuIsa.detect(), instructions):
            pytest.fail(f"this CPU has {name} but tierserve's kernel library lacks the op")
        pytest.skip(f"the kernel needs {name}, which this CPU lacks")
    return op


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", architecture=request.param)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def engine(request: pytest.FixtureRequest, llama_dir: Path) -> Engine:
    return Engine(make_tier(request.param).load(llama_dir, llama_dir))


def tierserve_kernel() -> DecodeKernel:
    """tierserve's decode-attention kernel, which the batch of a worker uses (built once per
    machine into the default cache, as a worker builds it)."""
    loaded = decode_attention.load(decode_attention.default_dir())
    assert loaded.kernel is not None, f"tierserve's decode-attention kernel did not build: {loaded.reason}"
    return loaded.kernel


def batch_engine(engine: Engine, **limits: Any) -> BatchEngine:
    """A batch engine stepping in its own thread, with the decode kernel a worker's batch uses and,
    unless `limits` say otherwise, prompt chunks packed with the rows' tokens as a worker packs
    them (`packs_prompts`)."""
    limits.setdefault("packed_prefill", packs_prompts(engine))
    return BatchEngine(engine, BatchLimits(**limits), decode_kernel=tierserve_kernel())


def packs_prompts(engine: Engine) -> bool:
    """Whether a worker packs a prompt's chunks with the running rows' tokens: where the model
    computes in bf16, and in float32 (exact text) only where every linear keeps rows independent."""
    return not computes_in_float32(engine) or engine.loaded.rows_independent


def computes_in_float32(engine: Engine) -> bool:
    """False for a bf16 tier on the "ipex" path (bf16 weights and compute); the "native" path
    of CPUs without bf16 kernels computes in float32."""
    return bool(engine.loaded.model.dtype == torch.float32)


def alone(engine: Engine, request: GenerationParams) -> str:
    """The text made alone: by the one-request path (IPEX's own attention) where the model
    computes in float32, which the batch's paged attention must match exactly; in bf16 the two
    attention kernels round differently and a random model's near-ties turn that into other
    tokens, so there by a batch engine serving only this request (its prompt in one forward)."""
    if computes_in_float32(engine):
        return engine.generate(engine.prepare(request), request, emit=lambda _: None).text
    with batch_engine(engine, max_batch=1, kv_cache_tokens=4096, prefill_chunk_tokens=None) as single:
        prompt = engine.prepare(request)
        ticket = single.submit(prompt, request, lambda _: None, lambda: False, time.perf_counter())
        return ticket.future.result(timeout=120).text


@contextmanager
def started_batching(
    engine: Engine, config: BatchingConfig, *args: Any
) -> Iterator[tuple[BatchEngine | None, str]]:
    """`start_batching`'s batch (None where it is unavailable) and reason, stopped on leaving."""
    batch, reason = start_batching(engine, config, *args)
    try:
        yield batch, reason
    finally:
        if batch is not None:
            batch.stop()
