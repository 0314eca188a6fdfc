"""Chunked prefill on tiny random models through the real tier recipes: a chunk over an existing
cache gives transformers' logits, and the batch engine prefills a long prompt a chunk per step
with the running streams' decode steps between its chunks."""

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

from tierserve.domain.config import BatchingConfig
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.batching import engine as engine_module
from tierserve.worker.batching import startup
from tierserve.worker.batching.engine import BatchEngine, BatchLimits, Ticket
from tierserve.worker.batching.startup import start_batching
from tierserve.worker.engine import Engine, FinishReason, TokenEvent
from tierserve.worker.kernels import chunked_prefill, ipex_internals
from tierserve.worker.kernels.iakv_cache import BatchKvCache, empty_past, layer_caches
from tierserve.worker.tiers.base import make_tier

CHUNK = 16
# About 90 tokens: six chunks of 16 (the tiny models' context is 128 tokens).
LONG_PROMPT = "Count along: " + ", ".join(f"item {i}" for i in range(18))
RUNNING_PROMPT = "Once upon a time"


@pytest.fixture
def batch(engine: Engine) -> Iterator[BatchEngine]:
    batch = BatchEngine(engine, BatchLimits(max_batch=4, kv_cache_tokens=4096, prefill_chunk_tokens=CHUNK))
    yield batch
    batch.stop()


@pytest.fixture
def chunk_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The token count of every chunk the engine runs over an existing cache."""
    calls: list[int] = []
    real = chunked_prefill.continue_prefill

    def counted(model: Any, ids: torch.Tensor, past: Any, start: int) -> tuple[torch.Tensor, Any]:
        calls.append(int(ids.shape[1]))
        return real(model, ids, past, start)

    monkeypatch.setattr(engine_module, "continue_prefill", counted)
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


def alone(engine: Engine, request: GenerationParams) -> str:
    return engine.generate(engine.prepare(request), request, emit=lambda _: None).text


def computes_in_float32(engine: Engine) -> bool:
    """False for a bf16 tier on the "ipex" path (bf16 weights and compute); the "native" path
    of CPUs without bf16 kernels computes in float32."""
    return bool(engine.loaded.model.dtype == torch.float32)


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
    """The first chunk through the traced graph, the rest through `continue_prefill`: every
    position's logits equal transformers' on the whole prompt, and the decoder's own mask
    preparation is back afterwards."""
    loaded = make_tier("fp32").load(family_dir, family_dir)
    reference = AutoModelForCausalLM.from_pretrained(family_dir, torch_dtype=torch.float32).eval()
    model = loaded.model
    decoder = model.get_decoder()
    own_hook = vars(decoder).get("_prepare_decoder_attention_mask")
    ids = torch.randint(0, 1000, (1, 45), generator=torch.Generator().manual_seed(3))
    chunk = 16
    with torch.inference_mode():
        expected = reference(ids).logits[0]
        first = ids[:, :chunk]
        out = model.trace_graph(
            input_ids=first,
            attention_mask=torch.ones_like(first),
            past_key_values=empty_past(int(model.config.num_hidden_layers), 1),
            position_ids=torch.arange(chunk).unsqueeze(0),
        )
        logits = [out[0][0]]
        cache = BatchKvCache.of_sequence(layer_caches(out[1]), chunk)
        for start in range(chunk, ids.shape[1], chunk):
            part = ids[:, start : start + chunk]
            chunk_logits, past = chunked_prefill.continue_prefill(model, part, cache.past_key_values(), start)
            logits.append(chunk_logits[0])
            cache = BatchKvCache.of_sequence(layer_caches(past), start + int(part.shape[1]))
    torch.testing.assert_close(torch.cat(logits), expected, atol=2e-3, rtol=1e-3)
    assert vars(decoder).get("_prepare_decoder_attention_mask") is own_hook


def test_the_mask_stand_in_does_not_outlive_a_failed_chunk(llama_dir: Path) -> None:
    model = make_tier("fp32").load(llama_dir, llama_dir).model
    decoder = model.get_decoder()
    own_hook = vars(decoder).get("_prepare_decoder_attention_mask")

    class Failing:
        def get_decoder(self) -> Any:
            return decoder

        def get_input_embeddings(self) -> Any:
            return model.get_input_embeddings()

        def __call__(self, **inputs: Any) -> Any:
            assert vars(decoder)["_prepare_decoder_attention_mask"] is not own_hook  # the stand-in
            raise RuntimeError("the forward failed")

    with pytest.raises(RuntimeError, match="the forward failed"):
        chunked_prefill.continue_prefill(Failing(), torch.tensor([[1, 2, 3]]), (), 4)
    assert vars(decoder).get("_prepare_decoder_attention_mask") is own_hook


def test_the_mask_stand_in_gives_other_threads_the_decoders_own_preparation() -> None:
    calls: list[str] = []

    class Decoder:
        def _prepare_decoder_attention_mask(self, mask: Any, *args: Any, **options: Any) -> Any:
            calls.append("own")
            return mask + 1

    decoder = Decoder()

    class Model:
        def get_decoder(self) -> Any:
            return decoder

        def get_input_embeddings(self) -> Any:
            return torch.nn.Embedding(4, 2)

        def __call__(self, **inputs: Any) -> Any:
            hook = decoder._prepare_decoder_attention_mask
            mine = hook(torch.zeros(1), None, None, 0)
            theirs: list[Any] = []
            other = threading.Thread(target=lambda: theirs.append(hook(torch.zeros(1), None, None, 0)))
            other.start()
            other.join()
            return mine, theirs[0]

    mine, theirs = chunked_prefill.continue_prefill(Model(), torch.tensor([[1, 2]]), (), 3)
    assert float(mine) == 0.0  # the chunking thread: the mask as given
    assert float(theirs) == 1.0 and calls == ["own"]  # any other thread: the decoder's own
    assert "_prepare_decoder_attention_mask" not in vars(decoder)


def test_the_chunk_attention_equals_ipexs_kernel_and_is_only_the_chunking_threads() -> None:
    """`_chunk_attention` (one attention of the chunk over its cache) gives what IPEX's own kernel
    gives for a multi-token query over a cache, grouped-query heads included; inside
    `continue_prefill` another thread's attention call still reaches IPEX's kernel, and the
    class's forward is IPEX's again afterwards."""
    attention_class = ipex_internals.indirect_kv_attention_class()
    own_forward = attention_class.forward
    heads, kv_heads, head_dim, start, new = 4, 2, 8, 20, 7
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(1, new, heads, head_dim, generator=generator)
    key = torch.randn(1, new, kv_heads, head_dim, generator=generator)
    value = torch.randn(1, new, kv_heads, head_dim, generator=generator)
    cached = [torch.randn(start, 1, kv_heads, head_dim, generator=generator) for _ in range(2)]
    cache = BatchKvCache(layers=[(cached[0], cached[1])], length=start, padding=[0])
    mask = torch.zeros(1, 1, new, start + new)
    module = attention_class(text_max_length=2048)

    def past() -> Any:
        return cache.past_key_values()[0]

    scale = math.sqrt(head_dim)
    expected, _, expected_present = module(query, key, value, scale, past(), None, mask)
    ours, _, present = chunked_prefill._chunk_attention(query, key, value, scale, past())
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    end = start + new
    torch.testing.assert_close(present[1][:end], expected_present[1][:end])
    torch.testing.assert_close(present[2][:end], expected_present[2][:end])
    assert present[0].size(-2) == end

    seen: dict[str, Any] = {}

    class Model:
        def get_decoder(self) -> Any:
            return SimpleNamespace()

        def get_input_embeddings(self) -> Any:
            return torch.nn.Embedding(4, 2)

        def __call__(self, **inputs: Any) -> Any:
            seen["mine"] = module(query, key, value, scale, past(), None, mask)
            other = threading.Thread(
                target=lambda: seen.update(theirs=module(query, key, value, scale, past(), None, mask))
            )
            other.start()
            other.join()
            return None, None

    chunked_prefill.continue_prefill(Model(), torch.tensor([[1, 2]]), (), start)
    # Told apart by the offset tensor: IPEX's kernel returns it [1, end, end, 1], ours [1, 0, end, 1].
    torch.testing.assert_close(seen["mine"][0], expected, atol=1e-5, rtol=1e-5)
    assert tuple(seen["mine"][2][0].shape) == (1, 0, end, 1)
    assert tuple(seen["theirs"][2][0].shape) == (1, end, end, 1)
    assert attention_class.forward is own_forward


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

    # The first chunk through the graph, the others over its cache, at most CHUNK tokens each.
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
    whole = BatchEngine(engine, BatchLimits(max_batch=2, kv_cache_tokens=4096, prefill_chunk_tokens=None))
    try:
        assert not whole.chunked_prefill
        request = params(LONG_PROMPT, 6)
        assert submit(whole, request).future.result(timeout=120).text == alone(engine, request)
    finally:
        whole.stop()
    wide = BatchEngine(engine, BatchLimits(max_batch=2, kv_cache_tokens=4096, prefill_chunk_tokens=128))
    try:
        submit(wide, params(LONG_PROMPT, 6)).future.result(timeout=120)
    finally:
        wide.stop()
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

    long_sent = threading.Event()

    def look(event: TokenEvent) -> None:
        occupancy = batch.occupancy()
        if not long_sent.is_set() or not occupancy.prefilling:
            return
        seen.append(
            (occupancy.running, occupancy.prefill_tokens_left, occupancy.kv_tokens_used, occupancy.waiting)
        )
        if not short:  # arrives during the long prompt's prefill (this runs in the engine's thread)
            short.append(submit(batch, params("Hi", 4), timeline.emitter("short")))

    running = submit(batch, params(RUNNING_PROMPT, 60), timeline.emitter("running", look))
    wait_for_tokens(timeline, "running", 2)
    long_sent.set()
    long = submit(batch, params(LONG_PROMPT, 8), timeline.emitter("long"))
    for ticket in (long, running):
        ticket.future.result(timeout=120)
    assert short, "no decode step happened while the long prompt prefilled"
    short[0].future.result(timeout=120)

    lefts = [left for _, left, _, _ in seen]
    assert len(seen) == math.ceil(long_tokens / CHUNK) - 1
    assert lefts == [long_tokens - CHUNK * step for step in range(1, len(seen) + 1)]
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
    batch, reason = start_batching(engine, BatchingConfig(max_batch=4, prefill_chunk_tokens=64))
    try:
        assert batch is not None and batch.chunked_prefill, reason
        assert "prefilled 64 tokens per step" in reason and "after a prefill in 2 chunks" in reason
    finally:
        if batch is not None:
            batch.stop()

    def wrong(model: Any, ids: torch.Tensor, past: Any, start: int) -> tuple[torch.Tensor, Any]:
        logits, past = chunked_prefill.continue_prefill(model, ids, past, start)
        return -logits, past  # a wrong chunk: the check must catch it

    monkeypatch.setattr(engine_module, "continue_prefill", wrong)
    batch, reason = start_batching(engine, BatchingConfig(max_batch=4, prefill_chunk_tokens=256))
    try:
        assert batch is not None and not batch.chunked_prefill, reason
        assert "chunked prefill unavailable" in reason and "one forward" in reason
        request = params(LONG_PROMPT, 6)
        assert submit(batch, request).future.result(timeout=120).text == alone(engine, request)
    finally:
        if batch is not None:
            batch.stop()


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
    batch, reason = start_batching(engine, BatchingConfig(max_batch=2, prefill_chunk_tokens=256))
    try:
        assert batch is not None and not batch.chunked_prefill
        assert (
            "chunked prefill unavailable: its logits differ from a prefill in one forward by up to 0.5 "
            "(allowed: 0.01)" in reason
        )
    finally:
        if batch is not None:
            batch.stop()


def test_the_chunk_size_is_configured_and_bounded(llama_dir: Path) -> None:
    # On by default (256 tokens); 0 turns it off: no check, no notice.
    assert BatchingConfig().prefill_chunk_tokens == 256
    off = BatchingConfig(prefill_chunk_tokens=0)
    assert off.prefill_chunk_tokens is None
    batch, reason = start_batching(Engine(make_tier("fp32").load(llama_dir, llama_dir)), off)
    try:
        assert batch is not None and not batch.chunked_prefill
        assert "prefill_chunk_tokens unset" in reason and "unavailable" not in reason
    finally:
        if batch is not None:
            batch.stop()
    assert BatchingConfig(prefill_chunk_tokens=512).prefill_chunk_tokens == 512
    with pytest.raises(ValidationError):
        BatchingConfig(prefill_chunk_tokens=8)


def test_prompts_past_a_sliding_window_are_not_chunked() -> None:
    def model(**config: Any) -> Any:
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert chunked_prefill.chunkable(model(), 5000)
    assert chunked_prefill.chunkable(model(sliding_window=4096), 4096)
    assert not chunked_prefill.chunkable(model(sliding_window=4096), 4097)
    assert chunked_prefill.chunkable(model(sliding_window=4096, use_sliding_window=False), 5000)
