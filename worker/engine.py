"""The generation loop: one request at a time on a loaded model, token by token, each timed.

Runs in a worker thread (the model call blocks); every token is handed to an
`emit` callback as soon as it exists, and generation stops within one decode
step once `cancelled()` turns true.
"""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tierserve.domain.errors import InvalidRequest
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.textstream import IncrementalDetokenizer, StopStringFilter
from tierserve.worker.tiers.base import LoadedModel


class FinishReason(StrEnum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CONTEXT = "context"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TokenEvent:
    text: str
    token_id: int
    index: int
    latency_us: int


@dataclass(frozen=True)
class PreparedPrompt:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int
    # True when the context window, not max_new_tokens, bounds the generation.
    context_bound: bool

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class GenerationOutcome:
    prompt_tokens: int
    finish_reason: FinishReason
    seed: int
    token_latencies_us: list[int] = field(default_factory=list)
    text: str = ""

    @property
    def generated_tokens(self) -> int:
        return len(self.token_latencies_us)

    @property
    def ttft_us(self) -> int:
        return self.token_latencies_us[0] if self.token_latencies_us else 0

    @property
    def tpot_us(self) -> list[int]:
        return self.token_latencies_us[1:]

    def tpot_mean_us(self) -> float:
        return statistics.fmean(self.tpot_us) if self.tpot_us else 0.0


class _TimedTokenStream(BaseStreamer):  # type: ignore[misc]
    """Receives each new token from `generate`, times it, turns it into text and emits it."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stops: Sequence[str],
        eos_ids: set[int],
        max_new_tokens: int,
        emit: Callable[[TokenEvent], None],
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(decode)
        self._stop_filter = StopStringFilter(stops)
        self._eos_ids = eos_ids
        self._max_new_tokens = max_new_tokens
        self._emit = emit
        self._prompt_seen = False
        self._last_time = time.perf_counter()
        self.latencies_us: list[int] = []
        self.text_parts: list[str] = []
        self.saw_eos = False

    @property
    def stopped_by_string(self) -> bool:
        return self._stop_filter.stopped

    @property
    def finished(self) -> bool:
        return self.saw_eos or self.stopped_by_string or len(self.latencies_us) >= self._max_new_tokens

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self._on_token(int(token_id))

    def end(self) -> None:
        pass

    def _on_token(self, token_id: int) -> None:
        now = time.perf_counter()
        latency_us = int((now - self._last_time) * 1e6)
        self._last_time = now
        index = len(self.latencies_us)
        self.latencies_us.append(latency_us)
        if token_id in self._eos_ids:
            self.saw_eos = True
            text = self._release_held_text()
        else:
            text = self._stop_filter.feed(self._detokenizer.push(token_id))
            if index + 1 >= self._max_new_tokens and not self._stop_filter.stopped:
                text += self._release_held_text()  # last token: nothing comes to complete held text
        self.text_parts.append(text)
        self._emit(TokenEvent(text=text, token_id=token_id, index=index, latency_us=latency_us))

    def _release_held_text(self) -> str:
        return self._stop_filter.feed(self._detokenizer.flush()) + self._stop_filter.flush()


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

    def prepare(self, params: GenerationParams) -> PreparedPrompt:
        """Tokenize and fit into the context window; raise InvalidRequest if the prompt cannot fit."""
        encoded = self.tokenizer(params.prompt, return_tensors="pt")
        prompt_tokens = int(encoded["input_ids"].shape[1])
        if prompt_tokens == 0:
            raise InvalidRequest("prompt", "encodes to no tokens")
        room = self.context_tokens - prompt_tokens
        if room <= 0:
            raise InvalidRequest(
                "prompt",
                f"is {prompt_tokens} tokens; the model's context holds {self.context_tokens} "
                "(prompt plus generated tokens)",
            )
        return PreparedPrompt(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
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
        seed = self._seed_for(params.sampling)
        stream = _TimedTokenStream(
            # No clean-up of "tokenization spaces": it rewrites " 'm" to "'m" depending on the
            # window decoded, so streamed pieces would lose characters.
            decode=lambda ids: self.tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            ),
            stops=params.stop,
            eos_ids=self._eos_ids,
            max_new_tokens=prompt.max_new_tokens,
            emit=emit,
        )
        stop_when = _StopWhen(lambda: stream.finished or cancelled())
        with torch.inference_mode(), self.loaded.run_context():
            if seed:
                torch.manual_seed(seed)
            self.loaded.model.generate(
                input_ids=prompt.input_ids,
                attention_mask=prompt.attention_mask,
                generation_config=self._generation_config(prompt.max_new_tokens, params.sampling),
                streamer=stream,
                stopping_criteria=StoppingCriteriaList([stop_when]),
            )
        return GenerationOutcome(
            prompt_tokens=prompt.prompt_tokens,
            finish_reason=self._finish_reason(stream, prompt, cancelled()),
            seed=seed,
            token_latencies_us=stream.latencies_us,
            text="".join(stream.text_parts),
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

    @staticmethod
    def _seed_for(sampling: SamplingParams) -> int:
        if sampling.greedy:
            return 0
        return sampling.seed or secrets.randbits(63)

    @staticmethod
    def _finish_reason(stream: _TimedTokenStream, prompt: PreparedPrompt, cancelled: bool) -> FinishReason:
        if stream.saw_eos:
            return FinishReason.EOS
        if stream.stopped_by_string:
            return FinishReason.STOP
        if len(stream.latencies_us) >= prompt.max_new_tokens:
            return FinishReason.CONTEXT if prompt.context_bound else FinishReason.LENGTH
        if cancelled:
            return FinishReason.CANCELLED
        return FinishReason.LENGTH
