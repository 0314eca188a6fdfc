"""What both generation loops share: a request's prepared prompt, its tokens as they are made
(each timed, turned into text, checked against the stop strings), and its outcome."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from tierserve.worker.textstream import IncrementalDetokenizer, StopStringFilter


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
    # Set on a sequence's last token (EOS, stop string, length or context): a router that loses
    # the worker after it, before the summary, knows there is nothing left to resume.
    finish_reason: FinishReason | None = None


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


class TokenSink:
    """Receives one sequence's tokens: times each (the gap since the previous one, or since
    `start` for the first), turns it into text that is valid UTF-8 and free of stop strings,
    and emits it."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stops: Sequence[str],
        eos_ids: set[int],
        max_new_tokens: int,
        emit: Callable[[TokenEvent], None],
        context_bound: bool = False,
    ) -> None:
        self._context_bound = context_bound
        self._detokenizer = IncrementalDetokenizer(decode)
        self._stop_filter = StopStringFilter(stops)
        self._eos_ids = eos_ids
        self._max_new_tokens = max_new_tokens
        self._emit = emit
        self._last_time = time.perf_counter()
        self.latencies_us: list[int] = []
        self.text_parts: list[str] = []
        self.saw_eos = False

    def start(self) -> None:
        """The first token's latency counts from now."""
        self._last_time = time.perf_counter()

    @property
    def stopped_by_string(self) -> bool:
        return self._stop_filter.stopped

    @property
    def finished(self) -> bool:
        return self.saw_eos or self.stopped_by_string or len(self.latencies_us) >= self._max_new_tokens

    def push(self, token_id: int) -> None:
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
        last = self._ending() if self.finished else None
        self._emit(
            TokenEvent(text=text, token_id=token_id, index=index, latency_us=latency_us, finish_reason=last)
        )

    def _release_held_text(self) -> str:
        return self._stop_filter.feed(self._detokenizer.flush()) + self._stop_filter.flush()

    def outcome(self, prompt: PreparedPrompt, seed: int, cancelled: bool) -> GenerationOutcome:
        return GenerationOutcome(
            prompt_tokens=prompt.prompt_tokens,
            finish_reason=self._finish_reason(prompt, cancelled),
            seed=seed,
            token_latencies_us=self.latencies_us,
            text="".join(self.text_parts),
        )

    def _finish_reason(self, prompt: PreparedPrompt, cancelled: bool) -> FinishReason:
        if self.finished:
            return self._ending()
        return FinishReason.CANCELLED if cancelled else FinishReason.LENGTH

    def _ending(self) -> FinishReason:
        """Why a finished sequence ended."""
        if self.saw_eos:
            return FinishReason.EOS
        if self.stopped_by_string:
            return FinishReason.STOP
        return FinishReason.CONTEXT if self._context_bound else FinishReason.LENGTH
