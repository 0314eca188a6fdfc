"""What the cache holds, and which of it a config's pool still uses (`tierserve cache`).

Every change that enters a key leaves the old copy behind: a tier's artifact folder (keyed by
the model's content, the tier's recipe and kernel path and the library versions; an int4-woq
folder is 104 MB), the kernel library (by its sources, torch and the CPU) and the default model's
conversion (by the packaged file and the converter). Nothing deletes them on its own, because
another installed version or another config may still serve from them. An operator prunes after
an upgrade: what the given config's pool would load stays, the rest goes.

A folder is deleted under the lock its builder holds, so a build in progress (or its staging
folder) is skipped, never pulled from under it. A process that already loaded a deleted file
keeps its copy: Linux frees a file's blocks when the last mapping goes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from tierserve.domain.config import TierserveConfig
from tierserve.domain.files import exclusive_if_free
from tierserve.domain.textsets import calibration_path
from tierserve.domain.tiers import TIER_NAMES
from tierserve.ops.modelprep import ModelPreparationError, default_model_folder
from tierserve.worker.artifacts import ArtifactStore, model_fingerprint
from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import decode_attention
from tierserve.worker.tiers import TierContext, make_tier

ARTIFACTS = "artifacts"
KERNELS = "kernels"
MODELS = "models"
# A kernel build's temporary files younger than this may belong to a build still running.
KERNEL_BUILD_GRACE_S = decode_attention.BUILD_TIMEOUT_S


class Kind(StrEnum):
    ARTIFACT = "artifact"
    KERNEL = "kernel library"
    MODEL = "converted model"
    LEFTOVER = "unfinished build"


@dataclass(frozen=True)
class InUse:
    """The names a config's pool would load from each part of the cache."""

    artifacts: frozenset[str]
    # Tiers whose artifact key could not be computed here, with why: their folders are all kept.
    undecided_tiers: dict[str, str] = field(default_factory=dict)
    kernel: str | None = None
    # None: the config names its own model folder, so every conversion of the default is kept.
    model: str | None = None


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: Kind
    size_bytes: int
    kept: bool
    reason: str


class ModelNotPrepared(ModelPreparationError):
    """The config's model is not in the cache, so its artifacts cannot be told from stale ones."""


def in_use(config: TierserveConfig) -> InUse:
    """What `config`'s pool would load: every tier's artifact under the config's recipes (not
    only the served tiers: `quantize` and the benchmarks use the others), this CPU's kernel
    library, and the default model's conversion unless the config names a model folder."""
    model_dir = (
        Path(config.model.path).expanduser() if config.model.path else default_model_folder(config.model)
    )
    if not (model_dir / "config.json").is_file():
        raise ModelNotPrepared(
            f"the model folder {model_dir} is missing, so its artifacts cannot be told from stale "
            "ones; run `tierserve model prepare` first"
        )
    store = ArtifactStore(config.model.resolved_cache_dir() / ARTIFACTS)
    fingerprint = model_fingerprint(model_dir)
    isa = CpuIsa.detect()
    calibration = calibration_path(config.data)
    artifacts: set[str] = set()
    undecided: dict[str, str] = {}
    for name in TIER_NAMES:
        context = TierContext(recipe=config.recipe(name), isa=isa, calibration_file=calibration)
        try:
            tier = make_tier(name, context)
            artifacts.add(store.folder_for(tier, store.key_inputs(tier, fingerprint)).name)
        except Exception as error:  # a tier this machine cannot key: keep its folders, say why
            undecided[name] = f"{type(error).__name__}: {error}"
    return InUse(
        artifacts=frozenset(artifacts),
        undecided_tiers=undecided,
        kernel=decode_attention.library_name(),
        model=None if config.model.path else model_dir.name,
    )


def survey(cache_dir: Path, use: InUse, now: float | None = None) -> list[CacheEntry]:
    """Every artifact folder, kernel library, converted model and build leftover under
    `cache_dir`, each marked kept (with why) or not. Lock files are left alone: they are empty,
    and deleting one another process holds would let two builders in at once."""
    now = time.time() if now is None else now
    return [
        *_artifacts(cache_dir / ARTIFACTS, use),
        *_kernels(cache_dir / KERNELS, use, now),
        *_models(cache_dir / MODELS, use),
    ]


def prune(cache_dir: Path, entries: list[CacheEntry]) -> list[tuple[CacheEntry, str | None]]:
    """Delete the entries not kept; each with None when deleted, else why it was skipped."""
    outcomes: list[tuple[CacheEntry, str | None]] = []
    for entry in entries:
        if not entry.kept:
            outcomes.append((entry, _delete(cache_dir, entry)))
    return outcomes


def _artifacts(root: Path, use: InUse) -> Iterator[CacheEntry]:
    for path in _children(root):
        if path.name.startswith("."):
            yield _leftover(path)
            continue
        tier = path.name.rsplit("-", 1)[0]
        if path.name in use.artifacts:
            yield CacheEntry(path, Kind.ARTIFACT, _size(path), True, f"{tier} as this config builds it")
        elif tier in use.undecided_tiers:
            why = use.undecided_tiers[tier]
            yield CacheEntry(path, Kind.ARTIFACT, _size(path), True, f"{tier}'s key is unknown here: {why}")
        else:
            yield CacheEntry(
                path, Kind.ARTIFACT, _size(path), False, f"{tier} built by other code, model or recipe"
            )


def _kernels(root: Path, use: InUse, now: float) -> Iterator[CacheEntry]:
    for path in _children(root):
        if path.name.startswith(decode_attention.LIBRARY_PREFIX) and path.suffix == ".so":
            if path.name == use.kernel:
                yield CacheEntry(path, Kind.KERNEL, _size(path), True, "built for this source, torch and CPU")
            else:
                yield CacheEntry(
                    path, Kind.KERNEL, _size(path), False, "built for other sources, torch or CPU"
                )
        elif now - path.stat().st_mtime > KERNEL_BUILD_GRACE_S:
            yield CacheEntry(path, Kind.LEFTOVER, _size(path), False, "a kernel build that did not finish")
        else:
            yield CacheEntry(path, Kind.LEFTOVER, _size(path), True, "a kernel build that may be running")


def _models(root: Path, use: InUse) -> Iterator[CacheEntry]:
    for path in _children(root):
        if path.name.startswith("."):
            yield _leftover(path)
        elif use.model is None:
            yield CacheEntry(path, Kind.MODEL, _size(path), True, "the config names its own model folder")
        elif path.name == use.model:
            yield CacheEntry(
                path, Kind.MODEL, _size(path), True, "the default model, as this code converts it"
            )
        else:
            yield CacheEntry(
                path, Kind.MODEL, _size(path), False, "another package version or converter's conversion"
            )


def _leftover(path: Path) -> CacheEntry:
    """A staging folder (`.NAME-XXXXXXXX`): its build is running if NAME's lock is held."""
    return CacheEntry(path, Kind.LEFTOVER, _size(path), False, "a build that did not finish")


def _children(root: Path) -> list[Path]:
    """The folders (and, for kernels, files) worth listing; lock files are not."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() or p.suffix not in (".lock", ""))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum((Path(folder) / name).stat().st_size for folder, _, names in os.walk(path) for name in names)


def _lock_for(entry: CacheEntry) -> Path | None:
    """The lock a folder's builder holds while it writes the folder (or its staging copy)."""
    if entry.path.parent.name == KERNELS:
        return None  # a loaded library stays mapped; builds write elsewhere and rename
    name = entry.path.name
    if name.startswith("."):
        name = name[1 : name.rfind("-")]  # mkdtemp's `.NAME-XXXXXXXX`
    return entry.path.parent / f".{name}.lock"


def _delete(cache_dir: Path, entry: CacheEntry) -> str | None:
    if cache_dir.resolve() not in entry.path.resolve().parents:
        return f"{entry.path} is outside the cache {cache_dir}"  # a symlink's target is not ours
    lock = _lock_for(entry)
    if lock is None:
        return _remove(entry.path)
    with exclusive_if_free(lock) as held:
        if not held:
            return "in use: another process is building it"
        return _remove(entry.path)


def _remove(path: Path) -> str | None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return None
