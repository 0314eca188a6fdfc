"""`tierserve cache` against the cache the live pool of the default model loads from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.integration.conftest import LivePool
from tierserve.cli import main
from tierserve.worker.kernels import decode_attention

pytestmark = pytest.mark.integration


def _loaded_artifacts(pool: LivePool) -> dict[str, Path]:
    """Each worker's artifact folder, from its log's `loaded ... (artifact PATH)` line."""
    folders = {}
    for log in sorted((pool.run_dir / "logs").glob("worker-*.log")):
        found = re.search(r"loaded (\S+) tier from .* \(artifact (\S+)\)", log.read_text(errors="replace"))
        assert found, f"{log.name} names no artifact"
        folders[found[1]] = Path(found[2])
    return folders


def test_cache_list_marks_every_folder_the_pool_loaded_as_used_and_prune_dry_run_deletes_nothing(
    live_pool: LivePool, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = _loaded_artifacts(live_pool)
    assert set(loaded) == {name.rsplit("-", 1)[0] for name in live_pool.worker_cores}

    assert main(["cache", "list", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    used = {Path(entry["path"]) for entry in entries if entry["used"]}
    for tier, folder in loaded.items():
        assert folder in used, f"{tier}'s artifact {folder} is not marked used"
    # Exactly one used artifact per tier: the key computed without loading agrees with the build's.
    used_artifacts = [Path(e["path"]).name for e in entries if e["kind"] == "artifact" and e["used"]]
    assert sorted(name.rsplit("-", 1)[0] for name in used_artifacts) == sorted(loaded)
    kernels = [Path(e["path"]).name for e in entries if e["kind"] == "kernel library" and e["used"]]
    assert kernels == [decode_attention.library_name()]

    before = {Path(entry["path"]) for entry in entries}
    assert main(["cache", "prune", "--dry-run"]) == 0
    assert "would free" in capsys.readouterr().out
    assert all(path.exists() for path in before)
