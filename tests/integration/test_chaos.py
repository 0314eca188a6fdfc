"""`tierserve bench chaos` on the default model: workers killed and restarted under load, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.default_pool import default_model_config

pytestmark = pytest.mark.integration


def test_chaos_loses_no_request_and_writes_its_report(tmp_path: Path) -> None:
    config = default_model_config(tmp_path / "pool.toml", [("a", "bf16"), ("b", "fp32")])
    out = tmp_path / "chaos.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "tierserve.cli", "bench", "chaos", "--config", str(config),
            "--out", str(out), "--duration-s", "40", "--clients", "3", "--kill-every-s", "8",
            "--new-tokens", "48", "--run-dir", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["config"]["workers"] == ["a", "b"] and report["config"]["duration_s"] == 40
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
    # The killed worker had requests: they failed over, before or after their first token.
    assert requests["resumed_after_failover"] + requests["retried_before_first_token"] >= 1
    assert f"lost {requests['lost']}" in result.stderr
    print(json.dumps(report, indent=2))
