"""A resumed stream's context: the ids its tokens were made of where they stand for the end of its
prefix, the text tokenized otherwise, and always exactly the request's text."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_model import default_model_dir
from tierserve.domain.errors import InvalidRequest
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.engine import Engine, TokenEvent
from tierserve.worker.resumption import context_ids
from tierserve.worker.tiers.base import make_tier

PROMPT = "Write a list:"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


def params(prefix: str = "", ids: tuple[int, ...] = (), new_tokens: int = 8) -> GenerationParams:
    return GenerationParams(
        PROMPT,
        new_tokens,
        SamplingParams(),
        (),
        "test",
        response_prefix=prefix,
        response_prefix_token_ids=ids,
    )


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenized(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def test_two_newline_tokens_stay_two_tokens(tokenizer: Any) -> None:
    newline = encode(tokenizer, "\n")
    assert len(newline) == 1 and len(encode(tokenizer, "\n\n")) == 1, "the seam this guards against"
    ids = context_ids(tokenizer, params("\n\n", (newline[0], newline[0])), len(tokenizer))
    assert ids == tokenized(tokenizer, PROMPT) + newline * 2
    # The text tokenized again would have merged them: the continuation would see another context.
    assert tokenized(tokenizer, PROMPT + "\n\n") != ids


def test_without_ids_the_text_is_tokenized(tokenizer: Any) -> None:
    assert context_ids(tokenizer, params(" one two"), len(tokenizer)) == tokenized(
        tokenizer, PROMPT + " one two"
    )


def test_ids_beyond_the_text_sent_count_up_to_it(tokenizer: Any) -> None:
    # The first worker made " one two" but held back " two" (it might have begun a stop string).
    streamed = encode(tokenizer, " one") + encode(tokenizer, " two")
    ids = context_ids(tokenizer, params(" one", tuple(streamed)), len(tokenizer))
    assert ids == tokenized(tokenizer, PROMPT) + encode(tokenizer, " one")


def test_ids_after_a_callers_own_prefix_stand_for_its_end(tokenizer: Any) -> None:
    streamed = encode(tokenizer, "\n") * 2
    ids = context_ids(tokenizer, params("Sure:\n\n", tuple(streamed)), len(tokenizer))
    assert ids == tokenized(tokenizer, PROMPT + "Sure:") + streamed


def test_ids_that_do_not_say_the_prefix_leave_it_to_the_text(tokenizer: Any) -> None:
    other = tuple(encode(tokenizer, " something else"))
    assert context_ids(tokenizer, params(" one two", other), len(tokenizer)) == tokenized(
        tokenizer, PROMPT + " one two"
    )


def test_an_id_outside_the_vocabulary_is_refused(tokenizer: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        context_ids(tokenizer, params("x", (len(tokenizer),)), len(tokenizer))
    assert caught.value.field == "response_prefix_token_ids"
    assert "outside the model's vocabulary" in str(caught.value)


@pytest.mark.parametrize("resume_at", [1, 3, 6])
def test_a_greedy_stream_resumed_from_its_ids_goes_on_as_if_uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, resume_at: int
) -> None:
    from tests.tiny_model import build_tiny_model_dir

    model_dir: Path = build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    engine = Engine(make_tier("fp32").load(model_dir, model_dir))
    whole = params(new_tokens=12)
    events: list[TokenEvent] = []
    uninterrupted = engine.generate(engine.prepare(whole), whole, emit=events.append)
    assert uninterrupted.generated_tokens == 12
    head = events[:resume_at]
    resumed = dataclasses.replace(
        whole,
        response_prefix="".join(e.text for e in head),
        response_prefix_token_ids=tuple(e.token_id for e in head),
        max_new_tokens=12 - resume_at,
    )
    # Its context is the uninterrupted run's: the prompt and the very tokens streamed.
    context = engine.prepare(resumed).input_ids[0].tolist()
    assert context == engine.prepare(whole).input_ids[0].tolist() + [e.token_id for e in head]
    rest = engine.generate(engine.prepare(resumed), resumed, emit=lambda _: None)
    assert "".join(e.text for e in head) + rest.text == uninterrupted.text
