"""Validation of GenerateRequest into typed generation parameters.

Router and worker apply the same rules, so a bad request gets the same
INVALID_ARGUMENT message wherever it is caught. Every message names its field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tierserve_client.v1 import generate_pb2

from tierserve.domain.config import LimitsConfig, ServiceLevelConfig
from tierserve.domain.errors import InvalidRequest
from tierserve.domain.tiers import TIER_NAMES, is_known_tier

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_STRING_CHARS = 256
# The smallest temperature that samples: below it the model's scores divided by it overflow float32
# (3.4e38) to infinity, and sampling from them is NaN (an error, or garbage, depending on the kernel).
# 0 is greedy decoding.
MIN_TEMPERATURE = 1e-30
# The roles a chat template knows; anything else would render as the template pleases, or fail in it.
CHAT_ROLES = ("system", "user", "assistant")
# What a chat template adds around each message (role header, end-of-turn), in characters: only for
# the router's estimate of prompt tokens, which it corrects from every summary.
CHAT_MARKUP_CHARS = 16
# How much of a caller's string an error message quotes.
SHOWN_CHARS = 64


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationParams:
    # Either a raw prompt or chat messages (the other empty); the worker turns messages into the
    # prompt with the model's chat template (worker/chat.py).
    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    request_id: str
    messages: tuple[ChatMessage, ...] = ()
    # Text the reply already starts with (a resumed stream's text so far): appended to the prompt.
    response_prefix: str = ""
    # The ids the end of response_prefix was made of (a resumed stream's tokens so far).
    response_prefix_token_ids: tuple[int, ...] = ()


def shown(text: str) -> str:
    """A caller's string as an error message quotes it: at most SHOWN_CHARS characters. The whole of a
    long one would not fit in the status's metadata (8 KiB by default): the client would get
    RESOURCE_EXHAUSTED about the metadata instead of the refusal."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


def _finite_non_negative(field: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise InvalidRequest(field, f"must be a finite number, got {value}")
    if value < 0:
        raise InvalidRequest(field, f"must not be negative, got {value:g}")
    return value


def validate_generate_request(
    request: generate_pb2.GenerateRequest, limits: LimitsConfig
) -> GenerationParams:
    """Check every field of a request against the limits; raise InvalidRequest naming the field."""
    messages = _validate_prompt(request, limits)
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")

    max_new_tokens = limits.default_max_new_tokens
    if request.HasField("max_new_tokens"):
        max_new_tokens = request.max_new_tokens
        if max_new_tokens <= 0:
            raise InvalidRequest("max_new_tokens", f"must be at least 1, got {max_new_tokens}")
        if max_new_tokens > limits.max_new_tokens:
            raise InvalidRequest(
                "max_new_tokens", f"is {max_new_tokens}, above this server's limit of {limits.max_new_tokens}"
            )

    temperature = _finite_non_negative("temperature", request.temperature)
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise InvalidRequest(
            "temperature",
            f"{temperature:g} is too small to sample with (the scores divided by it overflow); "
            f"use 0 for greedy decoding, or at least {MIN_TEMPERATURE:g}",
        )
    top_p = 1.0
    if request.HasField("top_p"):
        top_p = request.top_p
        if math.isnan(top_p) or not 0.0 < top_p <= 1.0:
            # Nine digits tell any float32 apart: 1.0000001 is not shown as the allowed 1.
            raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p:.9g}")
    if request.top_k < 0:
        raise InvalidRequest("top_k", f"must not be negative, got {request.top_k}")

    if len(request.stop) > limits.max_stop_strings:
        raise InvalidRequest(
            "stop", f"at most {limits.max_stop_strings} stop strings, got {len(request.stop)}"
        )
    for stop in request.stop:
        if not stop:
            raise InvalidRequest("stop", "stop strings must not be empty")
        if len(stop) > MAX_STOP_STRING_CHARS:
            raise InvalidRequest("stop", f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")

    _finite_non_negative("max_token_latency_ms", request.max_token_latency_ms)
    _finite_non_negative("max_first_token_latency_ms", request.max_first_token_latency_ms)
    if request.HasField("max_quality_loss_pct"):
        _finite_non_negative("max_quality_loss_pct", request.max_quality_loss_pct)
    if request.tier and not is_known_tier(request.tier):
        raise InvalidRequest(
            "tier", f"unknown tier {shown(request.tier)}; known tiers: {', '.join(TIER_NAMES)}"
        )

    return GenerationParams(
        prompt=request.prompt,
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=request.top_k, seed=request.seed),
        stop=tuple(request.stop),
        request_id=request.request_id,
        messages=messages,
        response_prefix=request.response_prefix,
        response_prefix_token_ids=tuple(request.response_prefix_token_ids),
    )


def _validate_prompt(request: generate_pb2.GenerateRequest, limits: LimitsConfig) -> tuple[ChatMessage, ...]:
    """Exactly one of `prompt` and `messages`, within the limits; the messages as domain values."""
    if request.prompt and request.messages:
        raise InvalidRequest("messages", "set either prompt or messages, not both")
    if len(request.response_prefix) > limits.max_prompt_chars:
        raise InvalidRequest(
            "response_prefix",
            f"is {len(request.response_prefix)} characters, more than the limit of {limits.max_prompt_chars}",
        )
    _validate_prefix_ids(request, limits)
    if not request.messages:
        if not request.prompt:
            raise InvalidRequest("prompt", "must not be empty (or send chat messages instead)")
        if len(request.prompt) > limits.max_prompt_chars:
            raise InvalidRequest(
                "prompt",
                f"is {len(request.prompt)} characters, more than the limit of {limits.max_prompt_chars}",
            )
        return ()
    if len(request.messages) > limits.max_messages:
        raise InvalidRequest(
            "messages", f"{len(request.messages)} messages, more than the limit of {limits.max_messages}"
        )
    for index, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{index}].role",
                f"unknown role {shown(message.role)}; known roles: {', '.join(CHAT_ROLES)}",
            )
        if not message.content:
            raise InvalidRequest(f"messages[{index}].content", "must not be empty")
    chars = sum(len(message.content) for message in request.messages)
    if chars > limits.max_prompt_chars:
        raise InvalidRequest(
            "messages", f"are {chars} characters in all, more than the limit of {limits.max_prompt_chars}"
        )
    return tuple(ChatMessage(message.role, message.content) for message in request.messages)


def _validate_prefix_ids(request: generate_pb2.GenerateRequest, limits: LimitsConfig) -> None:
    """Token ids stand for the end of the response prefix: they need one, fit the limit (a token
    is at least one character) and are ids; the worker checks them against its vocabulary."""
    ids = request.response_prefix_token_ids
    if not ids:
        return
    if not request.response_prefix:
        raise InvalidRequest(
            "response_prefix_token_ids", "stand for the end of response_prefix, which is empty"
        )
    if len(ids) > limits.max_prompt_chars:
        raise InvalidRequest(
            "response_prefix_token_ids",
            f"are {len(ids)} ids, more than the limit of {limits.max_prompt_chars}",
        )
    negative = next((i for i in ids if i < 0), None)
    if negative is not None:
        raise InvalidRequest("response_prefix_token_ids", f"must not be negative, got {negative}")


def prompt_chars(request: generate_pb2.GenerateRequest) -> int:
    """About how many characters the worker will tokenize for this request, template markup included:
    what the router estimates prompt tokens from."""
    chat = sum(len(message.content) + CHAT_MARKUP_CHARS for message in request.messages)
    return len(request.prompt) + chat + len(request.response_prefix)


def within_budget(request: generate_pb2.GenerateRequest, ttft_us: float, tpot_mean_us: float) -> bool:
    """Whether measured latencies meet the request's budgets (a budget of 0 is none)."""
    ttft_ok = not request.max_first_token_latency_ms or ttft_us <= request.max_first_token_latency_ms * 1e3
    tpot_ok = not request.max_token_latency_ms or tpot_mean_us <= request.max_token_latency_ms * 1e3
    return ttft_ok and tpot_ok


def apply_service_level(request: generate_pb2.GenerateRequest, defaults: ServiceLevelConfig) -> None:
    """Fill the fields a request left unset from the configured defaults, in place, so the
    worker and the summary see the service level that was applied."""
    if not request.max_token_latency_ms:
        request.max_token_latency_ms = defaults.max_token_latency_ms
    if not request.max_first_token_latency_ms:
        request.max_first_token_latency_ms = defaults.max_first_token_latency_ms
    # A pinned tier is the caller's own accuracy choice: the default tolerance does not override
    # it (an explicit tolerance still does).
    if not request.HasField("max_quality_loss_pct") and not request.tier:
        request.max_quality_loss_pct = defaults.max_quality_loss_pct
    request.strict = request.strict or defaults.strict
