"""`tierserve cache`: which cached files a config's pool uses, and pruning the rest safely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tierserve.domain.config import ModelConfig, default_config
from tierserve.domain.files import exclusive
from tierserve.worker.cache import (
    ARTIFACTS,
    KERNEL_BUILD_GRACE_S,
    KERNELS,
    MODELS,
    InUse,
    Kind,
    ModelNotPrepared,
    in_use,
    prune,
    survey,
)
from tierserve.worker.kernels.decode_attention import LIBRARY_PREFIX

NOW = 1_000_000_000.0


def _folder(path: Path, size: int = 10) -> Path:
    path.mkdir(parents=True)
    (path / "weights.safetensors").write_bytes(b"w" * size)
    return path


def _cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    _folder(cache / ARTIFACTS / "int4-woq-aaaa", 100)
    _folder(cache / ARTIFACTS / "int4-woq-bbbb", 200)
    _folder(cache / ARTIFACTS / "int8-sq-cccc", 300)
    (cache / ARTIFACTS / ".int4-woq-aaaa.lock").touch()
    (cache / KERNELS).mkdir(parents=True)
    for name in ("new", "old"):
        (cache / KERNELS / f"{LIBRARY_PREFIX}{name}.so").write_bytes(b"so")
    _folder(cache / MODELS / "smollm2-new", 40)
    _folder(cache / MODELS / "smollm2-old", 50)
    return cache


USE = InUse(
    artifacts=frozenset({"int4-woq-aaaa"}),
    undecided_tiers={"int8-sq": "RuntimeError: no VNNI"},
    kernel=f"{LIBRARY_PREFIX}new.so",
    model="smollm2-new",
)


def _by_name(entries: list) -> dict[str, bool]:  # type: ignore[type-arg]
    return {entry.path.name: entry.kept for entry in entries}


def test_survey_keeps_what_the_config_loads_and_marks_the_rest(tmp_path: Path) -> None:
    entries = survey(_cache(tmp_path), USE, NOW)
    assert _by_name(entries) == {
        "int4-woq-aaaa": True,
        "int4-woq-bbbb": False,
        "int8-sq-cccc": True,  # its key is unknown here, so nothing of that tier is judged stale
        f"{LIBRARY_PREFIX}new.so": True,
        f"{LIBRARY_PREFIX}old.so": False,
        "smollm2-new": True,
        "smollm2-old": False,
    }
    sizes = {entry.path.name: entry.size_bytes for entry in entries}
    assert sizes["int4-woq-bbbb"] == 200 and sizes[f"{LIBRARY_PREFIX}old.so"] == 2
    assert "no VNNI" in next(e.reason for e in entries if e.path.name == "int8-sq-cccc")


def test_a_config_with_its_own_model_folder_keeps_every_conversion(tmp_path: Path) -> None:
    entries = survey(_cache(tmp_path), InUse(artifacts=frozenset(), model=None), NOW)
    models = [entry for entry in entries if entry.kind is Kind.MODEL]
    assert len(models) == 2 and all(entry.kept for entry in models)


def test_prune_deletes_only_what_is_not_used_and_leaves_lock_files(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    outcomes = prune(cache, survey(cache, USE, NOW))
    assert sorted(entry.path.name for entry, skipped in outcomes if skipped is None) == sorted(
        ["int4-woq-bbbb", f"{LIBRARY_PREFIX}old.so", "smollm2-old"]
    )
    assert _by_name(survey(cache, USE, NOW)) == {
        "int4-woq-aaaa": True,
        "int8-sq-cccc": True,
        f"{LIBRARY_PREFIX}new.so": True,
        "smollm2-new": True,
    }
    assert (cache / ARTIFACTS / ".int4-woq-aaaa.lock").is_file()


def test_a_build_in_progress_is_skipped_and_a_dead_one_removed(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    running = _folder(cache / ARTIFACTS / ".int8-woq-dddd-k2j4x9ab")
    dead = _folder(cache / ARTIFACTS / ".int4-woq-eeee-q8w1z0cd")
    with exclusive(cache / ARTIFACTS / ".int8-woq-dddd.lock"):  # the builder's lock
        outcomes = {entry.path.name: skipped for entry, skipped in prune(cache, survey(cache, USE, NOW))}
    assert "building" in str(outcomes[running.name])
    assert outcomes[dead.name] is None
    assert running.is_dir() and not dead.exists()


def test_a_stale_artifact_being_rebuilt_is_not_deleted(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    with exclusive(cache / ARTIFACTS / ".int4-woq-bbbb.lock"):
        outcomes = prune(cache, survey(cache, USE, NOW))
    assert (cache / ARTIFACTS / "int4-woq-bbbb").is_dir()
    assert any(entry.path.name == "int4-woq-bbbb" and skipped for entry, skipped in outcomes)


def test_kernel_build_leftovers_go_only_after_a_build_could_have_finished(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    fresh = _folder(cache / KERNELS / "build-fresh")
    old = _folder(cache / KERNELS / "build-old")
    staged = cache / KERNELS / f"{LIBRARY_PREFIX}new.123.tmp"
    staged.write_bytes(b"half")
    for path in (fresh, old, staged):
        age = 10 if path is fresh else KERNEL_BUILD_GRACE_S + 10
        os.utime(path, (NOW - age, NOW - age))
    kept = _by_name(survey(cache, USE, NOW))
    assert kept["build-fresh"] is True and kept["build-old"] is False and kept[staged.name] is False


def test_a_symlink_out_of_the_cache_is_never_followed(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    outside = _folder(tmp_path / "elsewhere" / "precious")
    (cache / ARTIFACTS / "int4-woq-ffff").symlink_to(outside, target_is_directory=True)
    outcomes = prune(cache, survey(cache, USE, NOW))
    refused = [skipped for entry, skipped in outcomes if entry.path.name == "int4-woq-ffff"]
    assert refused and refused[0] is not None and "outside the cache" in refused[0]
    assert (outside / "weights.safetensors").is_file()


def test_an_unprepared_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    model = {"path": str(tmp_path / "model"), "cache_dir": str(tmp_path / "cache")}
    config = default_config([0]).model_copy(update={"model": ModelConfig.model_validate(model)})
    with pytest.raises(ModelNotPrepared, match="tierserve model prepare"):
        in_use(config)
