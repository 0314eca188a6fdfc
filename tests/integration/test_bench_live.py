"""The live benchmarks' code paths and `tierserve plan --router` on a tiny random model: real processes,
a handful of requests (figures from a tiny model mean nothing; the paths and outputs do)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from tests.tiny_model import build_tiny_model_dir
from tierserve.benchmarks.livepool import running_pool
from tierserve.benchmarks.overhead import run_overhead_benchmark
from tierserve.benchmarks.routing import available_policies, run_routing_benchmark
from tierserve.cli import main
from tierserve.domain.config import TierserveConfig, config_to_toml, parse_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, TierserveConfig]]:
    root = tmp_path_factory.mktemp("bench-live")
    model = build_tiny_model_dir(root / "model")
    config = parse_config(
        {
            "model": {"path": str(model)},
            "router": {"port": 0, "http_port": 0, "health_interval_s": 0.3},
            "data": {"eval_tokens": 64, "eval_chunk_tokens": 32},
            "workers": [
                {"name": "fp32-0", "tier": "fp32", "warmup_runs": 1},
                {"name": "bf16-0", "tier": "bf16", "warmup_runs": 1},
            ],
        }
    )
    file = root / "pool.toml"
    file.write_text(config_to_toml(config))
    yield file, config


def test_plan_and_overhead_against_a_running_pool(
    tiny_config: tuple[Path, TierserveConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, config = tiny_config
    console = Console(stderr=True)
    out = tmp_path / "overhead.json"
    with running_pool(config, tmp_path / "run", console) as launcher:
        assert main(["plan", "--router", launcher.router_address, "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert {t["tier"] for t in plan["tiers"]} == {"fp32", "bf16"}
        assert all(t["tpot_ms"] > 0 and t["workers"] >= 1 for t in plan["tiers"])
        # No traffic yet, so no TPOT by concurrency: one stream per worker, said so.
        for tier in plan["tiers"]:
            assert tier["streams_per_worker"] == 1 and tier["workers"] == tier["one_stream_workers"]
            assert tier["max_batch"] >= 1 and "one stream" in tier["streams_basis"]
        code = run_overhead_benchmark(
            out, str(file), router=launcher.router_address, http=launcher.http_url, tier="fp32", requests=3,
            new_tokens=4, timeout_s=60, run_dir=None, console=console,
        )  # fmt: skip
        concurrent_out = tmp_path / "overhead-concurrent.json"
        concurrent_code = run_overhead_benchmark(
            concurrent_out, str(file), router=launcher.router_address, tier="fp32", requests=2,
            new_tokens=4, timeout_s=60, run_dir=None, console=console, concurrency=3,
        )  # fmt: skip
    assert code == 0 and concurrent_code == 0
    # Three streams at once per path and round: three pairs a round, each its own stream's gaps.
    concurrent = json.loads(concurrent_out.read_text())
    assert concurrent["meta"]["concurrency"] == 3
    assert concurrent["figures"]["pairs"] == 6 and concurrent["figures"]["tokens_compared"] == 18
    assert "3 concurrent stream(s)" in concurrent_out.with_suffix(".md").read_text()
    report = json.loads(out.read_text())
    figures = report["figures"]
    assert figures["pairs"] == 3 and figures["tokens_compared"] == 9
    assert figures["rate_ratio"] > 0 and set(figures["targets"]) == {
        "per_token_p50_le_0.3ms", "ttft_p99_le_2ms", "token_rate_ge_0.97x",
    }  # fmt: skip
    # The HTTP API beside gRPC, in the same run.
    over_grpc = report["http_figures"]
    assert over_grpc["pairs"] == 3 and over_grpc["tokens_compared"] == 9 and over_grpc["rate_ratio"] > 0
    assert set(over_grpc["tokens_per_s"]) == {"http", "grpc"}
    markdown = out.with_suffix(".md").read_text()
    assert "router - direct" in markdown and "http - grpc" in markdown


def test_routing_benchmark_runs_every_policy_on_one_trace(
    tiny_config: tuple[Path, TierserveConfig], tmp_path: Path
) -> None:
    file, _ = tiny_config
    registered = available_policies()
    policies = [p for p in ("slo", "round_robin") if p in registered] or registered[:1]
    out = tmp_path / "routing.json"
    code = run_routing_benchmark(
        out, str(file), policies=",".join(policies), tiers=None, loads="0.5", rates=None, requests=6,
        seed=1, prompt_words_mix="4,8", new_tokens_mix="3,5", budgets=None, timeout_s=60,
        run_dir=tmp_path / "run", console=Console(stderr=True),
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["policy"] for r in report["results"]] == policies
    for row in report["results"]:
        assert row["offered"] == 6 and row["completed"] + row["rejected_total"] == 6
        assert 0.0 <= row["attainment"] <= 1.0 and row["accuracy_violations"] >= 0
    assert "rule" in report["target"]
    assert "| load |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").exists() or "matplotlib" not in str(report)
