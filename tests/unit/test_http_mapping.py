"""OpenAI request bodies into GenerateRequests and the router's stream back into OpenAI's replies,
byte for byte where the format is fixed (router/http/mapping.py, router/http/errors.py)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2, worker_pb2

from tierserve.domain.errors import InvalidRequest
from tierserve.router.http.errors import from_status
from tierserve.router.http.mapping import (
    ApiRequest,
    ChunkWriter,
    Endpoint,
    UnknownModel,
    finish_reason,
    header_name,
    model_object,
    parse_request,
    reply,
    summary_fields,
)

MODEL = "SmolLM2-135M-Instruct"


def parse(body: Any, endpoint: Endpoint = Endpoint.CHAT, headers: dict[str, str] | None = None) -> ApiRequest:
    return parse_request(endpoint, body, headers or {}, MODEL, "req1", 1700000000)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}


def refused_field(
    body: Any, endpoint: Endpoint = Endpoint.CHAT, headers: dict[str, str] | None = None
) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse(body, endpoint, headers)
    return caught.value.field


def test_a_chat_body_becomes_messages_sampling_and_stop() -> None:
    api = parse(
        chat(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Capital "}, {"type": "text", "text": "of France?"}]},  # noqa: E501
            ],
            max_completion_tokens=12,
            temperature=0.0,
            top_p=0.5,
            seed=7,
            stop="\n",
            stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    request = api.request
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."),
        ("user", "Capital of France?"),
    ]
    assert not request.prompt and request.request_id == "req1"
    assert request.max_new_tokens == 12 and api.max_tokens_param == "max_completion_tokens"
    assert request.temperature == 0.0 and request.top_p == 0.5 and request.seed == 7
    assert list(request.stop) == ["\n"]
    assert api.stream and api.include_usage and api.id == "chatcmpl-req1"


def test_openai_defaults_sample_at_temperature_one_and_leave_limits_to_the_router() -> None:
    request = parse(chat()).request
    assert request.temperature == 1.0
    assert not request.HasField("max_new_tokens") and not request.HasField("top_p")
    completion = parse({"model": MODEL, "prompt": ["Once upon"], "stop": ["a", "b"]}, Endpoint.COMPLETIONS)
    assert completion.request.prompt == "Once upon" and list(completion.request.stop) == ["a", "b"]
    assert completion.id == "cmpl-req1" and not completion.stream


def test_the_service_level_comes_from_the_body_or_the_headers_body_first() -> None:
    headers = {
        header_name("max_token_latency_ms"): "25",
        "x-tierserve-max-first-token-latency-ms": "400",
        "X-Tierserve-Tier": "bf16",
        "X-Tierserve-Strict": "true",
        "X-Tierserve-Timeout-Ms": "1500",
    }
    assert header_name("max_first_token_latency_ms") == "X-Tierserve-Max-First-Token-Latency-Ms"
    from_headers = parse(chat(), headers=headers)
    request = from_headers.request
    assert request.max_token_latency_ms == 25 and request.max_first_token_latency_ms == 400
    assert request.tier == "bf16" and request.strict and from_headers.timeout_s == 1.5
    assert not request.HasField("max_quality_loss_pct")
    body = parse(
        chat(max_token_latency_ms=10, max_quality_loss_pct=0.5, tier="fp32", strict=False), headers=headers
    )
    assert body.request.max_token_latency_ms == 10 and body.request.max_quality_loss_pct == 0.5
    assert body.request.tier == "fp32" and not body.request.strict


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (chat(n=2), "n"),
        (chat(temperature="hot"), "temperature"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(max_tokens=1.5), "max_tokens"),
        (chat(seed=-1), "seed"),
        (chat(stop=[1]), "stop"),
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (chat(logprobs=True), "logprobs"),
        (chat(presence_penalty=0.5), "presence_penalty"),
        (chat(response_format={"type": "json_object"}), "response_format"),
        (chat(messages=[]), "messages"),
        (chat(messages=["hi"]), "messages[0]"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content[0]"),
        (chat(max_token_latency_ms="fast"), "max_token_latency_ms"),
        (chat(strict="yes"), "strict"),
        (chat(timeout_ms=0), "timeout_ms"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "model"),
        ([], "body"),
    ],
)
def test_malformed_or_unsupported_fields_are_refused_by_name(body: Any, field: str) -> None:
    assert refused_field(body) == field


def test_completions_take_one_text_prompt() -> None:
    assert refused_field({"model": MODEL, "prompt": ["a", "b"]}, Endpoint.COMPLETIONS) == "prompt"
    assert refused_field({"model": MODEL, "prompt": [1, 2, 3]}, Endpoint.COMPLETIONS) == "prompt"
    assert refused_field({"model": MODEL, "prompt": "a", "echo": True}, Endpoint.COMPLETIONS) == "echo"


def test_bad_header_values_name_the_header() -> None:
    for name, value in (("X-Tierserve-Max-Token-Latency-Ms", "soon"), ("X-Tierserve-Strict", "maybe")):
        assert refused_field(chat(), headers={name: value}) == name


def test_another_model_is_unknown() -> None:
    with pytest.raises(UnknownModel) as caught:
        parse(chat(model="gpt-4o"))
    assert caught.value.model == "gpt-4o" and MODEL in str(caught.value)


def summary(**fields: Any) -> generate_pb2.Summary:
    values: dict[str, Any] = {
        "request_id": "req1",
        "worker_id": "bf16-0",
        "tier": "bf16",
        "prompt_tokens": 9,
        "generated_tokens": 2,
        "ttft_us": 40000,
        "tpot_mean_us": 12000,
        "budget_met": True,
        "finish_reason": generate_pb2.FINISH_REASON_EOS,
        "routing_reason": "slo: most accurate eligible",
        "text": "Paris.",
        **fields,
    }
    return generate_pb2.Summary(**values)


def test_stream_events_are_framed_byte_for_byte() -> None:
    api = parse(chat(stream=True))
    writer = ChunkWriter(api)
    first = writer.token(generate_pb2.Token(text="Par", id=12, index=0, latency_us=40000))
    second = writer.token(generate_pb2.Token(text="is.", id=13, index=1, latency_us=12000))
    head = (
        '{"id":"chatcmpl-req1","object":"chat.completion.chunk","created":1700000000,'
        '"model":"SmolLM2-135M-Instruct",'
    )
    assert (
        first
        == (
            "data: " + head + '"choices":[{"index":0,"delta":{"role":"assistant","content":"Par"},'
            '"logprobs":null,"finish_reason":null}],"tierserve":{"token":{"index":0,"id":12,"latency_us":40000}}}\n\n'
        ).encode()
    )
    assert (
        second
        == (
            "data: " + head + '"choices":[{"index":0,"delta":{"content":"is."},'
            '"logprobs":null,"finish_reason":null}],"tierserve":{"token":{"index":1,"id":13,"latency_us":12000}}}\n\n'
        ).encode()
    )
    closing = writer.closing(summary())
    events = closing.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""] and len(events) == 3
    last = json.loads(events[0].removeprefix(b"data: "))
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert last["tierserve"]["summary"]["worker_id"] == "bf16-0"
    assert (
        last["tierserve"]["summary"]["finish_reason"] == "eos" and "text" not in last["tierserve"]["summary"]
    )


def test_usage_comes_last_when_asked_for_and_carries_the_summary() -> None:
    api = parse(chat(stream=True, stream_options={"include_usage": True}))
    writer = ChunkWriter(api)
    assert json.loads(writer.token(generate_pb2.Token(text="a"))[6:])["usage"] is None
    events = writer.closing(summary(finish_reason=generate_pb2.FINISH_REASON_LENGTH)).split(b"\n\n")
    finish, totals = (json.loads(e.removeprefix(b"data: ")) for e in events[:2])
    assert events[2:] == [b"data: [DONE]", b""]
    assert finish["choices"][0]["finish_reason"] == "length" and finish["usage"] is None
    assert "tierserve" not in finish
    assert totals["choices"] == [] and totals["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "total_tokens": 11,
    }
    assert totals["tierserve"]["summary"]["routing_reason"] == "slo: most accurate eligible"


def test_completion_chunks_and_whole_replies() -> None:
    api = parse({"model": MODEL, "prompt": "x", "stream": True}, Endpoint.COMPLETIONS)
    chunk = json.loads(ChunkWriter(api).token(generate_pb2.Token(text=" y", index=0))[6:])
    assert chunk["object"] == "text_completion"
    assert chunk["choices"] == [{"index": 0, "text": " y", "logprobs": None, "finish_reason": None}]
    whole = reply(parse(chat()), summary(), [40000, 12000])
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Paris.", "refusal": None}
    assert whole["usage"]["total_tokens"] == 11
    assert whole["tierserve"]["token_latencies_us"] == [40000, 12000]
    assert whole["tierserve"]["summary"]["ttft_us"] == 40000


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (generate_pb2.FINISH_REASON_EOS, "stop"),
        (generate_pb2.FINISH_REASON_STOP, "stop"),
        (generate_pb2.FINISH_REASON_LENGTH, "length"),
        (generate_pb2.FINISH_REASON_CONTEXT, "length"),
    ],
)
def test_finish_reasons(reason: int, expected: str) -> None:
    assert finish_reason(summary(finish_reason=reason)) == expected


def test_summary_fields_keep_numbers_and_name_enums() -> None:
    fields = summary_fields(summary(failed_workers=["fp32-0"], failovers=1, total_time_us=2**40))
    assert fields["total_time_us"] == 2**40 and fields["failed_workers"] == ["fp32-0"]
    assert fields["finish_reason"] == "eos" and fields["budget_met"] is True


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
    ],
)
def test_statuses_map_to_http(code: grpc.StatusCode, status: int, kind: str) -> None:
    error = from_status(code, "why")
    assert (error.status, error.type, error.code) == (status, kind, code.name.lower())
    assert error.body() == {
        "error": {"message": "why", "type": kind, "param": None, "code": code.name.lower()}
    }


def test_invalid_fields_are_named_as_the_client_sent_them_and_hints_become_retry_after() -> None:
    error = from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens: is 900, above the limit",
        rename={"max_new_tokens": "max_tokens"},
    )
    assert error.param == "max_tokens" and error.message == "max_tokens: is 900, above the limit"
    assert (
        from_status(grpc.StatusCode.INVALID_ARGUMENT, "messages[1].role: unknown").param == "messages[1].role"
    )
    busy = from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("retry-after-ms", "1500"),))
    assert busy.headers == {"Retry-After": "2", "retry-after-ms": "1500"}
    assert from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full").headers["Retry-After"] == "1"
    assert from_status(grpc.StatusCode.UNAVAILABLE, "none healthy").headers == {}


def test_the_model_lists_its_tiers_with_their_accuracy_cards() -> None:
    listing = router_pb2.ListWorkersResponse(policy="slo")
    for worker_id, tier, loss in (
        ("bf16-0", "bf16", 0.01),
        ("bf16-1", "bf16", 0.01),
        ("int4-0", "int4-woq", 0.6),
    ):
        status = listing.workers.add(worker_id=worker_id, health=router_pb2.WORKER_HEALTH_SERVING)
        status.info.tier = tier
        status.info.kernel = "ipex"
        status.info.accuracy.CopyFrom(worker_pb2.AccuracyCard(perplexity_delta_pct=loss, measured=True))
    model = model_object(MODEL, 5, listing)
    assert model["id"] == MODEL and model["object"] == "model" and model["owned_by"] == "tierserve"
    tiers = model["tierserve"]["tiers"]
    assert [t["tier"] for t in tiers] == ["bf16", "int4-woq"]
    assert [w["worker_id"] for w in tiers[0]["workers"]] == ["bf16-0", "bf16-1"]
    assert tiers[1]["accuracy"]["perplexity_delta_pct"] == pytest.approx(0.6)
    assert tiers[0]["workers"][0]["health"] == "serving" and model["tierserve"]["policy"] == "slo"
