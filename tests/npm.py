"""npm projects used by tests (examples/node, tools/buf): skip without node and npm, `npm ci` once."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NPM_TIMEOUT_S = 300


def node() -> str:
    """The node executable; skips the test when node or npm is missing."""
    found, npm = shutil.which("node"), shutil.which("npm")
    if found is None or npm is None:
        pytest.skip("needs `node` and `npm` on PATH")
    return found


def ensure_installed(project: Path, probe: str) -> None:
    """Run `npm ci` in `project` unless node_modules/<probe> exists; skip the test if it fails."""
    node()
    if (project / "node_modules" / probe).exists():
        return
    installed = subprocess.run(
        [str(shutil.which("npm")), "ci", "--no-audit", "--no-fund"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
    )
    if installed.returncode != 0:
        pytest.skip(f"`npm ci` in {project.name} failed (no registry access?): {installed.stderr[-2000:]}")
