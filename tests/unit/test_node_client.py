"""The Node.js example client against an in-process router over a fake worker (skipped without node)."""

from __future__ import annotations

import asyncio
import re

from tests.node_client import node_client_command
from tests.unit.fake_pool import FakeWorker, running_pool


def test_node_client_prints_tokens_with_latency_and_the_summary() -> None:
    async def scenario() -> tuple[int, str, str]:
        async with running_pool([FakeWorker("bf16-0", "bf16", ttft_us=23_000, tpot_us=7_000)]) as pool:
            command = node_client_command(pool.address, "--max-new-tokens", "3", "Hello")
            # Run without blocking the loop: the router and worker serve from it.
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=60)
            return process.returncode or 0, out.decode(), err.decode()

    code, out, err = asyncio.run(scenario())
    assert code == 0, err
    tokens = re.findall(r"^\s*(\d+)\s+([\d.]+) ms\s+(\".*\")$", out, flags=re.MULTILINE)
    assert [(i, ms, text) for i, ms, text in tokens] == [
        ("0", "23.0", '" x"'),
        ("1", "7.0", '" x"'),
        ("2", "7.0", '" x"'),
    ]
    assert "summary: worker bf16-0 (bf16), 3 tokens" in out
    assert "text: Hello x x x" in out


def test_node_client_reports_a_status_and_fails() -> None:
    async def scenario() -> tuple[int, str]:
        async with running_pool([FakeWorker("bf16-0", "bf16")]) as pool:
            command = node_client_command(pool.address, "--max-new-tokens", "0", "Hello")
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            _, err = await asyncio.wait_for(process.communicate(), timeout=60)
            return process.returncode or 0, err.decode()

    code, err = asyncio.run(scenario())
    assert code == 1
    assert "error: INVALID_ARGUMENT: max_new_tokens" in err


def test_node_client_sends_a_chat_with_a_system_message() -> None:
    worker = FakeWorker("bf16-0", "bf16")

    async def scenario() -> tuple[int, str, str]:
        async with running_pool([worker]) as pool:
            command = node_client_command(
                pool.address, "--max-new-tokens", "2", "--system", "Be brief.", "--chat", "Hi there"
            )
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=60)
            return process.returncode or 0, out.decode(), err.decode()

    code, out, err = asyncio.run(scenario())
    assert code == 0, err
    request = worker.requests[0]
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Hi there")]
    assert request.prompt == ""
    assert "user: Hi there\nassistant:  x x" in out
