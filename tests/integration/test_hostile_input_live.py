"""Hostile input through the router to real workers of the default model (the session pool).

Explicit edge cases first (tests/hostile.py's `edge_cases`: the float32 extremes in every float field,
every length limit exactly and one past it, empty fields, chat messages), each with the statuses it may
end with; then property tests (hypothesis) over every request field, a bounded number of examples each.
Every call has a deadline and ends with a whole stream or a clear status (never UNKNOWN or INTERNAL,
never a hang). Right after every request, edge case or example, the router and every worker answer
their own health check SERVING and every worker is still the process it was (none crashed and was
restarted); the worker that served an edge case also serves a plain request straight away. What the
server answered each edge case is printed as a table at the end of the module (visible with -s).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2_grpc

from tests.hostile import (
    CLEAR_CODES,
    Answer,
    EdgeCase,
    accepted_requests,
    answer,
    edge_cases,
    generate_requests,
    odd_text,
    repeated,
)
from tests.integration.conftest import LivePool, pool_config_data
from tests.integration.default_pool import worker_pid
from tierserve.domain.config import parse_config
from tierserve.rpc.calls import is_serving, list_workers

pytestmark = pytest.mark.integration

EXAMPLES = 30
# A hang shows as DEADLINE_EXCEEDED: far longer than any of these requests takes on two shared cores.
CALL_TIMEOUT_S = 120.0
# A health check waits at most this; a worker busy with a long prefill still answers at once.
HEALTH_TIMEOUT_S = 10.0
# Prompts a real model answers quickly: short ones, or one character repeated 40,000 times or more.
# For most characters that is more than the default model's 8,192-token context (the tokenizer takes
# at most 4 of them a token), refused after tokenizing, without a forward pass; runs of a few (spaces,
# '#', '-', '=', '*': up to 64 a token) stay within it, at most some 3,100 tokens: a prefill of seconds.
# Past 200,000 characters (limits.max_prompt_chars) the router refuses them unread.
QUICK_PROMPTS = st.one_of(odd_text(max_size=200), repeated(40_000, 260_000))
# Up to 4 new tokens, or numbers no limit allows.
FEW_OR_INVALID_TOKENS = st.one_of(st.integers(1, 4), st.sampled_from([-(2**31), -1, 0, 257, 2**31 - 1]))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The session pool's limits (conftest.py): the edges are theirs.
EDGE_CASES = edge_cases(parse_config(pool_config_data()).limits)
# How long a refusal's message may be in the printed table.
MESSAGE_CHARS = 110


@dataclass(frozen=True)
class PoolWorker:
    name: str
    address: str
    pid: int


@dataclass
class Record:
    """What the server answered: each edge case, and each property test's examples by status."""

    edges: list[tuple[EdgeCase, Answer]]
    examples: dict[str, Counter[str]]


@pytest.fixture(scope="module")
def stub(live_pool: LivePool) -> Iterator[router_pb2_grpc.RouterStub]:
    # The client may send more than the router takes, so the router's own size limit is what is tested.
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(live_pool.router_address, options=options) as channel:
        yield router_pb2_grpc.RouterStub(channel)


@pytest.fixture(scope="module")
def workers(live_pool: LivePool) -> list[PoolWorker]:
    """Every worker of the pool, with the process it is now."""
    return [
        PoolWorker(name, address, worker_pid(live_pool.launcher, name))
        for name, address in sorted(live_pool.worker_addresses().items())
    ]


@pytest.fixture(scope="module")
def record() -> Iterator[Record]:
    record = Record([], {})
    yield record
    print(answers_table(record))


def answers_table(record: Record) -> str:
    """The edge cases and what the server answered, as a markdown table; then the examples' statuses."""
    lines = [
        f"\nWhat the pool answered ({len(record.edges)} edge cases):\n",
        "| case | expected | answer | message, or the summary of a served stream |",
        "| --- | --- | --- | --- |",
    ]
    for case, got in record.edges:
        if got.summary is not None:
            s = got.summary
            detail = (
                f"{s.generated_tokens} tokens from {s.worker_id} ({s.tier}), {s.prompt_tokens} prompt tokens"
            )
        else:
            detail = got.message if len(got.message) <= MESSAGE_CHARS else got.message[:MESSAGE_CHARS] + "…"
        expected = " or ".join(sorted(code.name for code in case.expected))
        cells = [case.name, expected, got.code.name, detail.replace("|", "\\|").replace("\n", "\\n")]
        lines.append("| " + " | ".join(cells) + " |")
    for test, codes in record.examples.items():
        lines.append(f"\n{test}: " + ", ".join(f"{code} {n}" for code, n in codes.most_common()))
    return "\n".join(lines)


def pool_problems(live_pool: LivePool, workers: list[PoolWorker]) -> list[str]:
    """What is wrong with the pool right now: the router or a worker not answering its own health check
    SERVING, or a worker that is not the process it was (it died and the launcher restarted it)."""
    problems = []
    if not is_serving(live_pool.router_address, timeout_s=HEALTH_TIMEOUT_S):
        problems.append("the router is not SERVING")
    for worker in workers:
        if not is_serving(worker.address, timeout_s=HEALTH_TIMEOUT_S):
            problems.append(f"worker {worker.name} is not SERVING")
        try:
            pid = worker_pid(live_pool.launcher, worker.name)
        except LookupError:
            problems.append(f"worker {worker.name} (pid {worker.pid}) is gone")
            continue
        if pid != worker.pid:
            problems.append(f"worker {worker.name} was restarted (pid {worker.pid}, now {pid})")
    return problems


def serves_plainly(worker: PoolWorker) -> int:
    """Tokens a plain request straight to the worker got."""
    request = generate_pb2.GenerateRequest(prompt="The weather today is", max_new_tokens=1)
    with grpc.insecure_channel(worker.address) as channel:
        responses = list(worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=CALL_TIMEOUT_S))
    return int(responses[-1].summary.generated_tokens)


@pytest.mark.parametrize("case", EDGE_CASES, ids=[case.name for case in EDGE_CASES])
def test_an_edge_request_ends_as_expected_and_every_worker_still_serves(
    live_pool: LivePool,
    stub: router_pb2_grpc.RouterStub,
    workers: list[PoolWorker],
    record: Record,
    case: EdgeCase,
) -> None:
    got = answer(stub, case.request, CALL_TIMEOUT_S)
    record.edges.append((case, got))
    assert got.code in case.expected, f"{case.name}: {got.code.name}: {got.message[:500]}"
    if got.code != grpc.StatusCode.OK and case.mentions:
        assert case.mentions in got.message, f"{case.name}: the refusal does not name {case.mentions!r}"
    if got.summary is not None:
        limit = case.request.max_new_tokens if case.request.HasField("max_new_tokens") else 256
        assert 1 <= got.summary.generated_tokens <= limit
        assert not case.request.request_id or got.summary.request_id == case.request.request_id
    assert not (problems := pool_problems(live_pool, workers)), f"after {case.name}: {problems}"
    if got.summary is not None:
        served_by = next(w for w in workers if w.name == got.summary.worker_id)
        assert serves_plainly(served_by) == 1, f"after {case.name}: {served_by.name} does not serve"


@SETTINGS
@given(request=generate_requests(prompt=QUICK_PROMPTS, max_new_tokens=FEW_OR_INVALID_TOKENS))
def test_hostile_requests_get_a_stream_or_a_clear_status(
    live_pool: LivePool,
    stub: router_pb2_grpc.RouterStub,
    workers: list[PoolWorker],
    record: Record,
    request: generate_pb2.GenerateRequest,
) -> None:
    got = answer(stub, request, CALL_TIMEOUT_S)
    record.examples.setdefault("hostile examples", Counter())[got.code.name] += 1
    assert got.code == grpc.StatusCode.OK or got.code in CLEAR_CODES, f"{got.code} for {request!r:.300}"
    assert not (problems := pool_problems(live_pool, workers)), f"after {request!r:.300}: {problems}"


@SETTINGS
@given(request=accepted_requests())
def test_requests_at_the_edge_of_valid_reach_the_model_and_end_clearly(
    live_pool: LivePool,
    stub: router_pb2_grpc.RouterStub,
    workers: list[PoolWorker],
    record: Record,
    request: generate_pb2.GenerateRequest,
) -> None:
    # Valid in every field, so only a budget or tolerance nothing meets may refuse them.
    got = answer(stub, request, CALL_TIMEOUT_S)
    record.examples.setdefault("valid-edge examples", Counter())[got.code.name] += 1
    assert got.code == grpc.StatusCode.OK or got.code in CLEAR_CODES - {grpc.StatusCode.INVALID_ARGUMENT}, (
        f"{got.code} for {request!r:.300}"
    )
    assert not (problems := pool_problems(live_pool, workers)), f"after {request!r:.300}: {problems}"


def test_the_pool_serves_normally_after_all_of_it(
    live_pool: LivePool, stub: router_pb2_grpc.RouterStub, workers: list[PoolWorker]
) -> None:
    request = generate_pb2.GenerateRequest(prompt="The weather today is", max_new_tokens=4)
    responses = list(stub.Generate(request, timeout=CALL_TIMEOUT_S))
    assert responses[-1].HasField("summary") and 1 <= responses[-1].summary.generated_tokens <= 4
    listed = list_workers(live_pool.router_address).workers
    assert listed and all(w.health == router_pb2.WORKER_HEALTH_SERVING for w in listed), [
        (w.worker_id, w.health) for w in listed
    ]
    assert all(serves_plainly(worker) == 1 for worker in workers)
    assert not pool_problems(live_pool, workers)
