"""`tierserve bench soak` for two and a half minutes on a small pool of the default model (real router
and worker processes), bearer tokens on and a varied request mix: load above capacity is refused with
RESOURCE_EXHAUSTED and a retry hint, calls without a valid token are refused as such, no process's
resident memory or open descriptors grow past the stated bounds (reported before and after the load,
with the bound), and the pool serves once the load stops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.default_pool import default_model_config
from tierserve.benchmarks.soak import BOUNDS, MIB

pytestmark = pytest.mark.integration


def test_load_above_capacity_keeps_memory_and_descriptors_flat(tmp_path: Path) -> None:
    # The warm-up outlasts the workers' allocator high-water: after 20 s a worker's RSS still rose 70 MiB
    # along a saturating curve (3,326 -> 3,407 MiB by 40 s, 3,433 at 120 s), after 40 s it stayed flat.
    # Room for 2 x (2 + 2) requests (a batch of 2 and a queue of 2 on each worker) against 16 clients:
    # half of them are refused at any moment.
    router = {"port": 0, "health_interval_s": 0.3, "max_queue_per_worker": 2}
    batching = {"max_batch": 2}
    config = default_model_config(
        tmp_path / "pool.toml", [("a", "bf16"), ("b", "fp32")], router=router, batching=batching
    )
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "tierserve.cli", "bench", "soak", "--config", str(config),
            "--out", str(out), "--duration-s", "150", "--warmup-s", "50", "--clients", "16",
            "--new-tokens", "8", "--run-dir", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["verdict"] == {"passed": True, "problems": []}
    assert report["config"]["admitted"] == 8 and report["config"]["warmup_s"] == 50
    # The router and both workers, each sampled every 2 s and within the bounds; their figures before
    # the load and after it are reported beside the bounds checked.
    processes = {p["process"]: p for p in report["processes"]}
    assert set(processes) == {"router", "worker a", "worker b"}
    for process in processes.values():
        assert process["within_bounds"] and process["samples"] >= 25, process["problems"]
        assert process["growth"]["rss_mib"] <= BOUNDS.rss_growth_bytes / MIB
        assert process["growth"]["fds"] <= BOUNDS.fd_growth
        assert process["bounds"] == {
            "rss_growth_mib": BOUNDS.rss_growth_bytes / MIB,
            "fd_growth": BOUNDS.fd_growth,
        }
        assert process["before_load"]["rss_mib"] > 0 and process["after_load"]["fds"] > 0
    # Tokens on: every client carried one of three, one capped at a few streams; the calls without a
    # valid token were all refused as such.
    assert set(report["config"]["tokens"]) == {"soak-a", "soak-b", "soak-capped"}
    unauthorized = report["without_valid_token"]
    assert set(unauthorized["no token"]) == {"UNAUTHENTICATED"}
    assert set(unauthorized["unknown token"]) == {"PERMISSION_DENIED"}
    # Varied prompts: plain and chat, greedy and sampled, some with stop strings, of many lengths.
    mix = report["mix"]
    assert set(mix["kinds"]) == {"prompt", "chat", "sampled", "stop strings"}, mix
    assert mix["prompt_words"]["distinct"] >= 10 and mix["primed"] == 8
    requests = report["requests"]
    # Above capacity: refused with RESOURCE_EXHAUSTED, every refusal with its retry hint, promptly.
    assert set(requests["by_code"]) == {"OK", "RESOURCE_EXHAUSTED"}, requests["by_code"]
    assert requests["refused"] > 0 and requests["completed"] > 0 and requests["unfinished"] == 0
    # Refused for the pool's capacity, and for the capped token's own limit.
    assert 0 < requests["refused_for_client_limit"] < requests["refused"]
    assert requests["refusals_without_hint"] == 0 and requests["retry_hint_ms"]["min"] > 0
    # Both workers served: each process's figures are of a worker under load.
    assert set(requests["served_by"]) == {"a", "b"}, requests["served_by"]
    assert requests["refusal_ms"]["p99"] <= BOUNDS.refusal_p99_s * 1e3
    # Once the load stopped, a plain request completed.
    assert report["recovery"]["recovered"] and report["recovery"]["status"] == "OK"
    assert "verdict: PASS" in result.stderr
    markdown = out.with_suffix(".md").read_text()
    assert "RSS MiB before / warm / max / last / after" in markdown and "verdict: PASS" in markdown
    print(markdown)
