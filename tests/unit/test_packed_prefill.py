"""A prompt chunk and the running rows' next tokens in one forward, on tiny random models through
the real tier recipes: the packed forward gives each part the logits it gets in a forward of its
own, the batch engine packs a joining prompt's chunks with the running rows' steps, and a worker
packs where a batch is not held to the exact text alone or its linears keep rows independent."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.conftest import batch_engine, packs_prompts, started_batching
from tierserve.domain.config import BatchingConfig
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.batching import engine as engine_module
from tierserve.worker.engine import Engine, FinishReason, TokenEvent
from tierserve.worker.kernels.last_logits import prefill_graph
from tierserve.worker.kernels.paged_kv import BlockPool, PagedRow, cache_shape, packed_forward, paged_forward
from tierserve.worker.tiers.base import make_tier

CHUNK = 16
LONG_PROMPT = "Count along: " + ", ".join(f"item {i}" for i in range(18))


def random_ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def span(start: int, end: int) -> torch.Tensor:
    return torch.arange(start, end).unsqueeze(0)


@pytest.mark.parametrize("trimmed", [False, True], ids=["every-position", "last-position"])
def test_a_packed_forward_gives_the_chunk_and_each_row_their_own_forwards_logits(
    family_dir: Path, trimmed: bool
) -> None:
    """A 16-token chunk over a 24-token cache packed with two decode rows (caches of 20 and 9):
    the chunk's last logits and each row's equal those of the chunk's and the rows' own forwards
    on copies of the same caches, and every cache grows as in those forwards."""
    loaded = make_tier("fp32").load(family_dir, family_dir)
    model = loaded.model
    prompt, first, second = random_ids(40, 1), random_ids(20, 2), random_ids(9, 3)
    with torch.inference_mode():
        graph = prefill_graph(model) if trimmed else model.trace_graph
        assert graph is not None
        pool = BlockPool(cache_shape(model), 32)

        def cached(ids: torch.Tensor) -> PagedRow:
            row = PagedRow()
            paged_forward(model.trace_graph, pool, [row], ids, span(0, int(ids.shape[1])))
            return row

        packed_rows = [cached(prompt[:, :24]), cached(first), cached(second)]
        own_rows = [cached(prompt[:, :24]), cached(first), cached(second)]
        next_ids, next_positions = torch.tensor([7, 11]), torch.tensor([20, 9])
        keep = {"keep_from": CHUNK - 1} if trimmed else {}
        packed = packed_forward(
            graph,
            pool,
            packed_rows[0],
            prompt[:, 24:],
            span(24, 40),
            packed_rows[1:],
            next_ids,
            next_positions,
            **keep,
        )[0]
        chunk_alone = paged_forward(model.trace_graph, pool, [own_rows[0]], prompt[:, 24:], span(24, 40))[
            0, -1
        ]
        rows_alone = paged_forward(
            model.trace_graph, pool, own_rows[1:], next_ids.unsqueeze(1), next_positions.unsqueeze(1)
        )[:, -1]
    assert int(packed.shape[0]) == (1 if trimmed else CHUNK) + 2
    assert torch.allclose(packed[-3], chunk_alone, atol=1e-4)
    assert torch.allclose(packed[-2:], rows_alone, atol=1e-4)
    assert [row.length for row in packed_rows] == [row.length for row in own_rows] == [40, 21, 10]


def test_the_batch_engine_packs_a_joining_prompts_chunks_with_the_rows_steps(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every chunk of a long prompt joining a running stream rides in one forward with that
    stream's next token, and both requests end as asked."""
    packed_chunks: list[tuple[int, int]] = []

    def recorded(
        graph: Any, pool: Any, chunk_row: Any, chunk_ids: torch.Tensor, *rest: Any, **trim: Any
    ) -> Any:
        packed_chunks.append((int(chunk_ids.shape[1]), len(rest[1])))
        return packed_forward(graph, pool, chunk_row, chunk_ids, *rest, **trim)

    monkeypatch.setattr(engine_module, "packed_forward", recorded)
    running_request = GenerationParams("Once upon a time", 40, SamplingParams(), (), "running")
    long_request = GenerationParams(LONG_PROMPT, 6, SamplingParams(), (), "long")
    decoding = threading.Event()

    def on_running_token(event: TokenEvent) -> None:
        if event.index >= 1:  # past its prefill: the long prompt joins a decoding row
            decoding.set()

    with batch_engine(
        engine, max_batch=2, kv_cache_tokens=4096, prefill_chunk_tokens=CHUNK, packed_prefill=True
    ) as batch:
        running = batch.submit(
            engine.prepare(running_request), running_request, on_running_token, lambda: False, 0.0
        )
        assert decoding.wait(timeout=120)
        long_prompt = engine.prepare(long_request)
        long = batch.submit(long_prompt, long_request, lambda _: None, lambda: False, 0.0)
        long_outcome, running_outcome = long.future.result(timeout=120), running.future.result(timeout=120)
    chunks = math.ceil(long_prompt.prompt_tokens / CHUNK)
    assert [tokens for tokens, _ in packed_chunks][-chunks:] == [CHUNK] * (chunks - 1) + [
        long_prompt.prompt_tokens - CHUNK * (chunks - 1)
    ]
    assert all(rows == 1 for _, rows in packed_chunks)
    assert (long_outcome.generated_tokens, long_outcome.finish_reason) == (6, FinishReason.LENGTH)
    assert (running_outcome.generated_tokens, running_outcome.finish_reason) == (40, FinishReason.LENGTH)


def test_a_worker_packs_only_where_packing_keeps_the_exact_text(engine: Engine) -> None:
    with started_batching(engine, BatchingConfig(max_batch=2, prefill_chunk_tokens=64)) as (batch, reason):
        assert batch is not None, reason
        assert batch.limits.packed_prefill == packs_prompts(engine)
        packed = "a prompt's forwards packed with the running rows' next tokens"
        assert (packed in reason) == batch.limits.packed_prefill, reason
        assert "logits at a prompt's last position only" in reason


def test_a_failed_packed_forward_fails_the_requests_it_carried_and_the_engine_serves_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefilling request and the running row end with the error, their blocks go back to the
    pool, and the next request is served."""
    failures = [RuntimeError("the packed forward failed")]

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return packed_forward(*args, **kwargs)

    monkeypatch.setattr(engine_module, "packed_forward", failing_once)
    decoding = threading.Event()
    running_request = GenerationParams("Once upon a time", 40, SamplingParams(), (), "running")
    long_request = GenerationParams(LONG_PROMPT, 6, SamplingParams(), (), "long")
    later_request = GenerationParams("The sea is calm", 5, SamplingParams(), (), "later")
    with batch_engine(
        engine, max_batch=2, kv_cache_tokens=4096, prefill_chunk_tokens=CHUNK, packed_prefill=True
    ) as batch:

        def on_running_token(event: TokenEvent) -> None:
            if event.index >= 1:
                decoding.set()

        running = batch.submit(
            engine.prepare(running_request), running_request, on_running_token, lambda: False, 0.0
        )
        assert decoding.wait(timeout=120)
        long = batch.submit(engine.prepare(long_request), long_request, lambda _: None, lambda: False, 0.0)
        for ticket in (running, long):
            with pytest.raises(RuntimeError, match="the packed forward failed"):
                ticket.future.result(timeout=120)
        later = batch.submit(engine.prepare(later_request), later_request, lambda _: None, lambda: False, 0.0)
        assert later.future.result(timeout=120).generated_tokens == 5
        occupancy = batch.occupancy()
    assert (occupancy.running, occupancy.prefilling, occupancy.kv_tokens_used, occupancy.kv_bytes) == (
        0,
        0,
        0,
        0,
    )


def test_a_failed_chunk_of_its_own_fails_only_its_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unpacked, a prompt's failed forward ends that request alone; the running row goes on."""
    armed = threading.Event()

    def failing_chunk(
        graph: Any, pool: Any, rows: Any, ids: torch.Tensor, positions: Any, **trim: Any
    ) -> Any:
        if armed.is_set() and int(ids.shape[1]) > 1:
            armed.clear()
            raise RuntimeError("the chunk's forward failed")
        return paged_forward(graph, pool, rows, ids, positions, **trim)

    monkeypatch.setattr(engine_module, "paged_forward", failing_chunk)
    running_request = GenerationParams("Once upon a time", 30, SamplingParams(), (), "running")
    long_request = GenerationParams(LONG_PROMPT, 6, SamplingParams(), (), "long")
    with batch_engine(
        engine, max_batch=2, kv_cache_tokens=4096, prefill_chunk_tokens=CHUNK, packed_prefill=False
    ) as batch:

        def on_running_token(event: TokenEvent) -> None:
            if event.index == 1:
                armed.set()

        running = batch.submit(
            engine.prepare(running_request), running_request, on_running_token, lambda: False, 0.0
        )
        assert armed.wait(timeout=120)  # the next forward of a prompt fails
        long = batch.submit(engine.prepare(long_request), long_request, lambda _: None, lambda: False, 0.0)
        with pytest.raises(RuntimeError, match="the chunk's forward failed"):
            long.future.result(timeout=120)
        outcome = running.future.result(timeout=120)
    assert (outcome.generated_tokens, outcome.finish_reason) == (30, FinishReason.LENGTH)


def test_only_fp32s_native_path_keeps_rows_independent(llama_dir: Path) -> None:
    """Its linears (tierserve's fp32 kernel) give a row the same bits whatever shares the call, so
    an fp32 worker on it packs prompts and still holds its batch to the exact text alone; on
    IPEX's kernels it does not pack."""
    from tierserve.domain.config import TierRecipe
    from tierserve.worker.kernels.linears import tierserve_fp32_kernel
    from tierserve.worker.tiers import TierContext

    if tierserve_fp32_kernel() is None:
        pytest.skip("the fp32 kernel needs AVX-512F, which this CPU lacks")
    native = make_tier("fp32", TierContext(recipe=TierRecipe(kernel="native"))).load(llama_dir, llama_dir)
    ipex = make_tier("fp32", TierContext(recipe=TierRecipe(kernel="ipex"))).load(llama_dir, llama_dir)
    assert native.rows_independent and not ipex.rows_independent
    with started_batching(Engine(native), BatchingConfig(max_batch=4, prefill_chunk_tokens=64)) as (
        batch,
        reason,
    ):
        assert batch is not None and batch.limits.packed_prefill, reason
        assert "a prompt's forwards packed with the running rows' next tokens" in reason
