"""Hostile input through the router to real workers of the default model (the session pool): property
tests (hypothesis) over every request field, a bounded number of examples each, every call with a
deadline. Each request ends with a whole stream or a clear status (never UNKNOWN or INTERNAL, never a
hang), and the pool serves a normal request afterwards with every worker still serving. The strategies
are tests/hostile.py's, also used against fake workers in tests/unit/test_hostile_input.py."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc

from tests.hostile import CLEAR_CODES, accepted_requests, generate_requests, odd_text, outcome, repeated
from tests.integration.conftest import LivePool
from tierserve.rpc.calls import list_workers

pytestmark = pytest.mark.integration

EXAMPLES = 30
# A hang shows as DEADLINE_EXCEEDED: far longer than any of these requests takes on two shared cores.
CALL_TIMEOUT_S = 120.0
# Prompts a real model answers quickly: short ones, or one character repeated 40,000 times or more.
# For most characters that is more than the default model's 8,192-token context (the tokenizer takes
# at most 4 of them a token), refused after tokenizing, without a forward pass; runs of a few (spaces,
# '#', '-', '=', '*': up to 80 a token) stay within it, at most some 2,500 tokens: a prefill of seconds.
# Past 200,000 characters (limits.max_prompt_chars) the router refuses them unread.
QUICK_PROMPTS = st.one_of(odd_text(max_size=200), repeated(40_000, 260_000))
# Up to 4 new tokens, or numbers no limit allows.
FEW_OR_INVALID_TOKENS = st.one_of(st.integers(1, 4), st.sampled_from([-(2**31), -1, 0, 257, 2**31 - 1]))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def stub(live_pool: LivePool) -> Iterator[router_pb2_grpc.RouterStub]:
    # The client may send more than the router takes, so the router's own size limit is what is tested.
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(live_pool.router_address, options=options) as channel:
        yield router_pb2_grpc.RouterStub(channel)


@SETTINGS
@given(request=generate_requests(prompt=QUICK_PROMPTS, max_new_tokens=FEW_OR_INVALID_TOKENS))
def test_hostile_requests_get_a_stream_or_a_clear_status(
    stub: router_pb2_grpc.RouterStub, request: generate_pb2.GenerateRequest
) -> None:
    code = outcome(stub, request, CALL_TIMEOUT_S)
    assert code == grpc.StatusCode.OK or code in CLEAR_CODES, f"{code} for {request!r:.300}"


@SETTINGS
@given(request=accepted_requests())
def test_requests_at_the_edge_of_valid_reach_the_model_and_end_clearly(
    stub: router_pb2_grpc.RouterStub, request: generate_pb2.GenerateRequest
) -> None:
    # Valid in every field, so only a budget or tolerance nothing meets may refuse them.
    code = outcome(stub, request, CALL_TIMEOUT_S)
    assert code == grpc.StatusCode.OK or code in CLEAR_CODES - {grpc.StatusCode.INVALID_ARGUMENT}, (
        f"{code} for {request!r:.300}"
    )


def test_the_pool_serves_normally_after_all_of_it(
    live_pool: LivePool, stub: router_pb2_grpc.RouterStub
) -> None:
    request = generate_pb2.GenerateRequest(prompt="The weather today is", max_new_tokens=4)
    responses = list(stub.Generate(request, timeout=CALL_TIMEOUT_S))
    assert responses[-1].HasField("summary") and 1 <= responses[-1].summary.generated_tokens <= 4
    workers = list_workers(live_pool.router_address).workers
    assert workers and all(w.health == router_pb2.WORKER_HEALTH_SERVING for w in workers), [
        (w.worker_id, w.health) for w in workers
    ]
