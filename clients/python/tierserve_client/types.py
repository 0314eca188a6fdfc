"""Typed results of the SDK: tokens with their latency, the request's summary, a whole generation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

from tierserve_client.v1 import generate_pb2


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation: `role` is "system", "user" or "assistant"."""

    role: str
    content: str

    @classmethod
    def system(cls, content: str) -> ChatMessage:
        return cls("system", content)

    @classmethod
    def user(cls, content: str) -> ChatMessage:
        return cls("user", content)

    @classmethod
    def assistant(cls, content: str) -> ChatMessage:
        return cls("assistant", content)


# A conversation: ChatMessage values, or mappings with "role" and "content" (as the OpenAI SDKs write them).
Messages = Sequence[Union[ChatMessage, Mapping[str, str]]]
# What to generate from: a prompt continued as it is, or a conversation the model's chat template renders.
Prompt = Union[str, Messages]


def chat_message(message: ChatMessage | Mapping[str, str]) -> generate_pb2.ChatMessage:
    if isinstance(message, ChatMessage):
        return generate_pb2.ChatMessage(role=message.role, content=message.content)
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        raise ValueError(f"a chat message needs {' and '.join(missing)}: {dict(message)!r}")
    return generate_pb2.ChatMessage(role=message["role"], content=message["content"])


@dataclass(frozen=True)
class Token:
    """One generated piece of text and how long it took (measured on the worker)."""

    text: str
    id: int
    index: int
    latency_us: int
    proto: generate_pb2.Token = field(repr=False, compare=False)

    @property
    def latency_ms(self) -> float:
        return self.latency_us / 1e3

    @classmethod
    def from_proto(cls, token: generate_pb2.Token) -> Token:
        return cls(token.text, token.id, token.index, token.latency_us, token)


@dataclass(frozen=True)
class Summary:
    """The last message of every stream: who served it, how fast, and why it was routed there."""

    request_id: str
    worker_id: str
    tier: str
    prompt_tokens: int
    generated_tokens: int
    queue_time_us: int
    ttft_us: int
    tpot_mean_us: int
    tpot_p50_us: int
    tpot_p95_us: int
    total_time_us: int
    budget_met: bool
    best_effort: bool
    # "length", "eos", "stop", "context" (or "unspecified").
    finish_reason: str
    routing_reason: str
    policy: str
    seed: int
    text: str
    predicted_queue_us: int
    predicted_ttft_us: int
    predicted_tpot_us: int
    # The wire message, for tools that render or forward it.
    proto: generate_pb2.Summary = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, summary: generate_pb2.Summary) -> Summary:
        finish = generate_pb2.FinishReason.Name(summary.finish_reason).removeprefix("FINISH_REASON_")
        return cls(
            request_id=summary.request_id,
            worker_id=summary.worker_id,
            tier=summary.tier,
            prompt_tokens=summary.prompt_tokens,
            generated_tokens=summary.generated_tokens,
            queue_time_us=summary.queue_time_us,
            ttft_us=summary.ttft_us,
            tpot_mean_us=summary.tpot_mean_us,
            tpot_p50_us=summary.tpot_p50_us,
            tpot_p95_us=summary.tpot_p95_us,
            total_time_us=summary.total_time_us,
            budget_met=summary.budget_met,
            best_effort=summary.best_effort,
            finish_reason=finish.lower(),
            routing_reason=summary.routing_reason,
            policy=summary.policy,
            seed=summary.seed,
            text=summary.text,
            predicted_queue_us=summary.predicted_queue_us,
            predicted_ttft_us=summary.predicted_ttft_us,
            predicted_tpot_us=summary.predicted_tpot_us,
            proto=summary,
        )


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation: the text (stop string excluded), its tokens, and the summary."""

    text: str
    tokens: list[Token]
    summary: Summary


@dataclass(frozen=True)
class GenerateParams:
    """What to generate and the service level; unset fields take the server's defaults."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    # Budgets in milliseconds (0: the server's default); accuracy tolerance in % perplexity change.
    max_token_latency_ms: float = 0.0
    max_first_token_latency_ms: float = 0.0
    max_quality_loss_pct: float | None = None
    tier: str = ""
    strict: bool = False
    request_id: str = ""
    # Text the reply starts with (the model continues it; it is not repeated in the result).
    response_prefix: str = ""

    def to_request(self, prompt: Prompt) -> generate_pb2.GenerateRequest:
        """The wire request for a prompt (str) or a conversation (a sequence of messages)."""
        request = generate_pb2.GenerateRequest(
            request_id=self.request_id,
            response_prefix=self.response_prefix,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed,
            stop=list(self.stop),
            max_token_latency_ms=self.max_token_latency_ms,
            max_first_token_latency_ms=self.max_first_token_latency_ms,
            tier=self.tier,
            strict=self.strict,
        )
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.messages.extend(chat_message(message) for message in prompt)
        if self.max_new_tokens is not None:
            request.max_new_tokens = self.max_new_tokens
        if self.top_p is not None:
            request.top_p = self.top_p
        if self.max_quality_loss_pct is not None:
            request.max_quality_loss_pct = self.max_quality_loss_pct
        return request
