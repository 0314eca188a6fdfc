"""Validation of chat requests: a prompt or messages, never both nor neither; known roles, content,
and the limits; every refusal INVALID_ARGUMENT naming its field, at the router before any worker."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tierserve_client.v1 import generate_pb2

from tests.unit.fake_pool import FakeWorker, running_pool
from tierserve.domain.config import ConfigError, LimitsConfig, ModelConfig, parse_config
from tierserve.domain.errors import InvalidRequest, status_for
from tierserve.domain.requests import (
    CHAT_MARKUP_CHARS,
    ChatMessage,
    prompt_chars,
    validate_generate_request,
)

LIMITS = LimitsConfig(max_new_tokens=100, default_max_new_tokens=16, max_prompt_chars=100, max_messages=3)


def chat(*turns: tuple[str, str], **fields: object) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
    for role, content in turns:
        request.messages.add(role=role, content=content)
    return request


def test_a_conversation_becomes_typed_messages() -> None:
    request = chat(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."), response_prefix="So")
    params = validate_generate_request(request, LIMITS)
    assert params.messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi?"),
        ChatMessage("assistant", "Hello."),
    )
    assert params.prompt == "" and params.response_prefix == "So"
    assert params.max_new_tokens == 16
    # A prompt request is no chat, and keeps its prefix too.
    plain = validate_generate_request(generate_pb2.GenerateRequest(prompt="x", response_prefix="y"), LIMITS)
    assert (plain.prompt, plain.messages, plain.response_prefix) == ("x", (), "y")


@pytest.mark.parametrize(
    ("request_", "field", "says"),
    [
        (chat(("user", "Hi"), prompt="Hi"), "messages", "either prompt or messages, not both"),
        (generate_pb2.GenerateRequest(), "prompt", "must not be empty"),
        (chat(("user", "Hi"), ("robot", "Beep")), "messages[1].role", "unknown role 'robot'"),
        (chat(("User", "Hi")), "messages[0].role", "known roles: system, user, assistant"),
        (chat(("", "Hi")), "messages[0].role", "unknown role ''"),
        (chat(("system", "Be brief."), ("user", "")), "messages[1].content", "must not be empty"),
        (chat(*[("user", "Hi")] * 4), "messages", "4 messages, more than the limit of 3"),
        (chat(("user", "x" * 60), ("user", "y" * 41)), "messages", "101 characters in all"),
        (generate_pb2.GenerateRequest(prompt="x" * 101), "prompt", "more than the limit of 100"),
        (chat(("user", "Hi"), response_prefix="z" * 101), "response_prefix", "more than the limit of 100"),
    ],
)
def test_bad_chat_requests_are_refused_naming_the_field(
    request_: generate_pb2.GenerateRequest, field: str, says: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_generate_request(request_, LIMITS)
    assert caught.value.field == field
    code, message = status_for(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: ") and says in message


def test_a_conversation_at_the_limits_is_accepted() -> None:
    request = chat(("system", "x" * 40), ("user", "y" * 40), ("assistant", "z" * 20))
    assert len(validate_generate_request(request, LIMITS).messages) == 3


def test_the_router_estimates_prompt_length_from_messages_and_prefix() -> None:
    request = chat(("system", "abcd"), ("user", "efghij"), response_prefix="kl")
    assert prompt_chars(request) == 4 + 6 + 2 * CHAT_MARKUP_CHARS + 2
    assert prompt_chars(generate_pb2.GenerateRequest(prompt="abc", response_prefix="de")) == 5


def test_the_config_takes_one_chat_template_and_a_message_limit() -> None:
    assert LimitsConfig().max_messages == 256
    assert ModelConfig(chat_template="{{ messages }}").chat_template == "{{ messages }}"
    both = {
        "model": {"chat_template": "x", "chat_template_file": "t.jinja"},
        "placement": {"tiers": ["fp32"]},
    }
    with pytest.raises(ConfigError, match="set chat_template or chat_template_file, not both"):
        parse_config(both)
    with pytest.raises(ConfigError, match="max_messages"):
        parse_config({"limits": {"max_messages": 0}, "placement": {"tiers": ["fp32"]}})


def test_the_router_refuses_a_bad_conversation_before_any_worker_sees_it() -> None:
    async def scenario() -> None:
        worker = FakeWorker("bf16-0", "bf16")
        async with running_pool([worker]) as pool:
            bad = chat(("system", "Be brief."), ("wizard", "Abracadabra"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pool.stub.Generate(bad, timeout=10).read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith("messages[1].role: unknown role 'wizard'")
            both = chat(("user", "Hi"), prompt="Hi")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pool.stub.Generate(both, timeout=10).read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert worker.requests == []
            # A good conversation reaches the worker as sent.
            good = chat(("system", "Be brief."), ("user", "Hi?"), max_new_tokens=2)
            replies = [r async for r in pool.stub.Generate(good, timeout=10)]
            assert replies[-1].HasField("summary") and len(replies) == 3
            assert [(m.role, m.content) for m in worker.requests[0].messages] == [
                ("system", "Be brief."),
                ("user", "Hi?"),
            ]
            assert worker.requests[0].prompt == ""

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
