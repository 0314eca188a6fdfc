"""Chat on the default (instruction-tuned) model through a real router and worker: a conversation is
rendered with the model's chat template and answered sensibly; a reply given a prefix continues it
inside the assistant's turn (as a failover resumes it); `tierserve generate --chat` and the demo of
`tierserve up --demo` (`make run`) speak it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

from tests.integration.default_pool import default_model_config, stop_pool
from tests.integration.test_launcher import CLI, START_TIMEOUT_S, wait_for
from tests.tiny_model import default_model_dir

pytestmark = pytest.mark.integration

SYSTEM = "Answer in one short sentence."
QUESTION = "What is the capital of France?"
NEW_TOKENS = 32


@dataclass
class ChatPool:
    address: str
    # The launcher's output: the worker table, the demo's chat, "serving on ...".
    log: Path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatPool]:
    """`tierserve up --demo` (as `make run`) with one bf16 worker on the default model, once serving."""
    tmp_path = tmp_path_factory.mktemp("chat-pool")
    config = default_model_config(tmp_path / "pool.toml", [("chat-0", "bf16")])
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = subprocess.Popen(
        [*CLI, "up", "--config", str(config), "--run-dir", str(run_dir), "--demo"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        # "serving on" follows the demo's answer.
        wait_for(lambda: "serving on" in log.read_text(), launcher, log, START_TIMEOUT_S)
        yield ChatPool((run_dir / "router.address").read_text().strip(), log)
    finally:
        assert stop_pool(launcher) == 0


@pytest.fixture
def address(pool: ChatPool) -> str:
    return pool.address


@pytest.fixture
def router(address: str) -> Iterator[router_pb2_grpc.RouterStub]:
    with grpc.insecure_channel(address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def conversation(**fields: object) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(max_new_tokens=NEW_TOKENS, **fields)  # type: ignore[arg-type]
    request.messages.add(role="system", content=SYSTEM)
    request.messages.add(role="user", content=QUESTION)
    return request


def generate(
    router: router_pb2_grpc.RouterStub, request: generate_pb2.GenerateRequest
) -> tuple[list[generate_pb2.Token], generate_pb2.Summary]:
    responses = list(router.Generate(request, timeout=180))
    assert responses and responses[-1].HasField("summary"), "a stream must end with a summary"
    return [r.token for r in responses[:-1]], responses[-1].summary


def templated_tokens() -> int:
    """Prompt tokens of the conversation as the model's own template tokenizes it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_a_chat_is_answered_in_the_assistants_turn(router: router_pb2_grpc.RouterStub) -> None:
    tokens, summary = generate(router, conversation())
    text = "".join(t.text for t in tokens)
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert all(t.latency_us > 0 for t in tokens)
    assert "Paris" in text and summary.text == text
    # The answer ends its turn itself (the end-of-turn token), well within the budget: an answer,
    # not a continuation of the question.
    assert summary.finish_reason == generate_pb2.FINISH_REASON_EOS, text
    assert "<|im_" not in text and "user" not in text.lower()
    # The worker tokenized exactly what the model's template makes of the conversation.
    assert summary.prompt_tokens == templated_tokens()
    assert summary.worker_id == "chat-0" and summary.tier == "bf16" and summary.routing_reason
    assert summary.generated_tokens == len(tokens) and summary.ttft_us == tokens[0].latency_us


def test_a_prefixed_reply_continues_the_assistant_turn(router: router_pb2_grpc.RouterStub) -> None:
    """What a failover sends: the text already streamed as the reply's prefix. Greedy, on the same
    worker, the continuation is the rest of the uninterrupted answer."""
    tokens, whole = generate(router, conversation())
    assert len(tokens) > 4
    prefix = "".join(t.text for t in tokens[:3])
    _, rest = generate(router, conversation(response_prefix=prefix))
    assert prefix + rest.text == whole.text
    assert rest.finish_reason == generate_pb2.FINISH_REASON_EOS


def test_bad_conversations_are_refused_naming_the_field(router: router_pb2_grpc.RouterStub) -> None:
    unknown = generate_pb2.GenerateRequest()
    unknown.messages.add(role="narrator", content="Once upon a time")
    with pytest.raises(grpc.RpcError) as caught:
        generate(router, unknown)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("messages[0].role: unknown role 'narrator'")
    both = conversation(prompt="The capital of France is")
    with pytest.raises(grpc.RpcError) as caught:
        generate(router, both)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("messages: set either prompt or messages")


def test_cli_generate_chat(address: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tierserve.cli", "generate", "--chat", QUESTION, "--system", SYSTEM,
         "--address", address, "--max-new-tokens", str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" ms  ") >= 3  # tokens with their latency
    assert f"system: {SYSTEM}" in done.stdout and f"user: {QUESTION}" in done.stdout
    answer = next(line for line in done.stdout.splitlines() if line.startswith("assistant:"))
    assert "Paris" in answer
    assert "chat-0 / bf16" in done.stdout  # the summary table


def test_the_demo_asks_the_instruct_model_a_question_as_a_chat(pool: ChatPool) -> None:
    log = pool.log.read_text(errors="replace")
    assert "demo chat" in log and "What is the capital of France?" in log
    assert "system: Answer in one short sentence." in log
    answer = next(line for line in log.splitlines() if line.startswith("assistant:"))
    assert "Paris" in answer, log
