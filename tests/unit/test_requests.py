"""Request validation: every bad field gets INVALID_ARGUMENT naming it; good requests become typed params."""

import math

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tierserve_client.v1 import generate_pb2

from tierserve.domain.config import LimitsConfig, ServiceLevelConfig
from tierserve.domain.errors import InvalidRequest, NoWorkerAvailable, Overloaded, status_for
from tierserve.domain.requests import apply_service_level, validate_generate_request

LIMITS = LimitsConfig(
    max_new_tokens=100, default_max_new_tokens=16, max_stop_strings=2, max_prompt_chars=1000
)


def request(**fields: object) -> generate_pb2.GenerateRequest:
    values: dict[str, object] = {"prompt": "hello"}
    values.update(fields)
    return generate_pb2.GenerateRequest(**values)  # type: ignore[arg-type]


def test_defaults_apply_when_fields_are_unset() -> None:
    params = validate_generate_request(request(), LIMITS)
    assert params.max_new_tokens == 16
    assert params.sampling.greedy
    assert params.sampling.top_p == 1.0
    assert params.stop == ()


def test_explicit_values_are_kept() -> None:
    params = validate_generate_request(
        request(max_new_tokens=100, temperature=0.7, top_p=0.9, top_k=5, seed=42, stop=["\n"]), LIMITS
    )
    assert (params.max_new_tokens, params.sampling.top_k) == (100, 5)
    assert params.sampling.temperature == pytest.approx(0.7)
    assert params.sampling.top_p == pytest.approx(0.9)
    assert params.sampling.seed == 42
    assert params.stop == ("\n",)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 101}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ["a", "b", "c"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"tier": "int9"}, "tier"),
        ({"max_token_latency_ms": -1.0}, "max_token_latency_ms"),
        ({"max_first_token_latency_ms": math.nan}, "max_first_token_latency_ms"),
        ({"max_quality_loss_pct": -5.0}, "max_quality_loss_pct"),
        ({"request_id": "r" * 200}, "request_id"),
        ({"response_prefix_token_ids": [5]}, "response_prefix_token_ids"),  # no prefix to stand for
        ({"response_prefix": "y", "response_prefix_token_ids": [5, -1]}, "response_prefix_token_ids"),
        ({"response_prefix": "y", "response_prefix_token_ids": [5] * 1001}, "response_prefix_token_ids"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_generate_request(request(**fields), LIMITS)
    assert caught.value.field == field
    code, message = status_for(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: ")


@given(
    temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
    top_p=st.floats(allow_nan=True, allow_infinity=True, width=32),
    max_new_tokens=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
def test_any_numbers_either_validate_or_raise_invalid_request(
    temperature: float, top_p: float, max_new_tokens: int
) -> None:
    try:
        params = validate_generate_request(
            request(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens), LIMITS
        )
    except InvalidRequest:
        return
    assert 1 <= params.max_new_tokens <= LIMITS.max_new_tokens
    assert 0 < params.sampling.top_p <= 1 and params.sampling.temperature >= 0


def test_status_table() -> None:
    assert status_for(NoWorkerAvailable("x"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_for(Overloaded("x"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, message = status_for(KeyError("secret detail"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret detail" not in message


def test_service_level_defaults_fill_only_what_the_request_left_unset() -> None:
    defaults = ServiceLevelConfig(
        max_token_latency_ms=50, max_first_token_latency_ms=500, max_quality_loss_pct=2.0, strict=True
    )
    request = generate_pb2.GenerateRequest(prompt="x", max_token_latency_ms=20)
    apply_service_level(request, defaults)
    assert request.max_token_latency_ms == 20 and request.max_first_token_latency_ms == 500
    assert request.max_quality_loss_pct == 2.0 and request.strict
    explicit_zero = generate_pb2.GenerateRequest(prompt="x", max_quality_loss_pct=0.0)
    apply_service_level(explicit_zero, defaults)
    assert explicit_zero.max_quality_loss_pct == 0.0
    # A pinned tier is the caller's accuracy choice: no default tolerance is imposed on it.
    pinned = generate_pb2.GenerateRequest(prompt="x", tier="int4-woq")
    apply_service_level(pinned, defaults)
    assert not pinned.HasField("max_quality_loss_pct")
