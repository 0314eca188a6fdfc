"""The token ids a request's context is made of, for a stream resumed on this worker as well.

A resumed stream's text so far arrives as its `response_prefix`, with the ids of the tokens
already streamed. Tokenizing that text again is not always what the model made: it can merge
tokens the model made apart (two `\\n` tokens come back as one `\\n\\n`), and the continuation then
sees another context and may go on differently. So where the streamed ids decode to the end of the
prefix, the context is the rest tokenized as text and then those ids, as the first worker had it;
where they do not (another tokenizer, or text the first worker held back, cut inside a token), the
whole text is tokenized as before. Either way the context's text is exactly the request's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tierserve.domain.errors import InvalidRequest
from tierserve.domain.requests import GenerationParams
from tierserve.worker.chat import render_prompt

# How many of the last streamed tokens may lie beyond the text that was sent: the worker holds
# back text that could start a stop string, and a stream can fail before it is sent.
MAX_HELD_BACK_TOKENS = 64


def context_ids(tokenizer: Any, params: GenerationParams, vocabulary: int) -> list[int]:
    """The ids the engine prefills for `params`: its rendered prompt tokenized, with a resumed
    stream's own token ids where they stand for the end of its prefix.

    Raises InvalidRequest for an id outside the `vocabulary`."""
    text_ids = _tokenized(tokenizer, params)
    streamed = params.response_prefix_token_ids
    if not streamed:
        return text_ids
    outside = next((i for i in streamed if i >= vocabulary), None)
    if outside is not None:
        raise InvalidRequest(
            "response_prefix_token_ids", f"holds {outside}, outside the model's vocabulary of {vocabulary}"
        )
    spliced = _spliced(tokenizer, params, streamed)
    # The ids must say exactly what the text says (a tokenizer that drops a word's leading space
    # when decoding it alone would put one space too many): else the text decides.
    if spliced is None or _decoded(tokenizer, spliced, skip_special=False) != _decoded(
        tokenizer, text_ids, skip_special=False
    ):
        return text_ids
    return spliced


def _spliced(tokenizer: Any, params: GenerationParams, streamed: Sequence[int]) -> list[int] | None:
    """The prompt and the prefix's head tokenized, then the longest run of the streamed ids (from
    the first) whose text ends the prefix; None if there is none."""
    prefix = params.response_prefix
    shortest = max(len(streamed) - MAX_HELD_BACK_TOKENS, 1)
    for count in range(len(streamed), shortest - 1, -1):
        tail = _decoded(tokenizer, streamed[:count], skip_special=True)
        if tail and prefix.endswith(tail):
            head = dataclasses.replace(
                params, response_prefix=prefix[: len(prefix) - len(tail)], response_prefix_token_ids=()
            )
            return _tokenized(tokenizer, head) + list(streamed[:count])
    return None


def _tokenized(tokenizer: Any, params: GenerationParams) -> list[int]:
    return list(tokenizer(render_prompt(tokenizer, params))["input_ids"])


def _decoded(tokenizer: Any, ids: Sequence[int], skip_special: bool) -> str:
    # As the token sink decodes what it streams (no clean-up of tokenization spaces).
    text: str = tokenizer.decode(
        list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False
    )
    return text
