"""Chat through the Python SDK (sync and asyncio) and `tierserve generate --chat / --system`, against a
real router over fake workers that record what they receive."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from tierserve_client import AsyncClient, ChatMessage, Client, ClientOptions, GenerateParams

from tests.unit.fake_pool import FakeWorker, running_pool
from tierserve.cli import main


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


def received(worker: FakeWorker, index: int = -1) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in worker.requests[index].messages]


def test_params_build_a_chat_request_from_messages_or_mappings() -> None:
    params = GenerateParams(max_new_tokens=4, response_prefix="Well,")
    request = params.to_request([ChatMessage.system("Be brief."), {"role": "user", "content": "Hi?"}])
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Hi?")]
    assert request.prompt == "" and request.response_prefix == "Well," and request.max_new_tokens == 4
    assert ChatMessage.assistant("Hello.") == ChatMessage("assistant", "Hello.")
    plain = params.to_request("The capital of France is")
    assert plain.prompt == "The capital of France is" and not plain.messages
    with pytest.raises(ValueError, match="needs content"):
        params.to_request([{"role": "user"}])


def test_sync_and_async_clients_send_conversations() -> None:
    async def scenario() -> None:
        worker = FakeWorker("fp32-0", "fp32")
        async with running_pool([worker]) as pool:
            conversation = [ChatMessage.system("Be brief."), ChatMessage.user("What is 2 + 2?")]

            def use_sync_client() -> None:
                with Client(ClientOptions(pool.address)) as client:
                    result = client.generate(conversation, GenerateParams(max_new_tokens=2))
                    assert result.text == " x x" and result.summary.worker_id == "fp32-0"

            await asyncio.to_thread(use_sync_client)
            assert received(worker) == [("system", "Be brief."), ("user", "What is 2 + 2?")]
            async with AsyncClient(ClientOptions(pool.address)) as client:
                stream = client.stream(
                    [{"role": "user", "content": "And 3 + 3?"}], GenerateParams(max_new_tokens=3)
                )
                tokens = [token async for token in stream]
                assert len(tokens) == 3 and stream.summary is not None
            assert received(worker) == [("user", "And 3 + 3?")] and worker.requests[-1].prompt == ""

    run(scenario)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--chat"], [("user", "What is the capital of France?")]),
        (
            ["--system", "Answer in one word."],  # --system alone makes a chat
            [("system", "Answer in one word."), ("user", "What is the capital of France?")],
        ),
        (
            ["--chat", "--system", "Answer in one word."],
            [("system", "Answer in one word."), ("user", "What is the capital of France?")],
        ),
    ],
)
def test_cli_generate_chat_sends_messages(
    flags: list[str], expected: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    worker = FakeWorker("fp32-0", "fp32", ttft_us=21_000)

    async def scenario() -> None:
        async with running_pool([worker]) as pool:
            argv = ["generate", "What is the capital of France?", *flags, "--address", pool.address]
            assert await asyncio.to_thread(main, [*argv, "--max-new-tokens", "2", "--retries", "0"]) == 0

    run(scenario)
    assert received(worker) == expected and worker.requests[0].prompt == ""
    out = capsys.readouterr().out
    assert "21.0 ms" in out and "user: What is the capital of France?" in out
    assert "assistant:  x x" in out and "fp32-0 / fp32" in out


def test_cli_generate_without_chat_sends_a_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    worker = FakeWorker("fp32-0", "fp32")

    async def scenario() -> None:
        async with running_pool([worker]) as pool:
            argv = [
                "generate",
                "The capital of France is",
                "--address",
                pool.address,
                "--max-new-tokens",
                "1",
            ]
            assert await asyncio.to_thread(main, argv) == 0

    run(scenario)
    assert worker.requests[0].prompt == "The capital of France is" and not worker.requests[0].messages
    assert "text: The capital of France is x" in capsys.readouterr().out
