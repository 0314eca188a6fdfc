"""`tierserve bench chaos` on the tiny model: workers killed and restarted under load, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_launcher import tiny_model, write_config

pytestmark = pytest.mark.integration

__all__ = ["tiny_model"]


def test_chaos_loses_no_request_and_writes_its_report(tmp_path: Path, tiny_model: Path) -> None:
    config = write_config(
        tmp_path / "pool.toml",
        tiny_model,
        [{"name": "a", "tier": "fp32", "warmup_runs": 0}, {"name": "b", "tier": "fp32", "warmup_runs": 0}],
    )
    out = tmp_path / "chaos.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "tierserve.cli", "bench", "chaos", "--config", str(config),
            "--out", str(out), "--duration-s", "20", "--clients", "3", "--kill-every-s", "5",
            "--new-tokens", "48", "--run-dir", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    requests = report["requests"]
    assert requests["lost"] == 0 and requests["seams"] == 0
    assert requests["completed"] > 0 and len(report["kills"]) >= 2 and report["restarts"] >= 1
    print(json.dumps(report, indent=2))
