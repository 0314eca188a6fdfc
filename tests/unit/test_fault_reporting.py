"""Faults reported as what they are: a DNS failure is not an empty answer, a pinned tier whose
workers are all down or gone is UNAVAILABLE, an error a worker answers (or one the request's own
values cause) does not take a worker out of rotation, a resumed request keeps the limits, and a
stream whose worker died after its last token is closed, not resumed past its end."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.tiny_model import build_tiny_model_dir
from tests.unit.fake_pool import FakeWorker, RunningPool, running_pool
from tests.unit.fake_workers import FakeWorker as PolicyWorker
from tierserve.domain.config import LimitsConfig, parse_config
from tierserve.domain.errors import InvalidRequest, NoWorkerAvailable, Unsatisfiable
from tierserve.domain.requests import MIN_TEMPERATURE, validate_generate_request
from tierserve.router import pool as router_pool
from tierserve.router.app import build_router
from tierserve.router.discovery import LookupFailed, resolve
from tierserve.router.policies.registry import FirstHealthyPolicy, RouteRequest
from tierserve.router.pool import WorkerPool

PROMPT = "p" * 40  # one word: a counting worker continues with " w1", " w2", ...


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


async def generate(stub: router_pb2_grpc.RouterStub, **fields: Any) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest(**{"prompt": PROMPT, "max_new_tokens": 4, **fields})
    return [response async for response in stub.Generate(request, timeout=10)]


async def all_serving(pool: RunningPool) -> None:
    """Every worker checked until SERVING: with the health loop slowed down (so it restores no
    worker behind a test's back), a check that timed out on a loaded machine is not left standing."""
    for worker in pool.pool.workers:
        while not worker.healthy:
            await pool.pool.check(worker)


async def refusal(pool: RunningPool, **fields: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(pool.stub, **fields)
    return caught.value


# ------------------------------------------------------------------ DNS


DNS_CONFIG = {"workers": [{"name": "fp32", "tier": "fp32", "address": "dns:///tierserve-worker-fp32:50061"}]}


def test_a_failed_lookup_keeps_the_workers_last_resolved(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = "10.0.0.1:50061", "10.0.0.2:50061"
    answers: list[list[str] | Exception] = [
        [a, b],
        LookupFailed("tierserve-worker-fp32: Temporary failure in name resolution"),
        LookupFailed("tierserve-worker-fp32: Temporary failure in name resolution"),
        [b],
        [],
    ]

    async def fake_resolve(address: str) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(router_pool, "resolve", fake_resolve)

    async def scenario() -> list[list[str]]:
        pool = WorkerPool(parse_config(DNS_CONFIG))
        left: list[str] = []
        pool.departures.append(lambda worker_id, tier: left.append(worker_id))
        seen = []
        for _ in range(5):
            await pool.discover()
            seen.append(sorted(w.address for w in pool.workers))
        await pool.close()
        assert left == [f"fp32@{a}", f"fp32@{b}"]
        return seen

    with caplog.at_level(logging.INFO, logger="tierserve.router.pool"):
        seen = asyncio.run(scenario())
    assert seen == [[a, b], [a, b], [a, b], [b], []]
    failures = [r for r in caplog.records if "DNS lookup failed" in r.getMessage()]
    assert len(failures) == 1, "told once per outage"
    assert "keeping the 2 worker(s)" in failures[0].getMessage() and failures[0].levelno == logging.WARNING
    assert any("DNS answers again" in r.getMessage() for r in caplog.records)


def test_only_an_answer_drops_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(errno: int) -> Callable[..., Awaitable[Any]]:
        async def getaddrinfo(*args: Any, **kwargs: Any) -> Any:
            raise socket.gaierror(errno, "from the test")

        return getaddrinfo

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo", failing(socket.EAI_AGAIN))  # SERVFAIL, a timeout
        with pytest.raises(LookupFailed, match="from the test"):
            await resolve("dns:///workers.example:50061")
        monkeypatch.setattr(loop, "getaddrinfo", failing(socket.EAI_NONAME))  # NXDOMAIN
        assert await resolve("dns:///workers.example:50061") == []

    asyncio.run(scenario())


# ------------------------------------------------------------------ pinned tiers


def test_a_pinned_tier_whose_workers_are_all_down_is_unavailable() -> None:
    # int8-sq-0 never answered, so its accuracy card is unknown: not a tolerance it cannot meet.
    down = [
        PolicyWorker("fp32-0", "fp32"),
        PolicyWorker("int8-0", "int8-sq", healthy=False, quality_loss_pct=None),
    ]
    with pytest.raises(NoWorkerAvailable, match="int8-0 is not known until it is up"):
        FirstHealthyPolicy().choose(RouteRequest(tier="int8-sq", max_quality_loss_pct=1.0), down)
    # Known to be beyond the tolerance, or up with no card: that is for good.
    measured = [PolicyWorker("int8-0", "int8-sq", healthy=False, quality_loss_pct=24.5)]
    with pytest.raises(Unsatisfiable):
        FirstHealthyPolicy().choose(RouteRequest(tier="int8-sq", max_quality_loss_pct=1.0), measured)
    unmeasured = [PolicyWorker("int8-0", "int8-sq", quality_loss_pct=None)]
    with pytest.raises(Unsatisfiable):
        FirstHealthyPolicy().choose(RouteRequest(tier="int8-sq", max_quality_loss_pct=1.0), unmeasured)


def test_a_pinned_tier_whose_workers_left_the_pool_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    async def nobody(address: str) -> list[str]:
        return []

    monkeypatch.setattr(router_pool, "resolve", nobody)

    async def scenario() -> None:
        config = parse_config(
            {**DNS_CONFIG, "workers": [*DNS_CONFIG["workers"], {"name": "b", "tier": "bf16"}]}
        )
        pool = WorkerPool(config)
        await pool.discover()  # the name answers no address: no fp32 worker now
        with pytest.raises(NoWorkerAvailable, match="no worker of tier 'fp32' is in the pool now"):
            pool.check_pinned_tier("fp32")
        pool.check_pinned_tier("bf16")  # it has a worker
        pool.check_pinned_tier("int4-woq")  # never served: the policy names the tiers served
        await pool.close()

    asyncio.run(scenario())


def test_pinning_a_tier_whose_worker_never_came_up_is_unavailable_over_the_wire() -> None:
    async def scenario() -> None:
        async with running_pool([FakeWorker("fp32-0", "fp32")]) as pool:
            # A second router: the same live fp32 worker, and an int8-sq worker nobody listens for.
            fp32 = pool.pool.workers[0]
            config = parse_config(
                {
                    "router": {"port": 0, "health_interval_s": 0.05},
                    "workers": [
                        {"name": "fp32-0", "tier": "fp32", "address": fp32.address},
                        {"name": "int8-0", "tier": "int8-sq", "address": "127.0.0.1:1"},
                    ],
                }
            )
            router = build_router(config)
            handle = await router.start(follow_pool_health=False)
            await router.pool.first_round_done.wait()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
                    stub = router_pb2_grpc.RouterStub(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await generate(stub, tier="int8-sq", max_quality_loss_pct=1.0)
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
                    with pytest.raises(grpc.aio.AioRpcError) as unpinned:
                        await generate(stub, tier="int8-sq")
                    assert unpinned.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                await handle.server.stop(0)
                await router.pool.close()

    run(scenario)


# ------------------------------------------------------------------ errors a worker answers


def test_an_error_a_worker_answers_does_not_take_it_out_of_rotation() -> None:
    async def scenario() -> None:
        # fp32 first (the most accurate); health checked once, at start, so nothing restores it.
        crashing = FakeWorker("fp32-0", "fp32", fail_after=0, fail_code=grpc.StatusCode.INTERNAL)
        other = FakeWorker("bf16-0", "bf16", cores=[1])
        async with running_pool([crashing, other], health_interval_s=600) as pool:
            await all_serving(pool)
            summary = (await generate(pool.stub))[-1].summary
            assert summary.worker_id == "bf16-0" and list(summary.failed_workers) == ["fp32-0"]
            fp32 = pool.pool.by_id("fp32-0")
            assert fp32.health == router_pb2.WORKER_HEALTH_SERVING, "an answered error took it out"
            assert fp32.requests_failed == 1 and fp32.last_error.startswith("INTERNAL")
            # A dead worker does leave the rotation.
            crashing.fail_code = grpc.StatusCode.UNAVAILABLE
            await generate(pool.stub)
            assert fp32.health == router_pb2.WORKER_HEALTH_UNREACHABLE

    run(scenario)


def test_a_request_a_worker_refuses_is_relayed_and_counts_against_no_worker() -> None:
    async def scenario() -> None:
        # As a worker answers a request it finds wrong.
        refusing = FakeWorker("fp32-0", "fp32", fail_after=0, fail_code=grpc.StatusCode.INVALID_ARGUMENT)
        other = FakeWorker("bf16-0", "bf16", cores=[1])
        async with running_pool([refusing, other], health_interval_s=600) as pool:
            await all_serving(pool)
            refused = await refusal(pool)
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(refusing.requests) == 1  # the worker's answer, relayed
            fp32 = pool.pool.by_id("fp32-0")
            assert fp32.health == router_pb2.WORKER_HEALTH_SERVING and fp32.requests_failed == 0
            assert not other.requests, "a refused request was sent to another worker"

    run(scenario)


def test_a_temperature_whose_division_overflows_is_invalid() -> None:
    # Router and worker apply the same rule: the request never reaches a model.
    with pytest.raises(InvalidRequest, match="temperature: 1e-38 is too small") as caught:
        validate_generate_request(generate_pb2.GenerateRequest(prompt="p", temperature=1e-38), LimitsConfig())
    assert "use 0 for greedy" in str(caught.value)
    for fine in (0.0, MIN_TEMPERATURE, 0.7, 3e38):
        validate_generate_request(generate_pb2.GenerateRequest(prompt="p", temperature=fine), LimitsConfig())


def test_the_smallest_temperature_samples_and_a_smaller_one_breaks_sampling(tmp_path: Path) -> None:
    """Why the bound is where it is, on a real model and torch's own sampler."""
    model_dir = build_tiny_model_dir(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer("Once upon a time", return_tensors="pt")

    def sample(temperature: float) -> None:
        config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, max_new_tokens=3)
        torch.manual_seed(7)
        model.generate(**inputs, generation_config=config, pad_token_id=tokenizer.eos_token_id)

    sample(MIN_TEMPERATURE)
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        sample(1e-38)


# ------------------------------------------------------------------ resumes


def test_a_worker_that_dies_after_its_last_token_is_not_resumed_past_the_end() -> None:
    async def scenario() -> None:
        # fp32 ends its stream with end of sequence at its third token, then dies before its summary.
        ending = FakeWorker("fp32-0", "fp32", count_words=True, eos_at=2, fail_after=3)
        other = FakeWorker("bf16-0", "bf16", cores=[1], count_words=True)
        async with running_pool([ending, other], health_interval_s=600) as pool:
            await all_serving(pool)
            responses = await generate(pool.stub, max_new_tokens=10)
        tokens, summary = [r.token for r in responses[:-1]], responses[-1].summary
        assert [t.index for t in tokens] == [0, 1, 2]
        assert summary.finish_reason == generate_pb2.FINISH_REASON_EOS
        assert summary.generated_tokens == 3 and summary.text == " w1 w2 w3"
        assert list(summary.failed_workers) == ["fp32-0"] and summary.resumed_after_tokens == 0
        assert not other.requests, "resumed past the end of the stream"

    run(scenario)


def test_a_resumed_request_is_checked_against_the_limits() -> None:
    async def scenario() -> None:
        # 15 tokens " w1" ... " w15" are 51 characters: more than a prompt (or prefix) may have here.
        failing = FakeWorker("fp32-0", "fp32", count_words=True, fail_after=15)
        other = FakeWorker("bf16-0", "bf16", cores=[1], count_words=True)
        async with running_pool([failing, other], limits={"max_prompt_chars": 40}) as pool:
            refused = await refusal(pool, max_new_tokens=20)
            assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
            assert "cannot be resumed within the limits" in (refused.details() or "")
            assert "more than the limit of 40" in (refused.details() or "")
            assert not other.requests, "a continuation over the limits was sent"

    run(scenario)


def test_a_continuation_a_worker_refuses_fails_as_the_failure_it_resumes() -> None:
    async def scenario() -> None:
        failing = FakeWorker("fp32-0", "fp32", count_words=True, fail_after=3)
        refusing = FakeWorker(
            "bf16-0", "bf16", cores=[1], fail_after=0, fail_code=grpc.StatusCode.INVALID_ARGUMENT
        )
        async with running_pool([failing, refusing]) as pool:
            refused = await refusal(pool, max_new_tokens=10)
        # The client's request was valid: it sees why its stream broke, and why it could not go on.
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
        assert "fp32-0 UNAVAILABLE" in (refused.details() or "")
        assert "resuming on bf16-0 was refused" in (refused.details() or "")

    run(scenario)
