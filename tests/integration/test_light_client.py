"""The light client on its own: `pip install clients/python` into a clean virtual environment of the
oldest and newest Python the machine has (through pyenv), no torch there, streaming from the session pool."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import LivePool

pytestmark = pytest.mark.integration

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"

# Runs in the clean environment: a few tokens through the SDK, then what arrived, as JSON.
STREAM_SCRIPT = """
import json, sys
from tierserve_client import Client, ClientOptions, GenerateParams

with Client(ClientOptions(sys.argv[1], timeout_s=120)) as client:
    stream = client.stream("The capital of France is", GenerateParams(max_new_tokens=8))
    tokens = [token.text for token in stream]
summary = stream.summary
print(json.dumps({
    "python": list(sys.version_info[:2]),
    "tokens": len(tokens),
    "summary_tier": summary.tier if summary else None,
    "generated_tokens": summary.generated_tokens if summary else None,
}))
"""


def pyenv_python(minor: str) -> Path | None:
    """The newest pyenv interpreter of `minor` (e.g. "3.9"), if installed."""
    releases = [
        version
        for version in PYENV_VERSIONS.glob(f"{minor}.*")
        if re.fullmatch(rf"{re.escape(minor)}\.\d+", version.name) and (version / "bin" / "python").exists()
    ]
    if not releases:
        return None
    newest = max(releases, key=lambda version: int(version.name.rsplit(".", 1)[1]))
    return newest / "bin" / "python"


def run(command: list[str | Path], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run outside this test's environment: no inherited venv or PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def clean_client_environment(python: Path, root: Path) -> Path:
    """A new virtual environment holding the light client and its dependencies; its python."""
    run([python, "-m", "venv", root / "venv"], root, timeout=180).check_returncode()
    venv_python = root / "venv" / "bin" / "python"
    # A copy without build/ or egg-info leftovers from the working tree.
    source = root / "tierserve-client"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    installed = run([venv_python, "-m", "pip", "install", "--quiet", source], root, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv_python


# The oldest and the newest Python the machine has.
@pytest.mark.parametrize("minor", ["3.9", "3.13"])
def test_light_client_streams_from_a_clean_environment_without_torch(
    live_pool: LivePool, tmp_path: Path, minor: str
) -> None:
    python = pyenv_python(minor)
    if python is None:
        pytest.skip(f"no Python {minor} under {PYENV_VERSIONS} (pyenv install {minor})")
    venv_python = clean_client_environment(python, tmp_path)

    torch = run([venv_python, "-c", "import torch"], tmp_path, timeout=60)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr, torch.stderr
    listed = run([venv_python, "-m", "pip", "list", "--format=json"], tmp_path, timeout=120)
    packages = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "tierserve-client" in packages
    assert not packages & {"torch", "intel-extension-for-pytorch", "tierserve"}, sorted(packages)

    streamed = run([venv_python, "-c", STREAM_SCRIPT, live_pool.router_address], tmp_path, timeout=300)
    assert streamed.returncode == 0, streamed.stderr
    result = json.loads(streamed.stdout.strip().splitlines()[-1])
    assert result["python"] == [int(part) for part in minor.split(".")]
    assert result["tokens"] > 0
    assert result["summary_tier"], f"no summary arrived: {result}"
    assert result["generated_tokens"] == result["tokens"]
