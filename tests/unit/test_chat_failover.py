"""Failover of a chat request through a real router in front of fake workers: the next worker gets the
same conversation with the text already streamed as the reply's prefix (so it continues the
assistant's turn), and the client's stream has no seam."""

from __future__ import annotations

import asyncio

from tierserve_client.v1 import generate_pb2

from tests.unit.fake_pool import FakeWorker, running_pool
from tierserve.router.failover import StreamProgress

TURNS = (("system", "Answer briefly."), ("user", "Count for me."))


def chat_request(**fields: object) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
    for role, content in TURNS:
        request.messages.add(role=role, content=content)
    return request


def test_a_chat_stream_resumed_elsewhere_continues_the_assistant_turn() -> None:
    async def scenario() -> None:
        # fp32 (preferred) fails after two tokens; bf16 takes over. The fake counts the words of the
        # prompt and prefix: a chat has no prompt, so the uninterrupted text is " w0 w1 w2 ...".
        workers = [
            FakeWorker("fp32-0", "fp32", fail_after=2, count_words=True),
            FakeWorker("bf16-0", "bf16", cores=[1], count_words=True),
        ]
        async with running_pool(workers) as pool:
            request = chat_request(max_new_tokens=5, request_id="c1")
            responses = [r async for r in pool.stub.Generate(request, timeout=10)]
            tokens, summary = [r.token for r in responses[:-1]], responses[-1].summary
            expected = " w0 w1 w2 w3 w4"
            assert [t.index for t in tokens] == list(range(5))
            assert "".join(t.text for t in tokens) == expected and summary.text == expected
            assert (summary.worker_id, summary.failovers, summary.resumed_after_tokens) == ("bf16-0", 1, 2)
            first, resumed = workers[0].requests[0], workers[1].requests[-1]
            assert first.response_prefix == ""
            # The same conversation, no prompt: the streamed text is the start of the reply.
            assert [(m.role, m.content) for m in resumed.messages] == list(TURNS)
            assert resumed.prompt == ""
            assert (resumed.response_prefix, resumed.max_new_tokens) == (" w0 w1", 3)

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_a_callers_own_prefix_stays_in_front_of_the_streamed_text() -> None:
    request = chat_request(max_new_tokens=4, response_prefix="Sure:", temperature=0.5, seed=9)
    progress = StreamProgress(request, 4)
    assert progress.worker_request() is request  # nothing streamed: sent again unchanged
    for token_id, text in ((11, " one"), (12, " two")):
        progress.relay_token(generate_pb2.Token(text=text, id=token_id), 1.0)
    resumed = progress.worker_request()
    assert resumed.response_prefix == "Sure: one two"
    # The ids of the streamed tokens go along: they stand for the end of the prefix.
    assert list(resumed.response_prefix_token_ids) == [11, 12]
    assert list(resumed.messages) == list(request.messages) and resumed.max_new_tokens == 2
    assert resumed.seed != 9  # a sampled resume draws from its own seed
    assert request.response_prefix == "Sure:"  # the client's request itself is untouched
