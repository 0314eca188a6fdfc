"""buf lint over protos/ (buf.yaml: STANDARD and COMMENTS, with the contract's waivers); skipped
without node and npm."""

from __future__ import annotations

import subprocess

from tests.npm import REPO, ensure_installed

BUF_DIR = REPO / "tools" / "buf"


def test_protos_pass_buf_lint() -> None:
    ensure_installed(BUF_DIR, ".bin/buf")
    done = subprocess.run(
        [str(BUF_DIR / "node_modules" / ".bin" / "buf"), "lint"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
