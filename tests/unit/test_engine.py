"""The generation loop on a tiny random model through the real tier recipes (fp32, bf16).

The model is random, so the text is gibberish; these tests check the contract around
it: one timed event per token, reproducible seeds, stop strings, cancellation and the
context window. A scripted stand-in model drives the same loop with chosen token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_model import TINY_CONTEXT_TOKENS, build_tiny_model_dir
from tierserve.domain.errors import InvalidRequest
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.engine import Engine, FinishReason, GenerationOutcome, TokenEvent
from tierserve.worker.textstream import REPLACEMENT_CHAR
from tierserve.worker.tiers import LoadedModel, make_tier

TIERS = ("fp32", "bf16")
PROMPT = "Once upon a time, in a small village,"
GREEDY = SamplingParams()
N_TOKENS = 12


@dataclass
class Run:
    outcome: GenerationOutcome
    events: list[TokenEvent]

    @property
    def token_ids(self) -> list[int]:
        return [e.token_id for e in self.events]


def params(
    prompt: str = PROMPT,
    max_new_tokens: int = N_TOKENS,
    sampling: SamplingParams = GREEDY,
    stop: Sequence[str] = (),
) -> GenerationParams:
    return GenerationParams(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop=tuple(stop),
        request_id="unit-test",
    )


def run(engine: Engine, request: GenerationParams, cancelled: Callable[[], bool] | None = None) -> Run:
    events: list[TokenEvent] = []
    prepared = engine.prepare(request)
    if cancelled is None:
        outcome = engine.generate(prepared, request, events.append)
    else:
        outcome = engine.generate(prepared, request, events.append, cancelled)
    assert outcome.prompt_tokens == prepared.prompt_tokens
    assert outcome.text == "".join(e.text for e in events)
    assert outcome.token_latencies_us == [e.latency_us for e in events]
    assert [e.index for e in events] == list(range(len(events)))
    return Run(outcome, events)


def eos_ids(engine: Engine) -> set[int]:
    eos = engine.tokenizer.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos)


def assert_full_length(engine: Engine, result: Run, expected_tokens: int, reason: FinishReason) -> None:
    """`expected_tokens` events and `reason`, unless the random model happened to emit EOS."""
    if result.outcome.finish_reason is FinishReason.EOS:
        assert len(result.events) <= expected_tokens
        assert result.token_ids[-1] in eos_ids(engine)
    else:
        assert result.outcome.finish_reason is reason
        assert len(result.events) == expected_tokens


def prompt_of(engine: Engine, tokens: int) -> str:
    """A prompt that encodes to exactly `tokens` tokens (BOS included)."""
    prompt = "hello" + " hello" * (tokens - 2)
    assert len(engine.tokenizer.encode(prompt)) == tokens
    return prompt


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module", params=TIERS)
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[Engine]:
    loaded = make_tier(request.param).load(tiny_model_dir, tiny_model_dir)
    assert loaded.context_tokens == TINY_CONTEXT_TOKENS
    yield Engine(loaded)


@pytest.fixture(scope="module")
def greedy_run(engine: Engine) -> Run:
    return run(engine, params())


# ------------------------------------------------------------------ greedy


def test_greedy_emits_one_timed_event_per_token(engine: Engine, greedy_run: Run) -> None:
    assert_full_length(engine, greedy_run, N_TOKENS, FinishReason.LENGTH)
    assert all(e.latency_us > 0 for e in greedy_run.events)
    assert greedy_run.outcome.generated_tokens == len(greedy_run.events)
    assert greedy_run.outcome.ttft_us == greedy_run.events[0].latency_us
    assert greedy_run.outcome.seed == 0  # greedy uses no randomness
    assert greedy_run.outcome.prompt_tokens == len(engine.tokenizer.encode(PROMPT))


def test_greedy_is_deterministic(engine: Engine, greedy_run: Run) -> None:
    again = run(engine, params())
    assert again.token_ids == greedy_run.token_ids
    assert again.outcome.text == greedy_run.outcome.text
    assert again.outcome.finish_reason is greedy_run.outcome.finish_reason


def test_fewer_tokens_is_a_prefix_of_more(engine: Engine, greedy_run: Run) -> None:
    short = run(engine, params(max_new_tokens=4))
    assert_full_length(engine, short, 4, FinishReason.LENGTH)
    assert short.token_ids == greedy_run.token_ids[: len(short.token_ids)]


# ------------------------------------------------------------------ sampling


def sampled(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=seed)


def test_same_seed_same_tokens_different_seed_different_tokens(engine: Engine) -> None:
    first = run(engine, params(max_new_tokens=8, sampling=sampled(1234)))
    second = run(engine, params(max_new_tokens=8, sampling=sampled(1234)))
    other = run(engine, params(max_new_tokens=8, sampling=sampled(98765)))
    assert first.outcome.seed == second.outcome.seed == 1234
    assert other.outcome.seed == 98765
    assert first.token_ids == second.token_ids
    # A random model over ~49k tokens at temperature 1: 8 equal draws would be a miracle.
    assert first.token_ids != other.token_ids
    assert_full_length(engine, first, 8, FinishReason.LENGTH)


def test_seed_zero_picks_and_reports_a_seed_that_replays(engine: Engine) -> None:
    unseeded = run(engine, params(max_new_tokens=6, sampling=sampled(0)))
    seed = unseeded.outcome.seed
    assert seed != 0
    replay = run(engine, params(max_new_tokens=6, sampling=sampled(seed)))
    assert replay.outcome.seed == seed
    assert replay.token_ids == unseeded.token_ids


def test_top_k_and_top_p_sampling_runs(engine: Engine) -> None:
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=7)
    first = run(engine, params(max_new_tokens=5, sampling=sampling))
    second = run(engine, params(max_new_tokens=5, sampling=sampling))
    assert first.token_ids == second.token_ids
    assert_full_length(engine, first, 5, FinishReason.LENGTH)


# ------------------------------------------------------------------ stop strings


def pick_stop(text: str, skip: int = 3, length: int = 3) -> tuple[str, int]:
    """A substring of `text` whose first occurrence is at index >= `skip`."""
    for start in range(skip, len(text) - length + 1):
        candidate = text[start : start + length]
        if REPLACEMENT_CHAR not in candidate and candidate.strip() and text.find(candidate) == start:
            return candidate, start
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_string_ends_text_right_before_it(engine: Engine, greedy_run: Run) -> None:
    text = greedy_run.outcome.text
    stop, index = pick_stop(text, skip=max(3, len(text) // 3))
    stopped = run(engine, params(stop=[stop]))
    assert stopped.outcome.finish_reason is FinishReason.STOP
    assert stopped.outcome.text == text[:index]
    assert stop not in stopped.outcome.text
    # Generation halted at the token completing the stop, well before max_new_tokens.
    assert stopped.token_ids == greedy_run.token_ids[: len(stopped.token_ids)]
    assert len(stopped.events) < len(greedy_run.events)


def test_stop_string_that_never_appears_changes_nothing(engine: Engine, greedy_run: Run) -> None:
    absent = "\u2603never\u2603"
    assert absent not in greedy_run.outcome.text
    result = run(engine, params(stop=[absent]))
    assert result.token_ids == greedy_run.token_ids
    assert result.outcome.text == greedy_run.outcome.text
    assert result.outcome.finish_reason is greedy_run.outcome.finish_reason


# ------------------------------------------------------------------ cancellation


def test_cancellation_stops_within_a_step(engine: Engine) -> None:
    events: list[TokenEvent] = []

    def cancelled() -> bool:
        return len(events) >= 3

    request = params(max_new_tokens=40)
    outcome = engine.generate(engine.prepare(request), request, events.append, cancelled)
    if outcome.finish_reason is not FinishReason.EOS:
        assert outcome.finish_reason is FinishReason.CANCELLED
    assert 1 <= len(events) <= 5
    assert outcome.generated_tokens == len(events)


def test_cancelled_before_start_generates_at_most_one_token(engine: Engine) -> None:
    result = run(engine, params(max_new_tokens=40), cancelled=lambda: True)
    assert len(result.events) <= 1
    assert result.outcome.finish_reason in (FinishReason.CANCELLED, FinishReason.EOS)


# ------------------------------------------------------------------ context window


def test_prompt_longer_than_the_context_is_rejected(engine: Engine) -> None:
    for tokens in (TINY_CONTEXT_TOKENS + 10, TINY_CONTEXT_TOKENS):
        with pytest.raises(InvalidRequest) as caught:
            engine.prepare(params(prompt=prompt_of(engine, tokens)))
        assert caught.value.field == "prompt"
        assert str(TINY_CONTEXT_TOKENS) in str(caught.value)


def test_context_bounds_new_tokens(engine: Engine) -> None:
    request = params(prompt=prompt_of(engine, 120), max_new_tokens=50)
    prepared = engine.prepare(request)
    assert prepared.prompt_tokens == 120
    assert prepared.max_new_tokens == TINY_CONTEXT_TOKENS - 120 == 8
    assert prepared.context_bound
    result = run(engine, request)
    assert_full_length(engine, result, 8, FinishReason.CONTEXT)


def test_max_new_tokens_inside_the_context_is_not_context_bound(engine: Engine) -> None:
    prepared = engine.prepare(params(prompt=prompt_of(engine, 120), max_new_tokens=8))
    assert prepared.max_new_tokens == 8
    assert not prepared.context_bound


def test_configured_context_limit_below_the_model_is_honoured(engine: Engine) -> None:
    limited = Engine(engine.loaded, max_context_tokens=64)
    assert limited.context_tokens == 64
    with pytest.raises(InvalidRequest) as caught:
        limited.prepare(params(prompt=prompt_of(engine, 70)))
    assert caught.value.field == "prompt"
    request = params(prompt=prompt_of(engine, 60), max_new_tokens=50)
    prepared = limited.prepare(request)
    assert prepared.max_new_tokens == 4
    assert prepared.context_bound
    assert_full_length(engine, run(limited, request), 4, FinishReason.CONTEXT)


def test_configured_context_limit_above_the_model_is_capped(engine: Engine) -> None:
    assert Engine(engine.loaded, max_context_tokens=10_000).context_tokens == TINY_CONTEXT_TOKENS
    assert Engine(engine.loaded, max_context_tokens=0).context_tokens == TINY_CONTEXT_TOKENS


# ------------------------------------------------------------------ scripted model: chosen token ids


class ScriptedModel:
    """Stands in for a model: `generate` emits fixed token ids the way transformers' loop does."""

    def __init__(self, script: Sequence[int]) -> None:
        self.script = list(script)

    def generate(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generation_config: Any,
        streamer: Any,
        stopping_criteria: Any,
    ) -> torch.Tensor:
        eos = set(generation_config.eos_token_id or [])
        sequence = input_ids
        streamer.put(input_ids)
        for token_id in self.script[: generation_config.max_new_tokens]:
            token = torch.tensor([token_id])
            sequence = torch.cat([sequence, token[None]], dim=1)
            streamer.put(token)
            if token_id in eos or bool(stopping_criteria(sequence, None).all()):
                break
        streamer.end()
        return sequence


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def scripted_engine(tokenizer: Any, script: Sequence[int]) -> Engine:
    return Engine(
        LoadedModel(
            model=ScriptedModel(script),
            tokenizer=tokenizer,
            backend="scripted",
            kernel="scripted",
            dtype=torch.float32,
            context_tokens=TINY_CONTEXT_TOKENS,
        )
    )


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize(
    "text",
    [
        "I 'm sure he 's right , they 're not . We 've seen it !",  # no "clean-up" of spaces
        "naïve café 日本語 🙂👍🏽 e\u0301",  # characters split over tokens
    ],
)
def test_scripted_text_arrives_complete_and_valid(tokenizer: Any, text: str) -> None:
    script = token_ids(tokenizer, text)
    result = run(scripted_engine(tokenizer, script), params(max_new_tokens=len(script)))
    assert result.outcome.text == text
    assert result.token_ids == script
    assert all(REPLACEMENT_CHAR not in e.text for e in result.events)
    assert result.outcome.finish_reason is FinishReason.LENGTH


def test_scripted_eos_releases_held_text_and_stops(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    script = [*token_ids(tokenizer, "hello ST"), eos, *token_ids(tokenizer, "never seen")]
    result = run(scripted_engine(tokenizer, script), params(max_new_tokens=20, stop=["STOP"]))
    assert result.outcome.finish_reason is FinishReason.EOS
    assert result.outcome.text == "hello ST"  # "ST" was held back as a possible "STOP"
    assert result.token_ids[-1] == eos
    assert result.events[-1].text == "ST"


def test_scripted_last_token_releases_held_text(tokenizer: Any) -> None:
    script = token_ids(tokenizer, "hello ST")
    result = run(scripted_engine(tokenizer, script), params(max_new_tokens=len(script), stop=["STOP"]))
    assert result.outcome.finish_reason is FinishReason.LENGTH
    assert result.outcome.text == "hello ST"


def test_scripted_stop_split_over_tokens(tokenizer: Any) -> None:
    script = token_ids(tokenizer, "alpha beta<|stop|> gamma delta")
    result = run(scripted_engine(tokenizer, script), params(max_new_tokens=len(script), stop=["|stop|"]))
    assert result.outcome.finish_reason is FinishReason.STOP
    assert result.outcome.text == "alpha beta<"
    assert len(result.events) < len(script)


def test_scripted_incomplete_character_at_the_end_becomes_a_replacement(tokenizer: Any) -> None:
    script = token_ids(tokenizer, "ok 👍")
    assert tokenizer.decode(script[:-1]).endswith(REPLACEMENT_CHAR), "the emoji should span tokens"
    result = run(scripted_engine(tokenizer, script[:-1]), params(max_new_tokens=len(script) - 1))
    assert result.outcome.text == "ok " + REPLACEMENT_CHAR
    assert result.outcome.finish_reason is FinishReason.LENGTH
