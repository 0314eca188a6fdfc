"""The router's OpenAI-compatible HTTP API in front of in-process fake workers: the `openai` SDK
through it, the statuses of every refusal, the same tokens and per-client limits as gRPC, the
deadline, a client that leaves mid-stream, TLS, and the `protocol` label of the metrics."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from tierserve_client.v1 import generate_pb2, worker_pb2, worker_pb2_grpc

from tests.unit.fake_pool import FakeWorker, RunningPool, running_pool
from tierserve.benchmarks.httpcall import completion_body, served_model, timed_http_generate
from tierserve.benchmarks.overhead import overhead_figures
from tierserve.benchmarks.streamcall import timed_generate
from tierserve.domain.config import parse_config
from tierserve.ops.certs import make_pool_certificates
from tierserve.router.app import build_router
from tierserve.router.http.server import start_http_api
from tierserve.rpc.server import start_server

MODEL = "SmolLM2-135M-Instruct"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


def sdk(pool: RunningPool, token: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=pool.http_url, api_key=token, max_retries=0)


def requests_total(pool: RunningPool, protocol: str, status: str, tier: str, worker: str) -> float:
    labels = {"tier": tier, "worker": worker, "status": status, "protocol": protocol}
    return pool.servicer.metrics.registry.get_sample_value("tierserve_router_requests_total", labels) or 0.0


async def post(
    session: aiohttp.ClientSession,
    pool: RunningPool,
    body: Any,
    path: str = "/chat/completions",
    **headers: str,
) -> tuple[int, dict[str, str], Any]:
    async with session.post(pool.http_url + path, json=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_the_openai_sdk_streams_and_completes_through_the_router() -> None:
    async def scenario() -> None:
        fp32 = FakeWorker("fp32-0", "fp32", tpot_us=30_000)
        int4 = FakeWorker("int4-0", "int4-woq", loss_pct=0.3, tpot_us=10_000, cores=[1])
        async with running_pool([fp32, int4], http=True) as pool:
            client = sdk(pool)
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
                # Only int4 meets a 20 ms TPOT budget within a 0.5% loss.
                extra_body={"max_token_latency_ms": 20, "max_quality_loss_pct": 0.5},
            )
            chunks = [chunk async for chunk in stream]
            tokens = [c for c in chunks if c.choices and c.choices[0].delta.content is not None]
            assert "".join(c.choices[0].delta.content or "" for c in tokens) == " x x x x"
            marks = [(c.model_extra or {})["tierserve"]["token"] for c in tokens]
            assert [m["index"] for m in marks] == [0, 1, 2, 3]
            assert [m["latency_us"] for m in marks] == [20_000, 10_000, 10_000, 10_000]
            assert tokens[0].choices[0].delta.role == "assistant"
            assert (
                chunks[-2].choices[0].finish_reason == "length"
                or chunks[-2].choices[0].finish_reason == "stop"
            )
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
            summary = (chunks[-1].model_extra or {})["tierserve"]["summary"]
            assert summary["worker_id"] == "int4-0" and summary["budget_met"] is True
            assert "int4-woq" in summary["routing_reason"] and summary["tpot_mean_us"] == 10_000
            assert len({c.id for c in chunks}) == 1
            # The worker received the conversation as chat messages, sampled at OpenAI's default.
            sent = int4.requests[-1]
            assert [(m.role, m.content) for m in sent.messages] == [("system", "Be brief."), ("user", "Hi")]
            assert sent.temperature == 1.0 and sent.max_new_tokens == 4

            completion = await client.completions.create(
                model=MODEL, prompt="a b c", max_tokens=2, temperature=0
            )
            assert completion.choices[0].text == " x x" and completion.usage is not None
            assert completion.usage.completion_tokens == 2
            assert (completion.model_extra or {})["tierserve"]["summary"]["worker_id"] == "fp32-0"
            assert fp32.requests[-1].prompt == "a b c" and fp32.requests[-1].temperature == 0.0

            # The tier pin as a header, for clients that cannot change the body.
            pinned = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                extra_headers={"X-Tierserve-Tier": "int4-woq"},
            )
            assert (pinned.model_extra or {})["tierserve"]["summary"]["tier"] == "int4-woq"
            assert "pinned" in (pinned.model_extra or {})["tierserve"]["summary"]["routing_reason"]

            models = await client.models.list()
            assert [m.id for m in models.data] == [MODEL]
            tiers = (models.data[0].model_extra or {})["tierserve"]["tiers"]
            assert {t["tier"]: t["accuracy"]["perplexity_delta_pct"] for t in tiers} == {
                "fp32": 0.0,
                "int4-woq": 0.3,
            }

            # Counted as HTTP, beside a gRPC call counted as gRPC.
            request = generate_pb2.GenerateRequest(prompt="a", max_new_tokens=2)
            assert [r async for r in pool.stub.Generate(request, timeout=10)][-1].HasField("summary")
            await wait_for(lambda: requests_total(pool, "http", "ok", "int4-woq", "int4-0") == 2)
            assert requests_total(pool, "http", "ok", "fp32", "fp32-0") == 1
            assert requests_total(pool, "grpc", "ok", "fp32", "fp32-0") == 1
            ttft = pool.servicer.metrics.registry.get_sample_value(
                "tierserve_router_ttft_seconds_count",
                {"tier": "int4-woq", "worker": "int4-0", "protocol": "http"},
            )
            assert ttft == 2

    run(scenario)


def test_refusals_are_openai_shaped_with_the_matching_status() -> None:
    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32")
        async with (
            running_pool([fake], http=True, max_queue_per_worker=0) as pool,
            aiohttp.ClientSession() as session,
        ):
            status, _, body = await post(session, pool, {**CHAT, "max_tokens": 100_000})
            assert status == 400
            assert body["error"]["param"] == "max_tokens" and body["error"]["type"] == "invalid_request_error"
            assert body["error"]["message"].startswith("max_tokens: is 100000, above this server's limit")
            status, _, body = await post(session, pool, {**CHAT, "n": 3})
            assert (status, body["error"]["param"]) == (400, "n") and "n=1" in body["error"]["message"]
            status, _, body = await post(
                session, pool, {**CHAT, "messages": [{"role": "narrator", "content": "Once"}]}
            )
            assert (status, body["error"]["param"]) == (400, "messages[0].role")
            status, _, body = await post(session, pool, {**CHAT, "model": "gpt-4o"})
            assert (status, body["error"]["code"]) == (404, "model_not_found")
            async with session.post(pool.http_url + "/chat/completions", data=b"{not json") as response:
                assert response.status == 400 and (await response.json())["error"]["param"] == "body"
            async with session.get(pool.http_url + "/nowhere") as response:
                assert response.status == 404 and "error" in await response.json()
            async with session.get(pool.http_url + "/chat/completions") as response:
                assert response.status == 405 and "error" in await response.json()
            # An accuracy tolerance no tier meets: the request must change.
            status, _, body = await post(session, pool, {**CHAT, "max_quality_loss_pct": -1})
            assert (status, body["error"]["param"]) == (400, "max_quality_loss_pct")

            # Overload: one stream generating, no queue room behind it.
            fake.gate.clear()
            held = asyncio.create_task(post(session, pool, CHAT))
            await fake.arrivals.get()
            status, headers, body = await post(session, pool, CHAT)
            assert status == 429 and body["error"]["type"] == "rate_limit_error"
            assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) > 0
            fake.gate.set()
            assert (await held)[0] == 200

            # No healthy worker.
            await pool.worker_servers[0].stop(0)
            await wait_for(lambda: not pool.pool.workers[0].healthy)
            status, _, body = await post(session, pool, CHAT)
            assert status == 503 and body["error"]["code"] == "unavailable"
            assert requests_total(pool, "http", "invalid_argument", "none", "none") == 5

    run(scenario)


def test_tokens_and_per_client_limits_are_the_grpc_sides(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("secret-a alice 1\nsecret-b bob\n")

    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32")
        security: dict[str, object] = {"tokens_file": str(tokens)}
        async with (
            running_pool([fake], security=security, http=True) as pool,
            aiohttp.ClientSession() as session,
        ):
            status, _, body = await post(session, pool, CHAT)
            assert status == 401 and body["error"]["type"] == "authentication_error"
            messages: list[Any] = CHAT["messages"]
            with pytest.raises(openai.PermissionDeniedError):
                await sdk(pool, "secret-z").chat.completions.create(model=MODEL, messages=messages)
            answer = await sdk(pool, "secret-b").chat.completions.create(model=MODEL, messages=messages)
            assert answer.choices[0].message.content
            async with session.get(pool.http_url + "/models") as response:
                assert response.status == 401
            # alice's one stream, open over gRPC, counts against her HTTP requests too.
            fake.gate.clear()
            while not fake.arrivals.empty():  # the earlier requests'
                fake.arrivals.get_nowait()
            channel = grpc.aio.insecure_channel(pool.address)
            held = pool.stub.Generate(
                generate_pb2.GenerateRequest(prompt="p", max_new_tokens=2),
                metadata=(("authorization", "Bearer secret-a"),),
            )
            reading = asyncio.create_task(held.read())
            await fake.arrivals.get()
            status, headers, body = await post(session, pool, CHAT, Authorization="Bearer secret-a")
            assert status == 429 and "alice" in body["error"]["message"] and headers["Retry-After"] == "1"
            fake.gate.set()
            await reading
            held.cancel()
            await channel.close()

    run(scenario)


def test_a_deadline_is_504_and_a_client_that_leaves_frees_the_worker() -> None:
    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32", hold_after=2)
        async with running_pool([fake], http=True) as pool, aiohttp.ClientSession() as session:
            worker = pool.pool.workers[0]
            fake.gate.clear()
            status, _, body = await post(session, pool, CHAT, **{"X-Tierserve-Timeout-Ms": "200"})
            assert status == 504 and body["error"]["code"] == "deadline_exceeded"
            await wait_for(lambda: requests_total(pool, "http", "deadline_exceeded", "fp32", "fp32-0") == 1)
            assert worker.in_flight == 0
            fake.gate.set()

            # Two tokens, then the worker holds; the client reads them and leaves.
            body = {**CHAT, "max_tokens": 8, "stream": True}
            response = await session.post(pool.http_url + "/chat/completions", json=body)
            assert response.status == 200
            first = await response.content.readuntil(b"\n\n")
            assert json.loads(first.removeprefix(b"data: "))["tierserve"]["token"]["index"] == 0
            await fake.holding.wait()
            assert worker.in_flight == 1
            response.close()  # the connection with it
            await wait_for(lambda: worker.in_flight == 0, timeout_s=2.0)
            await wait_for(lambda: requests_total(pool, "http", "cancelled", "fp32", "fp32-0") == 1)

    run(scenario)


def test_tls_on_the_http_port_with_the_routers_certificate(tmp_path: Path) -> None:
    certs = make_pool_certificates(tmp_path, ["fp32-0"])
    security: dict[str, object] = {
        "ca": str(certs.ca),
        "router_cert": str(certs.router.cert),
        "router_key": str(certs.router.key),
    }

    async def scenario() -> None:
        async with running_pool([FakeWorker("fp32-0", "fp32")], security=security, http=True) as pool:
            assert pool.http_url.startswith("https://")
            trusted = ssl.create_default_context(cafile=str(certs.ca))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as session:
                status, _, body = await post(session, pool, CHAT)
                assert status == 200 and body["usage"]["completion_tokens"] == 3
            plain = pool.http_url.replace("https://", "http://")
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientError):
                    await session.post(plain + "/chat/completions", json=CHAT)

    run(scenario)


def test_the_overhead_benchmark_times_http_calls_as_it_times_grpc_calls() -> None:
    async def scenario() -> None:
        async with running_pool([FakeWorker("fp32-0", "fp32")], http=True) as pool:
            request = generate_pb2.GenerateRequest(prompt="a b", max_new_tokens=5, tier="fp32")
            async with aiohttp.ClientSession() as session:
                body = completion_body(await served_model(session, pool.http_url), request)
                assert body["model"] == MODEL and body["stream"] and body["tier"] == "fp32"
                timed = await timed_http_generate(session, pool.http_url, body, timeout_s=10)
                refused = await timed_http_generate(session, pool.http_url, {**body, "max_tokens": 10**6}, 10)
            grpc_timed = await timed_generate(pool.stub, request, timeout_s=10)
            for result in (timed, grpc_timed):
                assert result.status == "OK" and len(result.token_times_s) == 5
                assert result.worker_id == "fp32-0" and result.generated_tokens == 5
                assert result.worker_ttft_ms == 20.0 and result.budget_met
            assert (refused.status, refused.token_times_s) == ("INVALID_ARGUMENT", [])
            figures = overhead_figures([(timed, grpc_timed)], ("http", "grpc"))
            assert figures["tokens_compared"] == 4 and set(figures["ttft_p50_ms"]) == {"http", "grpc"}

    run(scenario)


def test_a_drain_refuses_new_http_requests_and_waits_for_those_in_flight() -> None:
    async def scenario() -> None:
        fake = FakeWorker("fp32-0", "fp32")

        def register(server: grpc.aio.Server) -> list[str]:
            worker_pb2_grpc.add_WorkerServicer_to_server(fake, server)
            return [worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

        worker = await start_server("127.0.0.1", 0, register)
        await worker.set_serving(True)
        config = parse_config(
            {
                "router": {"port": 0, "http_port": 0, "health_interval_s": 0.05},
                "workers": [{"name": "fp32-0", "tier": "fp32", "address": f"127.0.0.1:{worker.port}"}],
            }
        )
        router = build_router(config)
        handle = await router.start(follow_pool_health=False)
        await router.pool.first_round_done.wait()
        api = await start_http_api(router, [handle.drain])
        try:
            async with aiohttp.ClientSession() as session:
                fake.gate.clear()
                held = asyncio.create_task(session.post(api.url + "/chat/completions", json=CHAT))
                await fake.arrivals.get()
                assert handle.drain.in_flight == 1  # the HTTP request counts as work in flight
                handle.drain.close()
                async with session.post(api.url + "/chat/completions", json=CHAT) as refused:
                    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
                    assert "shutting down" in (await refused.json())["error"]["message"]
                fake.gate.set()
                async with await held as response:
                    assert response.status == 200
                await asyncio.wait_for(handle.drain.idle(), 5)
        finally:
            await api.close()
            await handle.server.stop(0)
            await router.pool.close()
            await worker.server.stop(0)

    run(scenario)
