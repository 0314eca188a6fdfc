"""Continuous batching on tiny random models through the real tier recipes: the batched forward
against transformers, and the engine's per-sequence semantics with requests joining and leaving."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.unit.conftest import alone, batch_engine, started_batching, tierserve_kernel
from tierserve.domain.config import BatchingConfig, parse_config
from tierserve.domain.errors import InvalidRequest
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.accuracy import batched_log_probs, tier_log_probs
from tierserve.worker.batching import startup
from tierserve.worker.batching.admission import PREFILL_SAMPLES
from tierserve.worker.batching.delivery import Delivery, Publisher, StepOutbox, deliver_each
from tierserve.worker.batching.engine import HOLD_REASONS, BatchEngine, Ticket
from tierserve.worker.batching.startup import serves_less_than_configured, start_batching
from tierserve.worker.engine import Engine, FinishReason, TokenEvent
from tierserve.worker.kernels import decode_attention
from tierserve.worker.kernels.paged_kv import BlockPool, PagedRow, cache_shape, paged_forward
from tierserve.worker.tiers.base import LoadedModel, make_tier

PROMPTS = (
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog and then",
    "Hi",
    "A list of colours: red, green,",
    "In the beginning there was nothing but a very long and winding road that led",
    "def main():",
    "Q: what is two plus two? A:",
    "Tea or coffee",
)
NEW_TOKENS = (12, 5, 16, 9, 7, 14, 3, 10)


@pytest.fixture
def batch(engine: Engine) -> Iterator[BatchEngine]:
    with batch_engine(engine, max_batch=8, kv_cache_tokens=4096) as batch:
        yield batch


def params(
    prompt: str, new_tokens: int, sampling: SamplingParams | None = None, stop: tuple[str, ...] = ()
) -> GenerationParams:
    return GenerationParams(prompt, new_tokens, sampling or SamplingParams(), stop, "test")


def submit(
    batch: BatchEngine,
    request: GenerationParams,
    emit: Callable[[TokenEvent], None] = lambda _: None,
    cancelled: Callable[[], bool] = lambda: False,
    deadline: float | None = None,
) -> Ticket:
    prompt = batch.engine.prepare(request)
    return batch.submit(
        prompt, request, emit, cancelled, time.perf_counter() if deadline is None else deadline
    )


# ------------------------------------------------------------------ the batched forward


@pytest.mark.parametrize("kernel", ["tierserve", "ipex"])
def test_batched_decode_logits_match_transformers(family_dir: Path, kernel: str) -> None:
    """Rows of different lengths prefilled alone into one block pool, then decode steps of the
    whole batch: each row's logits equal transformers' eager model on that row's whole sequence,
    also after a row leaves and a new one takes its blocks; with either decode-attention kernel."""
    loaded = make_tier("fp32").load(family_dir, family_dir)
    reference = AutoModelForCausalLM.from_pretrained(family_dir, torch_dtype=torch.float32).eval()
    graph = loaded.model.trace_graph
    sequences = [
        [5, 17, 300, 42],
        [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
        [99, 100],
    ]

    def expected(ids: list[int]) -> torch.Tensor:
        logits: torch.Tensor = reference(torch.tensor([ids])).logits[0, -1]
        return logits

    with torch.inference_mode():
        pool = BlockPool(cache_shape(loaded.model), 12, tierserve_kernel() if kernel == "tierserve" else None)
        assert (pool.decode_kernel is not None) == (kernel == "tierserve")
        rows = [PagedRow() for _ in sequences]
        for row, ids in zip(rows, sequences, strict=True):
            paged_forward(graph, pool, [row], torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))
        for token in (1000, 2000):
            for ids in sequences:
                ids.append(token + len(ids))
            logits = paged_forward(
                graph,
                pool,
                rows,
                torch.tensor([[ids[-1]] for ids in sequences]),
                torch.tensor([[len(ids) - 1] for ids in sequences]),
            )
            assert [row.length for row in rows] == [len(ids) for ids in sequences]
            for index, ids in enumerate(sequences):
                torch.testing.assert_close(logits[index, -1], expected(ids), atol=2e-3, rtol=1e-3)
        # The long row leaves; a newcomer reuses its blocks (lowest first) beside the others.
        freed = sorted(rows[1].blocks)
        pool.release(rows[1])
        newcomer, ids = PagedRow(), [3, 1, 4, 1, 5, 9, 2, 6]
        paged_forward(graph, pool, [newcomer], torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))
        assert newcomer.blocks == freed[: len(newcomer.blocks)]
        rows[1], sequences[1] = newcomer, ids
        for ids in sequences:
            ids.append(777)
        logits = paged_forward(
            graph,
            pool,
            rows,
            torch.tensor([[777]] * 3),
            torch.tensor([[len(ids) - 1] for ids in sequences]),
        )
        for index, ids in enumerate(sequences):
            torch.testing.assert_close(logits[index, -1], expected(ids), atol=2e-3, rtol=1e-3)


def test_a_row_leaving_keeps_the_others_right(family_dir: Path) -> None:
    loaded = make_tier("fp32").load(family_dir, family_dir)
    engine = Engine(loaded)
    requests = [params(p, n) for p, n in zip(PROMPTS[:4], (3, 12, 6, 12), strict=True)]
    expected = [alone(engine, r) for r in requests]
    with batch_engine(engine, max_batch=4, kv_cache_tokens=4096) as batch:
        tickets = [submit(batch, r) for r in requests]
        assert [t.future.result(timeout=120).text for t in tickets] == expected


# ------------------------------------------------------------------ per-sequence semantics


def test_greedy_text_alone_equals_text_in_a_batch_of_8(engine: Engine, batch: BatchEngine) -> None:
    requests = [params(p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
    expected = [alone(engine, r) for r in requests]
    tickets = []
    for request in requests:  # staggered: rows join a batch that is already decoding
        tickets.append(submit(batch, request))
        time.sleep(0.01)
    outcomes = [t.future.result(timeout=120) for t in tickets]
    assert [o.text for o in outcomes] == expected
    for outcome, request in zip(outcomes, requests, strict=True):
        assert outcome.generated_tokens <= request.max_new_tokens
        assert all(latency > 0 for latency in outcome.token_latencies_us)


def test_seeded_request_gives_the_same_text_whatever_shares_its_batch(batch: BatchEngine) -> None:
    seeded = params(PROMPTS[0], 12, SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234))
    on_its_own = submit(batch, seeded).future.result(timeout=120)
    crowd = [
        submit(batch, params(p, 16, SamplingParams(temperature=1.0, seed=i + 1)))
        for i, p in enumerate(PROMPTS[1:6])
    ]
    in_a_crowd = submit(batch, seeded).future.result(timeout=120)
    for ticket in crowd:
        ticket.future.result(timeout=120)
    assert on_its_own.seed == in_a_crowd.seed == 1234
    assert in_a_crowd.text == on_its_own.text
    other_seed = params(PROMPTS[0], 12, SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=99))
    assert submit(batch, other_seed).future.result(timeout=120).text != on_its_own.text


def test_stop_string_ends_one_row_and_not_the_others(engine: Engine, batch: BatchEngine) -> None:
    full = alone(engine, params(PROMPTS[1], 16))
    stop = full[4:7]
    assume_text = full[: full.index(stop)]
    stopped = submit(batch, params(PROMPTS[1], 16, stop=(stop,)))
    neighbour = submit(batch, params(PROMPTS[3], 16))
    outcome = stopped.future.result(timeout=120)
    assert outcome.finish_reason == FinishReason.STOP
    assert outcome.text == assume_text
    assert neighbour.future.result(timeout=120).text == alone(engine, params(PROMPTS[3], 16))


def test_cancelled_row_stops_within_one_step_and_the_rest_go_on(engine: Engine, batch: BatchEngine) -> None:
    cancel = threading.Event()
    made: list[int] = []

    def emit(event: TokenEvent) -> None:
        made.append(event.index)
        if event.index == 2:
            cancel.set()

    cancelled = submit(batch, params(PROMPTS[0], 40), emit=emit, cancelled=cancel.is_set)
    neighbour = submit(batch, params(PROMPTS[4], 20))
    outcome = cancelled.future.result(timeout=120)
    assert outcome.finish_reason == FinishReason.CANCELLED
    assert len(made) <= 4  # the token that set the flag, and at most one step more
    assert neighbour.future.result(timeout=120).text == alone(engine, params(PROMPTS[4], 20))


def test_waiting_requests_are_admitted_earliest_deadline_first(engine: Engine) -> None:
    with batch_engine(engine, max_batch=1, kv_cache_tokens=4096) as batch:
        now = time.perf_counter()
        first = submit(batch, params(PROMPTS[0], 16), deadline=now)
        late = submit(batch, params(PROMPTS[1], 4), deadline=now + 60)
        early = submit(batch, params(PROMPTS[2], 4), deadline=now + 1)
        for ticket in (first, late, early):
            ticket.future.result(timeout=120)
        assert first.sequence.admitted_at < early.sequence.admitted_at < late.sequence.admitted_at


def test_kv_budget_bounds_the_batch_and_refuses_what_can_never_fit(engine: Engine) -> None:
    # Each request spans at most prompt + 24 tokens; a budget of 60 holds one at a time.
    with batch_engine(engine, max_batch=8, kv_cache_tokens=60) as batch:
        with pytest.raises(InvalidRequest, match="KV cache of 60 tokens"):
            submit(batch, params(PROMPTS[4], 60))
        seen_running: list[int] = []
        tickets = [
            submit(batch, params(p, 24), emit=lambda _: seen_running.append(batch.occupancy().running))
            for p in PROMPTS[:3]
        ]
        for ticket in tickets:
            ticket.future.result(timeout=120)
        assert seen_running and max(seen_running) == 1
        occupancy = batch.occupancy()
        assert (occupancy.running, occupancy.waiting, occupancy.kv_tokens_used) == (0, 0, 0)
        held = {reason for reason, count in occupancy.holds.items() if count}
        assert held == {"kv cache full"} and 1 <= occupancy.holds["kv cache full"] <= 2


def test_a_request_joins_only_while_the_step_stays_within_every_per_token_budget(engine: Engine) -> None:
    with batch_engine(engine, max_batch=8, kv_cache_tokens=4096) as batch:
        # Steps as measured: one row 10 ms, two rows 30 ms. Recorded steps only refine these.
        batch.step_times.record(1, 0.010)
        batch.step_times.record(2, 0.030)
        seen_running: list[int] = []

        def emit(event: TokenEvent) -> None:
            seen_running.append(batch.occupancy().running)

        def with_budget(request: GenerationParams, budget_s: float) -> Ticket:
            prompt = batch.engine.prepare(request)
            return batch.submit(prompt, request, emit, lambda: False, time.perf_counter(), budget_s)

        # No budget on the first; the second allows 20 ms per token: no batch of 2 for it.
        first = submit(batch, params(PROMPTS[0], 24), emit=emit)
        first_done: list[float] = []
        first.future.add_done_callback(lambda _: first_done.append(time.perf_counter()))
        tight = with_budget(params(PROMPTS[1], 6), 0.020)
        first.future.result(timeout=120)
        tight.future.result(timeout=120)
        assert seen_running and max(seen_running) == 1
        assert tight.sequence.admitted_at > first_done[0]
        # A budget the two-row step meets lets the next pair share the batch.
        seen_running.clear()
        loose = [with_budget(params(p, 12), 0.050) for p in PROMPTS[2:4]]
        for ticket in loose:
            ticket.future.result(timeout=120)
        assert max(seen_running) == 2


def test_a_newcomer_waits_while_its_prefill_would_break_a_running_budget(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tierserve.worker.batching.engine")
    with batch_engine(engine, max_batch=8, kv_cache_tokens=4096) as batch:
        # Prefills measured at 10 s per prompt token: any newcomer's prefill would cost the running
        # request far more than its 1 s per token allows over its 12 tokens (the tight request's
        # own real prefill, one more sample, leaves the line about where it is).
        for tokens in range(1, PREFILL_SAMPLES):
            batch.prefill_times.record(tokens, 10.0 * tokens)
        seen_running: list[int] = []

        def emit(event: TokenEvent) -> None:
            seen_running.append(batch.occupancy().running)

        request = params(PROMPTS[0], 12)
        tight = batch.submit(
            batch.engine.prepare(request), request, emit, lambda: False, time.perf_counter(), 1.0
        )
        tight_done: list[float] = []
        tight.future.add_done_callback(lambda _: tight_done.append(time.perf_counter()))
        while tight.sequence.made < 1:  # running, its first token out
            time.sleep(0.001)
        newcomer = submit(batch, params(PROMPTS[1], 4), emit=emit)
        tight.future.result(timeout=120)
        newcomer.future.result(timeout=120)
        assert max(seen_running) == 1 and newcomer.sequence.admitted_at >= tight_done[0]
        # Counted once, however many steps it waited, under its reason.
        assert batch.occupancy().holds == {reason: int(reason == HOLD_REASONS[3]) for reason in HOLD_REASONS}
        # And said once, with the request, when it is admitted: a late first token can be explained.
        said = [r.getMessage() for r in caplog.records if "admitted beside" in r.getMessage()]
        assert len(said) == 1 and f"request {newcomer.sequence.params.request_id} " in said[0]
        assert f"held for: {HOLD_REASONS[3]}; step ms by rows: 1: " in said[0]


def test_occupancy_shows_the_running_batch(engine: Engine, batch: BatchEngine) -> None:
    during: list[tuple[int, int]] = []

    def emit(event: TokenEvent) -> None:
        if event.index == 6:
            occupancy = batch.occupancy()
            during.append((occupancy.running, occupancy.kv_tokens_used))

    tickets = [submit(batch, params(p, 10), emit=emit) for p in PROMPTS[:3]]
    for ticket in tickets:
        ticket.future.result(timeout=120)
    assert during and max(running for running, _ in during) >= 2
    assert all(used > 0 for _, used in during)


# ------------------------------------------------------------------ when not to batch


def test_a_model_without_an_ipex_graph_is_served_one_at_a_time_with_a_notice(llama_dir: Path) -> None:
    plain = make_tier("fp32").load(llama_dir, llama_dir)
    eager = LoadedModel(
        model=AutoModelForCausalLM.from_pretrained(llama_dir),
        tokenizer=plain.tokenizer,
        backend="transformers",
        kernel="eager",
        dtype=torch.float32,
        context_tokens=plain.context_tokens,
    )
    batch, reason = start_batching(Engine(eager), BatchingConfig())
    assert batch is None and "no IPEX decoder graph" in reason
    batch, reason = start_batching(Engine(plain), BatchingConfig(enabled=False))
    assert batch is None and "off" in reason


def test_start_batching_checks_the_batched_text_then_serves(llama_dir: Path) -> None:
    with started_batching(
        Engine(make_tier("fp32").load(llama_dir, llama_dir)), BatchingConfig(max_batch=4)
    ) as (batch, reason):
        assert batch is not None, reason
        assert (
            "up to 4 streams" in reason
            and "greedy tokens made in a batch equal to those made alone" in reason
        )
        assert batch.attends_with_tierserve_kernel and "tierserve's kernel" in reason
        assert not serves_less_than_configured(batch, BatchingConfig(max_batch=4))  # no notice


def test_a_paged_path_off_the_one_request_path_is_caught_where_texts_are_not_held_equal(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A quantized tier's batch (and bf16's where it computes in bf16) is held by tokens only to
    # the batch engine serving each prompt alone, so a decode kernel wrong the same way alone and
    # batched passes that; the teacher-forced log-probabilities against `generate` must not.
    engine = Engine(make_tier("fp32").load(llama_dir, llama_dir))
    with started_batching(engine, BatchingConfig(max_batch=4), "int4-woq") as (batch, reason):
        assert batch is not None, reason
        assert "nats per token from its log-probabilities teacher-forced" in reason
    kernel = tierserve_kernel()

    def missing_the_newest_key(
        out: torch.Tensor,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        scale: float,
    ) -> None:
        kernel(out, query, keys, values, tables, (lengths - 1).clamp(min=1), scale)

    monkeypatch.setattr(
        startup, "decode_kernel_for", lambda config, kernel_dir: (missing_the_newest_key, "wrong")
    )
    with started_batching(engine, BatchingConfig(max_batch=4), "int4-woq") as (batch, reason):
        assert batch is None, reason
        assert "the batch's paged attention is" in reason
        assert f"from the one-request path (allowed: {startup.PAGED_MAX_KL})" in reason


def test_a_decode_kernel_that_could_not_be_built_is_a_notice(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unbuilt = decode_attention.Loaded(None, "the build failed: g++ not found")
    monkeypatch.setattr(decode_attention, "load", lambda _: unbuilt)
    config = BatchingConfig(max_batch=2)
    with started_batching(Engine(make_tier("fp32").load(llama_dir, llama_dir)), config) as (batch, reason):
        assert batch is not None, reason
        # It still batches, on IPEX's kernel, and says so where an operator looks (Describe).
        assert not batch.attends_with_tierserve_kernel
        assert (
            "IPEX's paged kernel (tierserve's could not be built: the build failed: g++ not found)" in reason
        )
        assert serves_less_than_configured(batch, config)
        # Asking for IPEX's kernel is no loss.
        assert not serves_less_than_configured(batch, BatchingConfig(max_batch=2, decode_attention="ipex"))


def test_only_the_last_token_says_why_the_sequence_ended(engine: Engine, batch: BatchEngine) -> None:
    for run in ("alone", "batched"):
        events: list[TokenEvent] = []
        request = params(PROMPTS[1], 6)
        if run == "alone":
            outcome = engine.generate(engine.prepare(request), request, emit=events.append)
        else:
            outcome = submit(batch, request, emit=events.append).future.result(timeout=120)
        assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
        assert events[-1].finish_reason == outcome.finish_reason != FinishReason.CANCELLED


def test_a_worker_may_set_its_own_batch_size() -> None:
    config = parse_config(
        {
            "batching": {"max_batch": 8, "kv_cache_tokens": 1024},
            "workers": [{"name": "a", "tier": "fp32"}, {"name": "b", "tier": "bf16", "max_batch": 1}],
        }
    )
    assert [config.batching_for(w).max_batch for w in config.workers] == [8, 1]
    assert config.batching_for(config.workers[1]).kv_cache_tokens == 1024


def test_cards_scored_through_the_batched_path_equal_those_through_generate(llama_dir: Path) -> None:
    """Every chunk a row of one paged batch, teacher-forced: in float32 the same log-probabilities
    as `generate` scoring each chunk alone, chunks of different lengths leaving as they end."""
    loaded = make_tier("fp32").load(llama_dir, llama_dir)
    chunks = [
        [5, 17, 300, 42, 8, 9],
        [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
        [99, 100],
    ]
    batched = batched_log_probs(loaded, chunks)
    for chunk, scored in zip(chunks, batched, strict=True):
        assert scored.shape == (len(chunk) - 1, loaded.model.config.vocab_size)
        torch.testing.assert_close(scored, tier_log_probs(loaded, chunk), atol=2e-4, rtol=1e-4)


class RecordingPublisher(Publisher):
    """Delivers at once, on the model thread, and remembers how many tokens each hand-over had."""

    def __init__(self) -> None:
        self.handovers: list[int] = []

    def __call__(self, deliveries: list[Delivery]) -> None:
        self.handovers.append(len(deliveries))
        deliver_each(deliveries)


def test_a_publisher_gets_a_steps_tokens_together_and_each_requests_tokens_before_its_outcome(
    engine: Engine, batch: BatchEngine
) -> None:
    publisher = RecordingPublisher()
    requests = [params(p, n) for p, n in zip(PROMPTS[:4], NEW_TOKENS[:4], strict=True)]
    received: list[list[TokenEvent]] = [[] for _ in requests]
    at_outcome: list[int] = [-1] * len(requests)
    tickets = []
    for index, request in enumerate(requests):
        ticket = batch.submit(
            batch.engine.prepare(request),
            request,
            received[index].append,
            lambda: False,
            time.perf_counter(),
            publisher=publisher,
        )

        def outcome_set(_: object, index: int = index) -> None:
            at_outcome[index] = len(received[index])

        ticket.future.add_done_callback(outcome_set)
        tickets.append(ticket)
    outcomes = [t.future.result(timeout=120) for t in tickets]
    for outcome, events, seen in zip(outcomes, received, at_outcome, strict=True):
        assert seen == outcome.generated_tokens == len(events)
        assert [e.index for e in events] == list(range(outcome.generated_tokens))
        assert "".join(e.text for e in events) == outcome.text
    assert [o.text for o in outcomes] == [submit(batch, r).future.result(timeout=120).text for r in requests]
    assert sum(publisher.handovers) == sum(o.generated_tokens for o in outcomes)
    assert max(publisher.handovers) > 1  # rows decoding together hand their tokens over together


def test_each_forwards_tokens_are_handed_over_before_the_next_forward(
    engine: Engine, batch: BatchEngine
) -> None:
    """A request alone: its prefill's first token goes out before the decode step that follows
    the prefill in the same loop iteration (else its TTFT would include a step)."""
    publisher = RecordingPublisher()
    request = params(PROMPTS[1], 6)
    outcome = batch.submit(
        batch.engine.prepare(request),
        request,
        lambda _: None,
        lambda: False,
        time.perf_counter(),
        publisher=publisher,
    ).future.result(timeout=120)
    assert publisher.handovers == [1] * outcome.generated_tokens


def test_the_outbox_holds_tokens_until_flushed_and_keeps_their_order_per_publisher() -> None:
    first, second = RecordingPublisher(), RecordingPublisher()
    outbox = StepOutbox()
    got: list[tuple[str, int]] = []
    to_a = outbox.sender(first, lambda e: got.append(("a", e.index)))
    to_b = outbox.sender(second, lambda e: got.append(("b", e.index)))
    to_c = outbox.sender(first, lambda e: got.append(("c", e.index)))
    for index in range(2):
        for send in (to_a, to_b, to_c):
            send(TokenEvent(text="x", token_id=1, index=index, latency_us=1))
    assert got == []
    outbox.flush()
    assert got == [("a", 0), ("c", 0), ("a", 1), ("c", 1), ("b", 0), ("b", 1)]
    assert (first.handovers, second.handovers) == ([4], [2])
    outbox.flush()
    assert (first.handovers, second.handovers) == ([4], [2])
