"""Chunked prefill on tiny random models through the real tier recipes: a chunk over an existing
paged cache gives transformers' logits, IPEX's attention op is replaced only for the forward's
length and only in its thread, and the batch engine prefills a long prompt a chunk per step with
the running streams' decode steps between its chunks."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from tests.unit.conftest import alone, batch_engine, computes_in_float32, started_batching
from tierserve.domain.config import BatchingConfig
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.batching import engine as engine_module
from tierserve.worker.batching import startup
from tierserve.worker.batching.engine import BatchEngine, Ticket
from tierserve.worker.batching.startup import start_batching
from tierserve.worker.engine import Engine, FinishReason, TokenEvent
from tierserve.worker.kernels import chunked_prefill, paged_kv
from tierserve.worker.kernels.paged_kv import (
    BlockPool,
    OutOfBlocks,
    PagedRow,
    cache_shape,
    empty_past,
    packed_forward,
    paged_forward,
)
from tierserve.worker.tiers.base import make_tier

CHUNK = 16
# About 90 tokens: six chunks of 16 (the tiny models' context is 128 tokens).
LONG_PROMPT = "Count along: " + ", ".join(f"item {i}" for i in range(18))
RUNNING_PROMPT = "Once upon a time"


@pytest.fixture
def batch(engine: Engine) -> Iterator[BatchEngine]:
    with batch_engine(engine, max_batch=4, kv_cache_tokens=4096, prefill_chunk_tokens=CHUNK) as batch:
        yield batch


def over_a_cache(rows: Any, ids: torch.Tensor) -> bool:
    """Whether a forward is a prompt chunk after the first (several tokens over a cache)."""
    return int(ids.shape[1]) > 1 and rows[0].length > 0


@pytest.fixture
def chunk_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The token count of every chunk the engine runs over an existing cache."""
    calls: list[int] = []

    def counted(
        graph: Any, pool: BlockPool, rows: Any, ids: torch.Tensor, positions: torch.Tensor, **trim: Any
    ) -> torch.Tensor:
        if over_a_cache(rows, ids):
            calls.append(int(ids.shape[1]))
        return paged_forward(graph, pool, rows, ids, positions, **trim)

    def counted_packed(
        graph: Any, pool: BlockPool, chunk_row: PagedRow, chunk_ids: torch.Tensor, *rest: Any, **trim: Any
    ) -> torch.Tensor:
        if chunk_row.length > 0:
            calls.append(int(chunk_ids.shape[1]))
        return packed_forward(graph, pool, chunk_row, chunk_ids, *rest, **trim)

    monkeypatch.setattr(engine_module, "paged_forward", counted)
    monkeypatch.setattr(engine_module, "packed_forward", counted_packed)
    return calls


def params(prompt: str, new_tokens: int) -> GenerationParams:
    return GenerationParams(prompt, new_tokens, SamplingParams(), (), "test")


def submit(
    batch: BatchEngine,
    request: GenerationParams,
    emit: Callable[[TokenEvent], None] = lambda _: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> Ticket:
    return batch.submit(batch.engine.prepare(request), request, emit, cancelled, time.perf_counter())


def chunking_check(engine: Engine, prompt: str, split: int) -> chunked_prefill.ChunkingError:
    ids = engine.prepare(params(prompt, 1)).input_ids
    with torch.inference_mode(), engine.loaded.run_context():
        return chunked_prefill.chunking_error(engine.loaded.model, ids, split)


def prompt_tokens(engine: Engine, prompt: str) -> int:
    return engine.prepare(params(prompt, 1)).prompt_tokens


Emit = Callable[[TokenEvent], None]


class Timeline:
    """Who emitted what, in the engine thread's order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def emitter(self, name: str, then: Emit = lambda _: None) -> Emit:
        def emit(event: TokenEvent) -> None:
            self.events.append((name, event.index))
            then(event)

        return emit

    def before_first_of(self, name: str, other: str) -> int:
        """Tokens `other` emitted before `name`'s first one."""
        first = self.events.index((name, 0))
        return sum(1 for who, _ in self.events[:first] if who == other)


def wait_for_tokens(timeline: Timeline, name: str, count: int) -> None:
    deadline = time.monotonic() + 120
    while sum(1 for who, _ in timeline.events if who == name) < count:
        assert time.monotonic() < deadline, f"{name} made fewer than {count} tokens"
        time.sleep(0.005)


# ------------------------------------------------------------------ a chunk over a cache


def test_chunks_over_a_cache_give_the_whole_prompts_logits(family_dir: Path) -> None:
    """A prompt prefilled 16 tokens per forward over the paged cache of those before: every
    position's logits equal transformers' on the whole prompt; afterwards IPEX's own attention is
    back (a plain prefill through the graph gives them too)."""
    loaded = make_tier("fp32").load(family_dir, family_dir)
    reference = AutoModelForCausalLM.from_pretrained(family_dir, torch_dtype=torch.float32).eval()
    model = loaded.model
    ids = torch.randint(0, 1000, (1, 45), generator=torch.Generator().manual_seed(3))
    chunk = 16
    with torch.inference_mode():
        expected = reference(ids).logits[0]
        pool, row = BlockPool(cache_shape(model), 4), PagedRow()
        logits = [
            paged_forward(
                model.trace_graph,
                pool,
                [row],
                ids[:, start : start + chunk],
                torch.arange(start, min(start + chunk, 45)).unsqueeze(0),
            )[0]
            for start in range(0, 45, chunk)
        ]
        assert row.length == 45 and len(row.blocks) == 3
        plain = model.trace_graph(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=empty_past(int(model.config.num_hidden_layers), 1),
            position_ids=torch.arange(45).unsqueeze(0),
        )[0][0]
    torch.testing.assert_close(torch.cat(logits), expected, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(plain, expected, atol=2e-3, rtol=1e-3)


def test_ipexs_attention_op_is_its_own_again_after_a_failed_paged_forward(llama_dir: Path) -> None:
    model = make_tier("fp32").load(llama_dir, llama_dir).model
    with torch.inference_mode():
        pool = BlockPool(cache_shape(model), 2)

        def failing(**inputs: Any) -> Any:
            raise RuntimeError("the forward failed")

        with pytest.raises(RuntimeError, match="the forward failed"):
            paged_forward(
                failing, pool, [PagedRow()], torch.tensor([[1, 2, 3]]), torch.arange(3).unsqueeze(0)
            )
        # IPEX's kernel is back: a prefill through the graph hands back IPEX's own cache.
        assert cache_shape(model).layers == int(model.config.num_hidden_layers)
    assert paged_kv._current is None


def test_another_threads_attention_call_during_a_paged_step_is_refused(llama_dir: Path) -> None:
    """Only the forward that replaced IPEX's attention may use the replacement: any other
    thread's call fails loudly instead of attending over the batch's cache."""
    model = make_tier("fp32").load(llama_dir, llama_dir).model
    errors: list[BaseException] = []

    def graph(**inputs: Any) -> Any:
        def other() -> None:
            tensor = torch.zeros(1, 1, 2, 4)
            try:
                paged_kv._paged_attention(
                    tensor, tensor, tensor, tensor, tensor, tensor, tensor, 2.0, 8, None, None
                )
            except RuntimeError as error:
                errors.append(error)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        return (torch.zeros(1, 1, 4),)

    with torch.inference_mode():
        pool = BlockPool(cache_shape(model), 2)
        paged_forward(graph, pool, [PagedRow()], torch.tensor([[1]]), torch.tensor([[0]]))
    assert len(errors) == 1 and "outside the paged step" in str(errors[0])


def test_the_pool_hands_out_the_lowest_free_blocks_and_refuses_past_its_size() -> None:
    pool = BlockPool(paged_kv.CacheShape(layers=2, kv_heads=1, head_dim=4, dtype=torch.float32), 4)
    first, second = PagedRow(), PagedRow()
    pool.grow(first, 17)  # two blocks of 16
    pool.grow(second, 16)
    assert (first.blocks, second.blocks, pool.free_blocks) == ([0, 1], [2], 1)
    pool.release(first)
    assert (first.blocks, first.length, pool.used_blocks) == ([], 0, 1)
    pool.grow(second, 33)
    assert second.blocks == [2, 0, 1]
    with pytest.raises(OutOfBlocks):
        pool.grow(PagedRow(), 40)
    assert pool.block_bytes() == 2 * 2 * 1 * 16 * 4 * 4


def test_the_chunking_tolerance_is_float32s_or_a_few_units_in_the_last_place_of_lower_precisions() -> None:
    logits = torch.tensor([-29.0, 3.0, 12.5])
    assert chunked_prefill.chunking_tolerance(logits) == chunked_prefill.FLOAT32_CHUNKING_TOLERANCE
    # bf16 keeps 8 significant bits: a unit in the last place at 29 is 0.125, at most 2**-7 * 29.
    bf16 = chunked_prefill.chunking_tolerance(logits.bfloat16())
    assert bf16 == pytest.approx(4 * 2**-7 * 29)
    # Zen 4's measured bf16 rounding difference (0.375) passes, a broken chunk's whole units do not.
    assert chunked_prefill.ChunkingError(0.375, bf16).acceptable
    assert not chunked_prefill.ChunkingError(1.5, bf16).acceptable
    assert not chunked_prefill.ChunkingError(float("nan"), bf16).acceptable
    # Small logits never allow less than float32 does.
    assert chunked_prefill.chunking_tolerance(torch.tensor([0.01]).bfloat16()) == 0.01


# ------------------------------------------------------------------ scheduling


def test_a_long_prompt_is_prefilled_a_chunk_per_step_between_decode_steps(
    engine: Engine, batch: BatchEngine, chunk_calls: list[int]
) -> None:
    long_request, running_request = params(LONG_PROMPT, 8), params(RUNNING_PROMPT, 60)
    chunks = math.ceil(prompt_tokens(engine, LONG_PROMPT) / CHUNK)
    assert chunks >= 4
    timeline = Timeline()
    running = submit(batch, running_request, timeline.emitter("running"))
    wait_for_tokens(timeline, "running", 3)
    before = sum(1 for who, _ in timeline.events if who == "running")
    long = submit(batch, long_request, timeline.emitter("long"))
    long_outcome = long.future.result(timeout=120)
    running_outcome = running.future.result(timeout=120)

    # The first chunk on its own, the others over its cache, at most CHUNK tokens each.
    assert len(chunk_calls) == chunks - 1 and max(chunk_calls) <= CHUNK
    # One decode step of the running stream after each chunk but the last (which makes the
    # long prompt's first token), none skipped: at least chunks - 1 tokens in between.
    assert timeline.before_first_of("long", "running") - before >= chunks - 1
    if computes_in_float32(engine):
        assert long_outcome.text == alone(engine, long_request)
    else:
        # In bf16 a chunked prefill rounds differently from one forward, and a random model's
        # near-tied logits turn that into other tokens; its logits must be as close as bf16 allows.
        assert chunking_check(engine, LONG_PROMPT, CHUNK).acceptable
    assert running_outcome.text == alone(engine, running_request)
    assert running_outcome.finish_reason == FinishReason.LENGTH


def test_prompts_within_one_chunk_and_without_chunking_take_one_forward(
    engine: Engine, chunk_calls: list[int]
) -> None:
    with batch_engine(engine, max_batch=2, kv_cache_tokens=4096, prefill_chunk_tokens=None) as whole:
        assert not whole.chunked_prefill
        request = params(LONG_PROMPT, 6)
        assert submit(whole, request).future.result(timeout=120).text == alone(engine, request)
    with batch_engine(engine, max_batch=2, kv_cache_tokens=4096, prefill_chunk_tokens=128) as wide:
        submit(wide, params(LONG_PROMPT, 6)).future.result(timeout=120)
    assert chunk_calls == []


def test_a_request_cancelled_while_prefilling_leaves_at_the_next_step(
    engine: Engine, batch: BatchEngine, chunk_calls: list[int]
) -> None:
    cancel = threading.Event()

    def cancel_once_prefilling(event: TokenEvent) -> None:
        if batch.occupancy().prefilling and chunk_calls:
            cancel.set()  # in the decode step after the long prompt's second chunk

    timeline = Timeline()
    running_request = params(RUNNING_PROMPT, 40)
    running = submit(batch, running_request, timeline.emitter("running", cancel_once_prefilling))
    wait_for_tokens(timeline, "running", 2)
    long = submit(batch, params(LONG_PROMPT, 8), timeline.emitter("long"), cancelled=cancel.is_set)
    outcome = long.future.result(timeout=120)
    assert outcome.finish_reason == FinishReason.CANCELLED
    assert outcome.generated_tokens == 0
    assert len(chunk_calls) == 1  # no chunk after the one during which it was cancelled
    assert running.future.result(timeout=120).text == alone(engine, running_request)
    occupancy = batch.occupancy()
    assert (occupancy.running, occupancy.prefilling, occupancy.kv_tokens_used) == (0, 0, 0)


def test_the_prefilling_request_holds_a_slot_and_its_cache_counts(engine: Engine, batch: BatchEngine) -> None:
    """While it prefills, the long request counts as running and its cache so far as used; a
    request arriving meanwhile waits until it has joined (one prompt prefills at a time)."""
    long_tokens = prompt_tokens(engine, LONG_PROMPT)
    seen: list[tuple[int, int, int, int]] = []
    short: list[Ticket] = []
    timeline = Timeline()

    long_sent, long_started = threading.Event(), threading.Event()

    def look(event: TokenEvent) -> None:
        occupancy = batch.occupancy()
        if not long_sent.is_set() or long_started.is_set() or not occupancy.prefilling:
            return
        seen.append(
            (occupancy.running, occupancy.prefill_tokens_left, occupancy.kv_tokens_used, occupancy.waiting)
        )
        if not short:  # arrives during the long prompt's prefill (this runs in the engine's thread)
            short.append(submit(batch, params("Hi", 4), timeline.emitter("short")))

    running = submit(batch, params(RUNNING_PROMPT, 60), timeline.emitter("running", look))
    wait_for_tokens(timeline, "running", 2)
    long_sent.set()
    long = submit(batch, params(LONG_PROMPT, 8), timeline.emitter("long", lambda _: long_started.set()))
    for ticket in (long, running):
        ticket.future.result(timeout=120)
    assert short, "no decode step happened while the long prompt prefilled"
    short[0].future.result(timeout=120)

    # Packed, the running stream makes a token in every chunk's forward, the last included (its
    # token comes before the long prompt's first); else in a decode step after each chunk but the
    # last.
    lefts = [left for _, left, _, _ in seen]
    chunks = math.ceil(long_tokens / CHUNK)
    assert len(seen) == (chunks if batch.limits.packed_prefill else chunks - 1)
    assert lefts == [max(0, long_tokens - CHUNK * step) for step in range(1, len(seen) + 1)]
    for running_count, left, used, _ in seen:
        assert running_count == 2
        assert used >= long_tokens - left  # the prefilled positions are in the figure
    assert [waiting for _, _, _, waiting in seen[1:]] == [1] * (len(seen) - 1)
    assert timeline.events.index(("long", 0)) < timeline.events.index(("short", 0))


# ------------------------------------------------------------------ start-up and config


def test_start_up_checks_chunked_prefill_and_falls_back_with_a_notice(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(make_tier("fp32").load(llama_dir, llama_dir))
    with started_batching(engine, BatchingConfig(max_batch=4, prefill_chunk_tokens=64)) as (batch, reason):
        assert batch is not None and batch.chunked_prefill, reason
        assert "prefilled 64 tokens per step" in reason and "after a prefill in 2 chunks" in reason

    def wrong(
        graph: Any, pool: BlockPool, rows: Any, ids: torch.Tensor, positions: torch.Tensor, **trim: Any
    ) -> torch.Tensor:
        chunk = over_a_cache(rows, ids)
        logits = paged_forward(graph, pool, rows, ids, positions, **trim)
        return -logits if chunk else logits  # a wrong chunk: the check must catch it

    monkeypatch.setattr(engine_module, "paged_forward", wrong)
    with started_batching(engine, BatchingConfig(max_batch=4, prefill_chunk_tokens=256)) as (batch, reason):
        assert batch is not None and not batch.chunked_prefill, reason
        assert "chunked prefill unavailable" in reason and "one forward" in reason
        request = params(LONG_PROMPT, 6)
        assert submit(batch, request).future.result(timeout=120).text == alone(engine, request)


def test_chunk_logits_off_the_whole_prompts_turn_chunking_off(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(make_tier("fp32").load(llama_dir, llama_dir))
    request = params(LONG_PROMPT, 4)
    with torch.inference_mode():
        exact = chunked_prefill.chunking_error(engine.loaded.model, engine.prepare(request).input_ids, 40)
    assert exact.difference < 1e-3 and exact.tolerance == chunked_prefill.FLOAT32_CHUNKING_TOLERANCE
    assert exact.acceptable
    off = chunked_prefill.ChunkingError(0.5, 0.01)
    monkeypatch.setattr(startup, "chunking_error", lambda model, ids, split: off)
    with started_batching(engine, BatchingConfig(max_batch=2, prefill_chunk_tokens=256)) as (batch, reason):
        assert batch is not None and not batch.chunked_prefill
        assert (
            "chunked prefill unavailable: its logits differ from a prefill in one forward by up to 0.5 "
            "(allowed: 0.01)" in reason
        )


def test_the_chunk_size_is_configured_and_bounded(llama_dir: Path) -> None:
    # On by default (256 tokens); 0 turns it off: no check, no notice.
    assert BatchingConfig().prefill_chunk_tokens == 256
    off = BatchingConfig(prefill_chunk_tokens=0)
    assert off.prefill_chunk_tokens is None
    with started_batching(Engine(make_tier("fp32").load(llama_dir, llama_dir)), off) as (batch, reason):
        assert batch is not None and not batch.chunked_prefill
        assert "prefill_chunk_tokens unset" in reason and "unavailable" not in reason
    assert BatchingConfig(prefill_chunk_tokens=512).prefill_chunk_tokens == 512
    with pytest.raises(ValidationError):
        BatchingConfig(prefill_chunk_tokens=8)


def test_a_model_with_a_sliding_window_is_served_one_at_a_time(llama_dir: Path) -> None:
    def config(**fields: Any) -> Any:
        return SimpleNamespace(**fields)

    assert paged_kv.attends_in_full(config())
    assert not paged_kv.attends_in_full(config(sliding_window=4096))
    assert paged_kv.attends_in_full(config(sliding_window=4096, use_sliding_window=False))
    engine = Engine(make_tier("fp32").load(llama_dir, llama_dir))
    engine.loaded.model.config.sliding_window = 64
    try:
        batch, reason = start_batching(engine, BatchingConfig(max_batch=2))
    finally:
        engine.loaded.model.config.sliding_window = None
    assert batch is None and "sliding window" in reason


@pytest.mark.parametrize(
    ("tier", "error", "chunks"),
    [
        ("fp32", chunked_prefill.ChunkingError(0.5, 0.01, kl=0.001), False),
        ("int8-sq", chunked_prefill.ChunkingError(0.5, 0.01, kl=0.001), True),
        ("int8-sq", chunked_prefill.ChunkingError(0.005, 0.01, kl=0.2), False),
        ("int8-sq", chunked_prefill.ChunkingError(0.5, 0.01, kl=float("nan")), False),
    ],
)
def test_a_quantized_tiers_chunks_are_held_to_the_divergence_others_to_their_logits_precision(
    llama_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tier: str,
    error: chunked_prefill.ChunkingError,
    chunks: bool,
) -> None:
    """int8 rounding moves a quantized tier's logits by most of a unit where a chunk's attention
    differs by 1e-7 from one forward's; fp32's must stay within 0.01. (The fp32 model stands in for
    the quantized tier's check: only the tier name decides which rule applies.)"""
    engine = Engine(make_tier("fp32").load(llama_dir, llama_dir))
    monkeypatch.setattr(startup, "chunking_error", lambda model, ids, split: error)
    config = BatchingConfig(max_batch=2, prefill_chunk_tokens=256)
    batch, reason = start_batching(engine, config, tier=tier, in_own_thread=False)
    assert batch is not None, reason
    try:
        assert batch.chunked_prefill == chunks, reason
        if not chunks and tier == "int8-sq":
            assert "nats (KL divergence) from a prefill in one forward's (allowed: 0.05)" in reason
    finally:
        batch.stop()
