"""Hostile input through a real router (in-process, fake workers): property tests over every request
field, undecodable bytes and messages over the size limit. Each gets a clear status, never a crash
or a hang, and the router serves a normal request afterwards."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tierserve_client.options import MAX_MESSAGE_BYTES
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

from tests.hostile import CLEAR_CODES, REFUSED, answer, edge_cases, generate_requests
from tests.hostile import outcome as hostile_outcome
from tests.unit.fake_pool import FakeWorker, running_pool
from tierserve.domain.config import LimitsConfig

CALL_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def router_address() -> Iterator[str]:
    """A router with two fake workers on an event loop of its own, for synchronous clients."""
    loop = asyncio.new_event_loop()
    ready: list[str] = []
    started, stop = threading.Event(), asyncio.Event()

    async def serve() -> None:
        workers = [FakeWorker("fp32-0", "fp32"), FakeWorker("int4-0", "int4-woq", loss_pct=0.3, cores=[1])]
        async with running_pool(workers) as pool:
            ready.append(pool.address)
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30), "router did not start"
    yield ready[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    assert not thread.is_alive(), "router did not stop"


@pytest.fixture(scope="module")
def stub(router_address: str) -> Iterator[router_pb2_grpc.RouterStub]:
    # The client itself may send more than the server takes, so the server's limit is what is tested.
    with grpc.insecure_channel(router_address, options=[("grpc.max_send_message_length", -1)]) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def outcome(stub: router_pb2_grpc.RouterStub, request: generate_pb2.GenerateRequest) -> grpc.StatusCode:
    return hostile_outcome(stub, request, CALL_TIMEOUT_S)


def still_serves(stub: router_pb2_grpc.RouterStub) -> None:
    request = generate_pb2.GenerateRequest(prompt="still there?", max_new_tokens=2)
    assert list(stub.Generate(request, timeout=CALL_TIMEOUT_S))[-1].summary.generated_tokens == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=generate_requests())
def test_any_request_gets_a_stream_or_a_clear_status(
    stub: router_pb2_grpc.RouterStub, request: generate_pb2.GenerateRequest
) -> None:
    code = outcome(stub, request)
    assert code == grpc.StatusCode.OK or code in CLEAR_CODES, f"{code} for {request!r:.300}"


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=4096))
def test_undecodable_bytes_get_a_status_not_a_crash(router_address: str, payload: bytes) -> None:
    with grpc.insecure_channel(router_address) as channel:
        raw = channel.unary_stream("/tierserve.v1.Router/Generate")  # bytes in, bytes out
        try:
            for _ in raw(payload, timeout=CALL_TIMEOUT_S):
                pass
        except grpc.RpcError as error:
            assert isinstance(error, grpc.Call)
            assert error.code() in CLEAR_CODES
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # Either the bytes do not parse, or the message names its offending field.
                assert re.match(r"[a-z_]+: ", error.details() or "")


def test_unknown_fields_and_enum_values_are_ignored_as_proto3_says(stub: router_pb2_grpc.RouterStub) -> None:
    # Field 99 (unknown, varint 7) and a huge unknown length-delimited field 100 appended.
    known = generate_pb2.GenerateRequest(prompt="hi", max_new_tokens=2).SerializeToString()
    extra = bytes([0x98, 0x06, 0x07]) + bytes([0xA2, 0x06, 0x80, 0x08]) + b"z" * 1024
    request = generate_pb2.GenerateRequest.FromString(known + extra)
    assert outcome(stub, request) == grpc.StatusCode.OK


def test_a_message_over_the_size_limit_is_refused_and_the_router_serves_on(
    stub: router_pb2_grpc.RouterStub,
) -> None:
    request = generate_pb2.GenerateRequest(prompt="x" * (MAX_MESSAGE_BYTES + 1024), max_new_tokens=1)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=CALL_TIMEOUT_S))
    assert isinstance(caught.value, grpc.Call)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (caught.value.details() or "")
    still_serves(stub)


def test_every_edge_case_the_router_refuses_itself_names_its_field(stub: router_pb2_grpc.RouterStub) -> None:
    # The explicit edge cases that tests/integration/test_hostile_input_live.py sends to real workers,
    # for this router's limits (the defaults); those refused past the context are the worker's to refuse.
    for case in edge_cases(LimitsConfig()):
        if case.expected != REFUSED or case.mentions == "context" or case.worker_refuses:
            continue
        got = answer(stub, case.request, CALL_TIMEOUT_S)
        assert got.code == grpc.StatusCode.INVALID_ARGUMENT, (
            f"{case.name}: {got.code.name} {got.message:.300}"
        )
        assert case.mentions in got.message, f"{case.name}: {got.message:.300}"


def test_the_router_serves_after_all_of_it(stub: router_pb2_grpc.RouterStub) -> None:
    still_serves(stub)
