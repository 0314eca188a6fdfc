"""How a sampled request's random generator continues after a failover resume: the router fixes the
seed before the first worker, and the resumed worker samples with a seed derived from it and the
resume point; the summary reports the seed that replays the request."""

from __future__ import annotations

import grpc
from tierserve_client.v1 import generate_pb2

from tierserve.router.failover import SEED_BITS, StreamProgress, WorkerStreamFailed, resume_seed
from tierserve.router.policies.base import RoutingDecision
from tierserve.router.summary import complete_summary


def streamed(progress: StreamProgress, count: int) -> None:
    for index in range(count):
        progress.relay_token(generate_pb2.Token(text=f" w{index}", index=index, latency_us=1000), 0.0)


def test_resume_seed_is_a_fixed_nonzero_function_of_seed_and_resume_point() -> None:
    seeds = {resume_seed(seed, sent) for seed in (1, 7, 2**63 - 1) for sent in (1, 2, 5, 100)}
    assert len(seeds) == 12 and all(0 < s < 2**SEED_BITS for s in seeds)
    assert resume_seed(7, 5) == resume_seed(7, 5) != 7


def test_a_sampled_request_gets_its_seed_from_the_router_and_a_greedy_one_none() -> None:
    sampled = StreamProgress(generate_pb2.GenerateRequest(prompt="p", temperature=0.8), 10)
    assert 0 < sampled.request.seed < 2**SEED_BITS
    assert sampled.worker_request().seed == sampled.request.seed
    chosen = StreamProgress(generate_pb2.GenerateRequest(prompt="p", temperature=0.8, seed=42), 10)
    assert chosen.request.seed == 42
    greedy = StreamProgress(generate_pb2.GenerateRequest(prompt="p"), 10)
    assert greedy.request.seed == 0 and greedy.worker_request().seed == 0


def test_a_resumed_sampled_stream_continues_with_the_derived_seed_and_reports_the_original() -> None:
    progress = StreamProgress(generate_pb2.GenerateRequest(prompt="p", temperature=0.8, seed=42), 10)
    streamed(progress, 4)
    progress.failed(WorkerStreamFailed("a", grpc.StatusCode.UNAVAILABLE, "killed"))
    resumed = progress.worker_request()
    assert resumed.seed == resume_seed(42, 4) and resumed.max_new_tokens == 6
    assert (resumed.prompt, resumed.response_prefix) == ("p", "".join(f" w{i}" for i in range(4)))
    # The same failure point resumes the same way.
    assert progress.worker_request().seed == resumed.seed
    summary = generate_pb2.Summary(generated_tokens=6, seed=resumed.seed, text=" rest")
    complete_summary(summary, progress, 1000, "slo", RoutingDecision("b", "resumed on b"))
    assert summary.seed == 42 and summary.resumed_after_tokens == 4


def test_a_resumed_greedy_stream_keeps_no_seed() -> None:
    progress = StreamProgress(generate_pb2.GenerateRequest(prompt="p"), 10)
    streamed(progress, 3)
    progress.failed(WorkerStreamFailed("a", grpc.StatusCode.UNAVAILABLE, "killed"))
    assert progress.worker_request().seed == 0
