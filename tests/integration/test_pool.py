"""End to end over real sockets: router and pinned workers serving the default model."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tierserve_client.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.integration.conftest import ONE_AT_A_TIME_TIER, LivePool
from tierserve.domain.cores import parse_cpu_list
from tierserve.worker.isa import CpuIsa

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
Responses = list[generate_pb2.GenerateResponse]


def router(pool: LivePool) -> router_pb2_grpc.RouterStub:
    return router_pb2_grpc.RouterStub(grpc.insecure_channel(pool.router_address))


def generate(pool: LivePool, timeout: float = 120, **fields: Any) -> Responses:
    request = generate_pb2.GenerateRequest(**{"prompt": PROMPT, **fields})
    return list(router(pool).Generate(request, timeout=timeout))


def split(responses: Responses) -> tuple[list[generate_pb2.Token], generate_pb2.Summary]:
    assert responses and responses[-1].HasField("summary"), "a stream must end with a summary"
    tokens = [r.token for r in responses[:-1]]
    assert all(r.HasField("token") for r in responses[:-1])
    return tokens, responses[-1].summary


def test_greedy_stream_is_coherent_and_every_token_has_a_latency(live_pool: LivePool) -> None:
    tokens, summary = split(generate(live_pool, max_new_tokens=12))
    assert [t.index for t in tokens] == list(range(12))
    assert all(t.latency_us > 0 for t in tokens)
    text = "".join(t.text for t in tokens)
    assert "Paris" in text
    assert summary.text == text
    assert summary.generated_tokens == 12 and summary.prompt_tokens > 0
    assert summary.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert summary.ttft_us == tokens[0].latency_us
    assert summary.tpot_p50_us > 0 and summary.tpot_p95_us >= summary.tpot_p50_us
    assert summary.total_time_us >= summary.ttft_us
    assert summary.worker_id and summary.tier in ("fp32", "bf16")
    assert summary.routing_reason and summary.request_id
    assert summary.budget_met


@pytest.mark.parametrize("tier", ["fp32", "bf16"])
def test_pinned_tier_is_served_by_that_tier(live_pool: LivePool, tier: str) -> None:
    _, summary = split(generate(live_pool, tier=tier, max_new_tokens=6))
    assert summary.tier == tier and summary.worker_id == f"{tier}-0"
    assert tier in summary.routing_reason
    assert "Paris" in summary.text


def test_sampling_with_a_seed_repeats_and_reports_the_seed(live_pool: LivePool) -> None:
    fields: dict[str, Any] = {
        "tier": "bf16",
        "temperature": 0.9,
        "top_p": 0.95,
        "top_k": 50,
        "seed": 1234,
        "max_new_tokens": 10,
    }
    first, second = split(generate(live_pool, **fields))[1], split(generate(live_pool, **fields))[1]
    assert first.seed == second.seed == 1234
    assert first.text == second.text
    _, random_seeded = split(generate(live_pool, tier="bf16", temperature=0.9, max_new_tokens=4))
    assert random_seeded.seed != 0


def test_stop_string_ends_the_stream_before_it(live_pool: LivePool) -> None:
    tokens, summary = split(generate(live_pool, stop=["."], max_new_tokens=40))
    assert summary.finish_reason == generate_pb2.FINISH_REASON_STOP
    assert summary.text == " Paris"
    assert "".join(t.text for t in tokens) == " Paris"


def test_multibyte_text_streams_as_valid_utf8(live_pool: LivePool) -> None:
    tokens, summary = split(
        generate(live_pool, prompt="Translate to Japanese: good morning =", max_new_tokens=24, tier="bf16")
    )
    joined = "".join(t.text for t in tokens)
    assert joined == summary.text
    joined.encode("utf-8")  # every piece arrived as a valid protobuf string; the join must be too
    assert "\ufffd" not in joined[:-1]


BAD_REQUESTS = [
    ({"prompt": ""}, "prompt"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 257}, "max_new_tokens"),
    ({"prompt": "word " * 9000, "max_new_tokens": 4}, "prompt"),
    ({"tier": "int9"}, "tier"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_REQUESTS)
def test_bad_input_is_invalid_argument_naming_the_field(
    live_pool: LivePool, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        generate(live_pool, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:")
    # ... and the pool keeps serving.
    assert split(generate(live_pool, max_new_tokens=2))[1].generated_tokens == 2


def test_four_concurrent_requests_all_complete(live_pool: LivePool) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda n: split(generate(live_pool, max_new_tokens=8 + n)), range(4)))
    for n, (tokens, summary) in enumerate(results):
        assert summary.generated_tokens == len(tokens) == 8 + n
        assert "Paris" in summary.text
    assert len({s.request_id for _, s in results}) == 4
    # One worker serves one request at a time: the others waited, and the summary says so.
    assert max(s.queue_time_us for _, s in results) > 0


def test_list_workers_reports_descriptions_and_health(live_pool: LivePool) -> None:
    workers = {w.worker_id: w for w in router(live_pool).ListWorkers(router_pb2.ListWorkersRequest()).workers}
    assert set(workers) == set(live_pool.worker_cores)
    for name, status in workers.items():
        assert status.health == router_pb2.WORKER_HEALTH_SERVING
        info = status.info
        assert info.tier == name.removesuffix("-0")
        assert list(info.cores) == live_pool.worker_cores[name]
        assert info.threads == len(info.cores)
        assert info.backend and info.kernel and info.dtype
        isa = CpuIsa.detect()
        if info.tier == "bf16" and isa.avx512_bf16 and not isa.amx:
            # tierserve's row-independent bf16 kernel in IPEX's graph (docs/tiers.md).
            assert "native kernels + ipex" in info.backend, info.backend
            assert info.kernel.startswith("native: layers tierserve bf16_linear"), info.kernel
        elif info.tier == "fp32" and isa.avx512:
            # tierserve's row-independent fp32 kernel in IPEX's graph (docs/tiers.md).
            assert "native kernels + ipex" in info.backend, info.backend
            assert info.kernel.startswith("native: layers tierserve fp32_linear"), info.kernel
        elif info.tier in ("fp32", "bf16"):
            assert info.backend.startswith("ipex") and "ipex.llm.optimize" in info.kernel
        if info.tier == "fp32" or (info.tier == "bf16" and not CpuIsa.detect().ipex_bf16):
            # bf16 where IPEX cannot run it: bf16-rounded weights in the float32 graph.
            assert info.dtype == "float32"
        elif info.tier == "bf16":
            assert info.dtype == "bfloat16"
        assert info.accuracy.measured and info.accuracy.eval_tokens > 0
        assert info.warmup_latency.samples > 0 and info.warmup_latency.tpot_p50_us > 0
        assert info.load_time_ms > 0 and info.rss_mb > 0 and info.max_context_tokens == 8192
        assert info.versions["torch"].startswith("2.8")


def test_workers_and_router_are_really_pinned(live_pool: LivePool) -> None:
    import psutil

    def allowed_cpus(pid: int) -> list[int]:
        status = Path(f"/proc/{pid}/status").read_text()
        allowed = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        return parse_cpu_list(allowed.split(":")[1].strip())

    launcher = psutil.Process(live_pool.launcher.pid)
    pinned, router_cpus = {}, []
    for child in launcher.children(recursive=True):
        command = child.cmdline()
        if "worker" in command:
            pinned[command[command.index("--name") + 1]] = allowed_cpus(child.pid)
        elif "router" in command:
            router_cpus = allowed_cpus(child.pid)
    assert pinned == live_pool.worker_cores
    assert router_cpus == live_pool.router_cores


def test_workers_answer_directly_with_describe_and_generate(live_pool: LivePool) -> None:
    address = live_pool.worker_addresses()["bf16-0"]
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))
    assert stub.Describe(worker_pb2.DescribeRequest()).tier == "bf16"
    responses = list(stub.Generate(generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=3), timeout=60))
    _, summary = split(responses)
    assert summary.worker_id == "bf16-0" and summary.generated_tokens == 3


def _services(address: str) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(address))
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    return {s.name for reply in replies for s in reply.list_services_response.service}


def test_health_and_reflection_on_router_and_workers(live_pool: LivePool) -> None:
    addresses = {"router": live_pool.router_address, **live_pool.worker_addresses()}
    for name, address in addresses.items():
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        expected = "tierserve.v1.Router" if name == "router" else "tierserve.v1.Worker"
        assert {expected, "grpc.health.v1.Health"} <= _services(address), name


def test_watch_stats_pushes_live_figures(live_pool: LivePool) -> None:
    split(generate(live_pool, max_new_tokens=4))
    stream = router(live_pool).WatchStats(router_pb2.WatchStatsRequest(interval_ms=200), timeout=30)
    first, second = next(stream), next(stream)
    stream.cancel()
    assert second.timestamp_us - first.timestamp_us >= 150_000
    assert {w.worker_id for w in second.workers} == set(live_pool.worker_cores)
    assert any(w.relayed_latency.samples > 0 for w in second.workers)
    with pytest.raises(grpc.RpcError) as caught:
        next(router(live_pool).WatchStats(router_pb2.WatchStatsRequest(interval_ms=10)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_cancel_frees_the_worker_for_the_next_request(live_pool: LivePool) -> None:
    request = generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=256, tier="fp32")
    stream = router(live_pool).Generate(request, timeout=120)
    received = [next(stream) for _ in range(3)]
    stream.cancel()
    assert all(r.HasField("token") for r in received)
    # The next request on the same worker completes, long before 256 more tokens could have been made.
    _, summary = split(generate(live_pool, tier="fp32", max_new_tokens=3))
    assert summary.generated_tokens == 3
    assert summary.queue_time_us < 2_000_000
    address = live_pool.worker_addresses()["fp32-0"]
    info = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address)).Describe(worker_pb2.DescribeRequest())
    assert info.in_flight == 0 and info.queued == 0


def test_deadline_is_relayed(live_pool: LivePool) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        generate(live_pool, timeout=0.3, max_new_tokens=256, tier="fp32")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cli_generate_and_workers_print_tokens_and_summary(live_pool: LivePool) -> None:
    cli = [sys.executable, "-m", "tierserve.cli"]
    address = ["--address", live_pool.router_address]
    generated = subprocess.run(
        [*cli, "generate", PROMPT, *address, "--max-new-tokens", "5", "--tier", "bf16"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert generated.stdout.count(" ms  ") >= 5
    assert (
        "summary" in generated.stdout and "bf16-0 / bf16" in generated.stdout and "Paris" in generated.stdout
    )
    table = subprocess.run(
        [*cli, "workers", *address], capture_output=True, text=True, timeout=60, check=True
    )
    assert "fp32-0" in table.stdout and "bf16-0" in table.stdout and "serving" in table.stdout
    listed = subprocess.run(
        [*cli, "workers", *address, "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    reply = json_format.Parse(listed.stdout, router_pb2.ListWorkersResponse())
    assert {w.worker_id for w in reply.workers} == set(live_pool.worker_cores)
    bad = subprocess.run(
        [*cli, "generate", "", "--address", live_pool.router_address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stdout + bad.stderr


def test_concurrent_cancellations_lose_no_later_request(live_pool: LivePool) -> None:
    """Clients leaving mid-stream, while others wait, must not strand the queued ones."""
    done: list[generate_pb2.Summary] = []

    def leave_early() -> None:
        stream = router(live_pool).Generate(
            generate_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=200, tier="bf16"), timeout=60
        )
        next(stream)
        stream.cancel()

    def stay() -> None:
        done.append(split(generate(live_pool, tier="bf16", max_new_tokens=4))[1])

    threads = [threading.Thread(target=f) for f in (leave_early, stay, leave_early, stay)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(done) == 2 and all(s.generated_tokens == 4 for s in done)


def test_a_waiting_request_with_a_tighter_first_token_budget_goes_first(live_pool: LivePool) -> None:
    """Earliest deadline first at the worker: a tight request queued behind a loose one overtakes it
    (on the pool's worker with a batch of one: a batching worker queues only once its batch is full)."""
    worker = f"{ONE_AT_A_TIME_TIER}-0"
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(live_pool.worker_addresses()[worker]))
    first_token_at: dict[str, float] = {}

    def send(name: str, ttft_budget_ms: float, new_tokens: int) -> None:
        # A prompt that keeps the model busy: greedy counting does not stop early.
        prompt = "Count from 1 to 500, separated by commas: 1, 2, 3," if new_tokens > 4 else PROMPT
        request = generate_pb2.GenerateRequest(
            prompt=prompt, max_new_tokens=new_tokens, max_first_token_latency_ms=ttft_budget_ms
        )
        for _response in stub.Generate(request, timeout=180):
            first_token_at.setdefault(name, time.monotonic())

    def queued() -> int:
        return int(stub.Describe(worker_pb2.DescribeRequest()).queued)

    def wait_until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, "the worker never reached the expected state"
            time.sleep(0.01)

    # A long request holds the model while a loose then a tight request queue behind it.
    threads = {"running": threading.Thread(target=send, args=("running", 0, 256))}
    threads["running"].start()
    wait_until(lambda: "running" in first_token_at)
    threads["loose"] = threading.Thread(target=send, args=("loose", 60_000, 4))
    threads["loose"].start()
    wait_until(lambda: queued() == 1)
    threads["tight"] = threading.Thread(target=send, args=("tight", 10_000, 4))
    threads["tight"].start()
    wait_until(lambda: queued() == 2 or "loose" in first_token_at)
    assert "loose" not in first_token_at, "the long request ended before both had queued"
    for thread in threads.values():
        thread.join(timeout=180)
    assert first_token_at["tight"] < first_token_at["loose"]
