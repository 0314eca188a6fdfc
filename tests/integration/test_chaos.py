"""`tierserve bench chaos` on the default model: workers killed and restarted under load, nothing lost, and
every greedy stream, resumed after a kill or not, reads exactly as an uninterrupted run of the same
request on the same tier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.default_pool import default_model_config

pytestmark = pytest.mark.integration


def test_chaos_loses_no_request_and_writes_its_report(tmp_path: Path) -> None:
    # Two workers of the tier the requests are pinned to: a stream resumes on the other one.
    config = default_model_config(tmp_path / "pool.toml", [("a", "fp32"), ("b", "fp32")])
    out = tmp_path / "chaos.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "tierserve.cli", "bench", "chaos", "--config", str(config),
            "--out", str(out), "--duration-s", "40", "--clients", "3", "--kill-every-s", "8",
            "--new-tokens", "48", "--tier", "fp32", "--run-dir", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["config"]["workers"] == ["a", "b"] and report["config"]["duration_s"] == 40
    assert report["config"]["tier"] == "fp32" and report["config"]["request_lengths"] == [24, 48]
    requests = report["requests"]
    assert requests["lost"] == 0 and requests["seams"] == 0 and requests["unfinished"] == 0
    # No worker fault reached a client: every request completed, was refused for overload (with 3
    # clients against two workers' queues: none) or was cancelled by its own client on purpose.
    assert requests["fault_failures_by_code"] == {} and requests["unexpected_failures_by_code"] == {}
    assert set(requests["failed_by_code"]) <= {"RESOURCE_EXHAUSTED"}
    assert requests["sent"] == (
        requests["completed"] + requests["refused_for_overload"] + requests["cancelled_by_client"]
    )
    assert report["config"]["cancel_share"] > 0
    # A restarted default-model worker takes about half a minute to serve again on two shared cores,
    # and the next kill waits for it: one kill at least, always of the busiest worker.
    assert requests["completed"] > 0 and report["kills"] and report["restarts"] >= 1
    assert all(kill["worker"] in ("a", "b") and kill["in_flight"] >= 1 for kill in report["kills"])
    # The killed worker had requests: they failed over, before or after their first token. Kills
    # land mid-stream (the busiest worker, 3 clients on 2 workers, streams of 24 or 48 tokens).
    assert requests["resumed_after_failover"] >= 1
    # Every stream read to its summary has the text of the same request run alone, before any kill,
    # on fp32: the resumed ones above all (the next worker continues from the text streamed so far).
    texts = report["texts"]
    assert texts["compared"] == requests["completed"] and texts["tier"] == "fp32"
    assert texts["resumed_compared"] == requests["resumed_after_failover"]
    assert texts["mismatches"] == 0, json.dumps(texts["mismatch_examples"], indent=2)
    assert f"lost {requests['lost']}" in result.stderr and "0 differ (0 resumed)" in result.stderr
    markdown = out.with_suffix(".md").read_text()
    assert "| **lost** | **0** |" in markdown
    assert "| **texts that differ** (resumed) | **0** (0) |" in markdown
    print(markdown)
