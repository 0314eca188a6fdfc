"""The generation loop: one request at a time on a loaded model, token by token, each timed.

Runs in a worker thread (the model call blocks); every token is handed to an
`emit` callback as soon as it exists, and generation stops within one decode
step once `cancelled()` turns true.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tierserve.domain.errors import InvalidRequest
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.generation import (
    FinishReason,
    GenerationOutcome,
    PreparedPrompt,
    TokenEvent,
    TokenSink,
)
from tierserve.worker.resumption import context_ids
from tierserve.worker.tiers.base import LoadedModel

# Re-exported: the service and the benchmarks take them from here.
__all__ = ["Engine", "FinishReason", "GenerationOutcome", "PreparedPrompt", "TokenEvent", "seed_for"]


class _TimedTokenStream(BaseStreamer):  # type: ignore[misc]
    """Hands each new token from `generate` to a TokenSink (the prompt, which `generate` passes
    first, is skipped)."""

    def __init__(self, sink: TokenSink) -> None:
        self.sink = sink
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.sink.push(int(token_id))

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):  # type: ignore[misc]
    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self._should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self._should_stop(), dtype=torch.bool)


def _as_id_set(ids: int | list[int] | None) -> set[int]:
    if ids is None:
        return set()
    return {ids} if isinstance(ids, int) else set(ids)


class Engine:
    """Generates with one loaded model; not thread-safe: callers serialise requests."""

    def __init__(self, loaded: LoadedModel, max_context_tokens: int = 0) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.context_tokens = min(loaded.context_tokens, max_context_tokens or loaded.context_tokens)
        # End of sequence as the tokenizer and the model's own generation config define it.
        self._eos_ids = _as_id_set(loaded.tokenizer.eos_token_id)
        generation_config = getattr(loaded.model, "generation_config", None)
        self._eos_ids |= _as_id_set(getattr(generation_config, "eos_token_id", None))
        eos = min(self._eos_ids) if self._eos_ids else None
        self._pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else eos
        # Ids a request may bring (a resumed stream's): the tokenizer's, or the model's larger table.
        model_vocabulary = getattr(getattr(loaded.model, "config", None), "vocab_size", 0)
        self._vocabulary = max(len(loaded.tokenizer), model_vocabulary or 0)

    def prepare(self, params: GenerationParams) -> PreparedPrompt:
        """Tokenize and fit into the context window; raise InvalidRequest if the prompt cannot fit."""
        input_ids = torch.tensor([context_ids(self.tokenizer, params, self._vocabulary)], dtype=torch.long)
        prompt_tokens = int(input_ids.shape[1])
        field = "messages" if params.messages else "prompt"  # what the caller sent
        if prompt_tokens == 0:
            raise InvalidRequest(field, "encodes to no tokens")
        room = self.context_tokens - prompt_tokens
        if room <= 0:
            raise InvalidRequest(
                field,
                f"is {prompt_tokens} tokens; the model's context holds {self.context_tokens} "
                "(prompt plus generated tokens)",
            )
        return PreparedPrompt(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=min(params.max_new_tokens, room),
            context_bound=room < params.max_new_tokens,
        )

    def generate(
        self,
        prompt: PreparedPrompt,
        params: GenerationParams,
        emit: Callable[[TokenEvent], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> GenerationOutcome:
        seed = seed_for(params.sampling)
        sink = self.token_sink(params, prompt, emit)
        stop_when = _StopWhen(lambda: sink.finished or cancelled())
        with torch.inference_mode(), self.loaded.run_context():
            if seed:
                torch.manual_seed(seed)
            self.loaded.model.generate(
                input_ids=prompt.input_ids,
                attention_mask=prompt.attention_mask,
                generation_config=self._generation_config(prompt.max_new_tokens, params.sampling),
                streamer=_TimedTokenStream(sink),
                stopping_criteria=StoppingCriteriaList([stop_when]),
            )
        return sink.outcome(prompt, seed, cancelled())

    def token_sink(
        self, params: GenerationParams, prompt: PreparedPrompt, emit: Callable[[TokenEvent], None]
    ) -> TokenSink:
        """Where a request's tokens go: timed, detokenized, cut at its stop strings, emitted."""
        return TokenSink(
            # No clean-up of "tokenization spaces": it rewrites " 'm" to "'m" depending on the
            # window decoded, so streamed pieces would lose characters.
            decode=lambda ids: self.tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            ),
            stops=params.stop,
            eos_ids=self._eos_ids,
            max_new_tokens=prompt.max_new_tokens,
            emit=emit,
            context_bound=prompt.context_bound,
        )

    def _generation_config(self, max_new_tokens: int, sampling: SamplingParams) -> GenerationConfig:
        common: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "num_beams": 1,
            "eos_token_id": sorted(self._eos_ids),
            "pad_token_id": self._pad_id,
        }
        if sampling.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 disables top-k (the library default would be 50)
            **common,
        )


def seed_for(sampling: SamplingParams) -> int:
    """The seed a request samples with: its own, or a fresh one it is told in its summary."""
    if sampling.greedy:
        return 0
    return sampling.seed or secrets.randbits(63)
