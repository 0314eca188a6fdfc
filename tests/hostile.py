"""Hostile GenerateRequests for the property tests (hypothesis), through a router with fake workers
(tests/unit/test_hostile_input.py) or real ones (tests/integration/test_hostile_input_live.py): every
field with huge, control-character and unicode strings, NaN, infinite and extreme numbers, unknown tier
names, and unknown fields on the wire (an unknown enum value arrives as one). What each must end with
is here too."""

from __future__ import annotations

import grpc
from hypothesis import strategies as st
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

from tierserve.domain.tiers import TIER_NAMES

# Statuses a bad request may get: each says what is wrong. Never INTERNAL or UNKNOWN.
CLEAR_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,  # a tolerance no tier meets
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # strict budgets no worker meets; a message over the size limit
}
INT32 = st.integers(-(2**31), 2**31 - 1)
FLOAT32 = st.floats(width=32)  # NaN, infinities, subnormals and extremes included


def odd_text(max_size: int | None = None) -> st.SearchStrategy[str]:
    """Any text, or only control, format, separator, private-use and surrogate-range characters."""
    odd = st.characters(codec="utf-8", categories=("Cc", "Cf", "Zl", "Zp", "Co", "Cs"))
    return st.one_of(st.text(max_size=max_size), st.text(odd, max_size=max_size))


def repeated(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """One character, any, repeated a number of times in the range."""
    return st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(min_size, max_size))


HOSTILE_TEXT = st.one_of(odd_text(), repeated(0, 250_000))
ANY_MAX_NEW_TOKENS = st.one_of(st.none(), INT32)


def unknown_fields() -> st.SearchStrategy[bytes]:
    """Up to three fields the message does not define, as varints (an unknown enum value is one)."""
    field = st.tuples(st.integers(100, 2**29 - 1), st.integers(0, 2**64 - 1)).map(
        lambda f: _varint(f[0] << 3) + _varint(f[1])
    )
    return st.lists(field, max_size=3).map(b"".join)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _with_unknown(request: generate_pb2.GenerateRequest, extra: bytes) -> generate_pb2.GenerateRequest:
    request.MergeFromString(extra)
    return request


def generate_requests(
    prompt: st.SearchStrategy[str] = HOSTILE_TEXT,
    max_new_tokens: st.SearchStrategy[int | None] = ANY_MAX_NEW_TOKENS,
    text: st.SearchStrategy[str] = HOSTILE_TEXT,
) -> st.SearchStrategy[generate_pb2.GenerateRequest]:
    """Requests hostile in every field; `prompt`, `max_new_tokens` and the other strings (`text`) may be
    narrowed, e.g. so that a real model answers each quickly."""
    requests = st.builds(
        generate_pb2.GenerateRequest,
        request_id=text,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        temperature=FLOAT32,
        top_p=st.one_of(st.none(), FLOAT32),
        top_k=INT32,
        seed=st.integers(0, 2**64 - 1),
        stop=st.lists(text, max_size=12),
        max_token_latency_ms=FLOAT32,
        max_first_token_latency_ms=FLOAT32,
        max_quality_loss_pct=st.one_of(st.none(), FLOAT32),
        tier=st.one_of(st.sampled_from(TIER_NAMES), text),
        strict=st.booleans(),
    )
    return st.builds(_with_unknown, requests, unknown_fields())


def accepted_requests(
    prompt_chars: int = 200, max_new_tokens: int = 4
) -> st.SearchStrategy[generate_pb2.GenerateRequest]:
    """Requests at the edges of what is valid, so that they reach a worker's model: odd prompts of up to
    `prompt_chars` characters and stop strings, sampling at extreme temperatures (subnormal to the
    largest float), top-p and top-k, any seed, tiny budgets (strict or not), any tier or none."""
    non_negative = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False, width=32)
    return st.builds(
        generate_pb2.GenerateRequest,
        request_id=odd_text(max_size=64),
        prompt=odd_text(max_size=prompt_chars).filter(bool),
        max_new_tokens=st.integers(1, max_new_tokens),
        temperature=non_negative,
        top_p=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0, exclude_min=True, width=32)),
        top_k=st.integers(0, 2**31 - 1),
        seed=st.integers(0, 2**64 - 1),
        stop=st.lists(odd_text(max_size=8).filter(bool), max_size=8),
        max_token_latency_ms=non_negative,
        max_first_token_latency_ms=non_negative,
        max_quality_loss_pct=st.one_of(st.none(), non_negative),
        tier=st.sampled_from(("", *TIER_NAMES)),
        strict=st.booleans(),
    )


def outcome(
    stub: router_pb2_grpc.RouterStub, request: generate_pb2.GenerateRequest, timeout_s: float
) -> grpc.StatusCode:
    """How the call ended: OK with a whole stream (tokens, then the summary), or a status that says why."""
    try:
        responses = list(stub.Generate(request, timeout=timeout_s))
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        assert error.details(), "a refusal says why"
        return error.code()
    assert responses and responses[-1].HasField("summary"), "a served stream ends with its summary"
    assert all(r.HasField("token") for r in responses[:-1])
    return grpc.StatusCode.OK
