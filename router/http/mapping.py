"""OpenAI request bodies into GenerateRequests, and the router's tokens and summary back into
OpenAI's replies and stream chunks (chat completions and legacy completions).

What OpenAI defines is kept as it defines it; what tierserve adds travels in extra fields: the
service level in the request body under the proto's own names (the `openai` SDK sends them with
`extra_body`) or as `X-Tierserve-*` headers, and in every reply a `tierserve` object: a streamed
token's index and latency, and, last, the request's summary (worker, tier, routing reason, TTFT,
TPOT, whether the budget was met). Nothing here does I/O: the handlers (router/http/handlers.py)
read and write, this module only maps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from google.protobuf.message import Message
from tierserve_client.v1 import generate_pb2, router_pb2

from tierserve.domain.errors import InvalidRequest, TierserveError

# Service-level fields, as named in the proto (and so in the body), with their JSON types.
SERVICE_LEVEL_NUMBERS = ("max_token_latency_ms", "max_first_token_latency_ms", "max_quality_loss_pct")
SERVICE_LEVEL_FIELDS = (*SERVICE_LEVEL_NUMBERS, "tier", "strict")
# The request's deadline, in milliseconds (gRPC callers set one on the call): body field and header.
TIMEOUT_FIELD = "timeout_ms"
HEADER_PREFIX = "x-tierserve-"
# Roles OpenAI clients send that mean one of tierserve's: "developer" is the newer name of "system".
ROLE_ALIASES = {"developer": "system"}
# OpenAI's defaults where they differ from tierserve's own (greedy): sampling at temperature 1.
DEFAULT_TEMPERATURE = 1.0
# Fields OpenAI defines that change what the model must do, which tierserve cannot do: refused
# (400, naming the field) rather than silently ignored, when set to anything but their neutral value.
NEUTRAL = {
    "tools": [],
    "functions": [],
    "logit_bias": {},
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "echo": False,
    "suffix": "",
    "best_of": 1,
}
SSE_DONE = b"data: [DONE]\n\n"


class Endpoint(Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"


class UnknownModel(TierserveError):
    """The request names a model this router does not serve (404, as OpenAI answers)."""

    def __init__(self, model: str, served: str) -> None:
        super().__init__(f"the model {model!r} does not exist; this server serves {served!r}")
        self.model = model


@dataclass(frozen=True)
class ApiRequest:
    """A parsed OpenAI request: the GenerateRequest to route, and how to answer it."""

    endpoint: Endpoint
    request: generate_pb2.GenerateRequest
    model: str
    stream: bool = False
    include_usage: bool = False
    # The name the client gave its token limit, for messages about it.
    max_tokens_param: str = "max_tokens"
    # Seconds the caller waits at most; None: no deadline.
    timeout_s: float | None = None
    created: int = 0

    @property
    def id(self) -> str:
        prefix = "chatcmpl" if self.endpoint is Endpoint.CHAT else "cmpl"
        return f"{prefix}-{self.request.request_id}"

    def param(self, proto_field: str) -> str:
        """The OpenAI name of a GenerateRequest field, for an error about it."""
        return self.max_tokens_param if proto_field == "max_new_tokens" else proto_field


# --- requests ---------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidRequest(name, f"must be a number, got {json.dumps(value)[:40]}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or value != int(value):
        raise InvalidRequest(name, f"must be an integer, got {json.dumps(value)[:40]}")
    return int(value)


def _boolean(body: Mapping[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidRequest(name, f"must be true or false, got {json.dumps(value)[:40]}")
    return value


def _string(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(name, f"must be a string, got {json.dumps(value)[:40]}")
    return value


def header_name(field_name: str) -> str:
    """The header that carries a body field: max_token_latency_ms -> X-Tierserve-Max-Token-Latency-Ms."""
    return "X-Tierserve-" + "-".join(part.capitalize() for part in field_name.split("_"))


def _header_value(name: str, text: str) -> Any:
    """A header's text as the JSON value its body field takes."""
    if name == "tier":
        return text.strip()
    if name == "strict":
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise InvalidRequest(header_name(name), f"must be true or false, got {text[:40]!r}")
    try:
        return float(text)
    except ValueError:
        raise InvalidRequest(header_name(name), f"must be a number, got {text[:40]!r}") from None


def extra_fields(body: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """The service level and deadline from `X-Tierserve-*` headers, overridden by the body's fields."""
    lowered = {key.lower(): value for key, value in headers.items() if key.lower().startswith(HEADER_PREFIX)}
    fields: dict[str, Any] = {}
    for name in (*SERVICE_LEVEL_FIELDS, TIMEOUT_FIELD):
        text = lowered.get(HEADER_PREFIX + name.replace("_", "-"))
        if text is not None:
            fields[name] = _header_value(name, text)
        if body.get(name) is not None:
            fields[name] = body[name]
    return fields


def _apply_service_level(request: generate_pb2.GenerateRequest, fields: Mapping[str, Any]) -> None:
    for name in SERVICE_LEVEL_NUMBERS:
        value = _number(fields, name)
        if value is not None:
            # Range checks (negative, NaN) are the router's own, as for gRPC callers.
            setattr(request, name, value)
    tier = _string(fields, "tier")
    if tier:
        request.tier = tier
    strict = _boolean(fields, "strict")
    if strict is not None:
        request.strict = strict


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is not None and value != neutral:
            raise InvalidRequest(name, "is not supported by this server; leave it unset")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise InvalidRequest("logprobs", "log probabilities are not supported by this server; leave it unset")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type", "text") != "text"
    ):
        raise InvalidRequest("response_format", 'only {"type": "text"} is supported')


def _content(index: int, content: Any) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for number, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidRequest(
                    f"{where}[{number}]", 'only text parts ({"type": "text", "text": ...}) are supported'
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(where, "must be a string or a list of text parts")


def _messages(request: generate_pb2.GenerateRequest, body: Mapping[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", 'must be a non-empty list of {"role", "content"} objects')
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{index}]", "must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(f"messages[{index}].role", "must be a string")
        # Unknown roles ("tool", ...) are the router's to refuse, naming the same field.
        request.messages.add(
            role=ROLE_ALIASES.get(role, role), content=_content(index, message.get("content"))
        )


def _prompt(request: generate_pb2.GenerateRequest, body: Mapping[str, Any]) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequest("prompt", f"one prompt per request is supported, got {len(prompt)}")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt", "must be a string (token ids are not supported)")
    request.prompt = prompt


def _stop(request: generate_pb2.GenerateRequest, body: Mapping[str, Any]) -> None:
    stop = body.get("stop")
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    request.stop.extend(stops)


def parse_request(
    endpoint: Endpoint,
    body: Any,
    headers: Mapping[str, str],
    served_model: str,
    request_id: str,
    created: int,
) -> ApiRequest:
    """The GenerateRequest an OpenAI body asks for; InvalidRequest naming the (OpenAI) field when
    the body is malformed or asks for something unsupported, UnknownModel for another model. Limits
    (prompt size, max tokens, stop strings, budgets) are checked later by the router's own validation."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    model = _string(body, "model")
    if not model:
        raise InvalidRequest("model", f"is required (this server serves {served_model!r})")
    if model != served_model:
        raise UnknownModel(model, served_model)
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise InvalidRequest("n", f"only n=1 is supported (one choice per request), got {n}")
    _refuse_unsupported(body)
    request = generate_pb2.GenerateRequest(request_id=request_id)
    if endpoint is Endpoint.CHAT:
        _messages(request, body)
    else:
        _prompt(request, body)

    max_tokens_param = "max_tokens"
    max_tokens = _integer(body, "max_tokens")
    if endpoint is Endpoint.CHAT and body.get("max_completion_tokens") is not None:
        max_tokens_param, max_tokens = "max_completion_tokens", _integer(body, "max_completion_tokens")
    if max_tokens is not None:
        if not -(2**31) <= max_tokens < 2**31:
            raise InvalidRequest(max_tokens_param, f"is {max_tokens}, out of range")
        request.max_new_tokens = max_tokens
    temperature = _number(body, "temperature")
    request.temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        request.top_p = top_p
    top_k = _integer(body, "top_k")  # not OpenAI's, but vLLM's and others'
    if top_k is not None:
        if not 0 <= top_k < 2**31:
            raise InvalidRequest("top_k", f"must be between 0 and {2**31 - 1}, got {top_k}")
        request.top_k = top_k
    seed = _integer(body, "seed")
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise InvalidRequest("seed", f"must be between 0 and 2**64 - 1, got {seed}")
        request.seed = seed
    _stop(request, body)

    stream = bool(_boolean(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidRequest("stream_options", "is only allowed when stream is true")
        if not isinstance(options, dict):
            raise InvalidRequest("stream_options", "must be an object")
        include_usage = bool(_boolean(options, "include_usage"))

    extra = extra_fields(body, headers)
    _apply_service_level(request, extra)
    timeout_ms = _number(extra, TIMEOUT_FIELD)
    if timeout_ms is not None and timeout_ms <= 0:
        raise InvalidRequest(TIMEOUT_FIELD, f"must be positive, got {timeout_ms:g}")
    return ApiRequest(
        endpoint,
        request,
        model,
        stream=stream,
        include_usage=include_usage,
        max_tokens_param=max_tokens_param,
        timeout_s=None if timeout_ms is None else timeout_ms / 1e3,
        created=created,
    )


# --- replies ----------------------------------------------------------------------------------


def finish_reason(summary: generate_pb2.Summary) -> str:
    """OpenAI's finish_reason: "length" when a token limit (the request's or the context's) ended
    the reply, "stop" when the model or a stop string did."""
    limited = (generate_pb2.FINISH_REASON_LENGTH, generate_pb2.FINISH_REASON_CONTEXT)
    return "length" if summary.finish_reason in limited else "stop"


def usage(summary: generate_pb2.Summary) -> dict[str, int]:
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.generated_tokens,
        "total_tokens": summary.prompt_tokens + summary.generated_tokens,
    }


def message_fields(message: Message, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A proto message as JSON-ready fields under the proto's names: numbers stay numbers (int64
    too, unlike protobuf's JSON mapping), enums become short lower-case names."""
    out: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        if descriptor.name in skip:
            continue
        value = getattr(message, descriptor.name)
        if descriptor.is_repeated:
            value = list(value)
        elif descriptor.enum_type is not None:
            name = descriptor.enum_type.values_by_number[value].name
            prefix = descriptor.enum_type.name
            value = _enum_word(name, prefix)
        elif descriptor.message_type is not None:
            value = message_fields(value)
        out[descriptor.name] = value
    return out


def _enum_word(name: str, enum_name: str) -> str:
    """FINISH_REASON_EOS (enum FinishReason) -> "eos"."""
    snake = "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(enum_name)).upper() + "_"
    return name.removeprefix(snake).lower()


def summary_fields(summary: generate_pb2.Summary) -> dict[str, Any]:
    """The summary as the `tierserve` extra field carries it (the text is in the reply already)."""
    return message_fields(summary, skip=frozenset({"text"}))


def _frame(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


@dataclass
class ChunkWriter:
    """The server-sent events of one streamed reply, one event per token, then the closing ones."""

    api: ApiRequest
    _first: bool = field(default=True, init=False)

    def _base(self) -> dict[str, Any]:
        chat = self.api.endpoint is Endpoint.CHAT
        base: dict[str, Any] = {
            "id": self.api.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.api.created,
            "model": self.api.model,
        }
        return base

    def _choice(self, text: str | None, reason: str | None) -> dict[str, Any]:
        if self.api.endpoint is Endpoint.CHAT:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if self._first:
                delta = {"role": "assistant", **delta}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    def token(self, token: generate_pb2.Token) -> bytes:
        """The event of one token: its text, and its index and latency as tierserve measured them."""
        chunk = self._base()
        chunk["choices"] = [self._choice(token.text, None)]
        self._first = False
        if self.api.include_usage:
            chunk["usage"] = None
        chunk["tierserve"] = {"token": {"index": token.index, "id": token.id, "latency_us": token.latency_us}}
        return _frame(chunk)

    def closing(self, summary: generate_pb2.Summary) -> bytes:
        """The finish_reason event, the usage event when asked for, the summary on the last of them,
        and the end of the stream."""
        finish = self._base()
        finish["choices"] = [self._choice(None, finish_reason(summary))]
        self._first = False
        extra = {"tierserve": {"summary": summary_fields(summary)}}
        if not self.api.include_usage:
            return _frame({**finish, **extra}) + SSE_DONE
        usage_chunk = {**self._base(), "choices": [], "usage": usage(summary), **extra}
        return _frame({**finish, "usage": None}) + _frame(usage_chunk) + SSE_DONE


def error_event(error: Mapping[str, Any]) -> bytes:
    """An error after the stream began (its status was sent already): as OpenAI's API does, an
    event with the error object; no [DONE] follows."""
    return _frame({"error": dict(error)})


def reply(api: ApiRequest, summary: generate_pb2.Summary, latencies_us: list[int]) -> dict[str, Any]:
    """The whole reply of a request that was not streamed."""
    if api.endpoint is Endpoint.CHAT:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": summary.text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason(summary),
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": summary.text, "logprobs": None, "finish_reason": finish_reason(summary)}
        kind = "text_completion"
    return {
        "id": api.id,
        "object": kind,
        "created": api.created,
        "model": api.model,
        "choices": [choice],
        "usage": usage(summary),
        "tierserve": {"summary": summary_fields(summary), "token_latencies_us": latencies_us},
    }


# --- models -----------------------------------------------------------------------------------


def model_object(model: str, created: int, listing: router_pb2.ListWorkersResponse) -> dict[str, Any]:
    """The served model as OpenAI lists it, with its tiers (their accuracy cards, and the workers
    serving each) in the `tierserve` extra field."""
    tiers: dict[str, dict[str, Any]] = {}
    for worker in listing.workers:
        # The pool fills the tier in from the config until the worker has described itself.
        entry = tiers.setdefault(
            worker.info.tier, {"tier": worker.info.tier, "accuracy": None, "workers": []}
        )
        if worker.info.HasField("accuracy") and entry["accuracy"] is None:
            entry["accuracy"] = message_fields(worker.info.accuracy)
        entry["workers"].append(
            {
                "worker_id": worker.worker_id,
                "health": _enum_word(router_pb2.WorkerHealth.Name(worker.health), "WorkerHealth"),
                "backend": worker.info.backend,
                "kernel": worker.info.kernel,
                "dtype": worker.info.dtype,
            }
        )
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "tierserve",
        "tierserve": {"policy": listing.policy, "tiers": list(tiers.values())},
    }
