"""Cached tier artifacts: what a tier's offline step wrote, and the accuracy cards measured on it.

An artifact folder is keyed by the model's content, the tier's recipe and kernel path and the
library versions. Its cards are files beside the weights, one per evaluation (the texts, how
much of them is scored, and the path they are scored through: `preparation`), so scoring another
way measures a card again without rebuilding weights that took minutes (int8-woq on an AMX Xeon:
513 s). Builds whose processes share a CPU take turns (a lock
per CPU): two workers building and scoring different tiers on the same 2 cores each ran about 10x
slower than one alone (a 2,456-token bf16 card: over 20 minutes against 2 on a Zen 3), their
threads competing for the cores; workers on CPUs of their own still build at once.

A manifest lists every file with its SHA-256; a folder whose manifest is missing, unreadable or
does not match its files is rebuilt with a warning, never trusted and never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from tierserve.domain.files import exclusive, file_sha256
from tierserve.worker.accuracy import AccuracyCard
from tierserve.worker.tiers.base import LoadedModel, Tier

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 2
MANIFEST = "manifest.json"
VERSIONED_PACKAGES = ("torch", "intel-extension-for-pytorch", "transformers", "torchao")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model")


class StaleArtifact(Exception):
    """An artifact folder that must not be used; the message says why."""


def library_versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def model_fingerprint(model_dir: Path) -> str:
    """Content hash of a model folder: its weights, config and tokenizer files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    path: Path
    card: AccuracyCard
    # The model as built, when it was built just now (saves loading it a second time).
    loaded: LoadedModel | None = None


# Measures a card for a freshly loaded tier; reports (stage, done, total) as it goes.
CardMeasurer = Callable[[LoadedModel, Callable[[int, int], None]], AccuracyCard]
ProgressSink = Callable[[str, int, int], None]


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def key_inputs(self, tier: Tier, model_digest: str) -> dict[str, Any]:
        return {
            "format": ARTIFACT_FORMAT,
            "model": model_digest,
            "recipe": tier.recipe_key(),
            "versions": library_versions(),
        }

    def folder_for(self, tier: Tier, inputs: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / f"{tier.name}-{key}"

    def ensure(
        self,
        tier: Tier,
        model_dir: Path,
        eval_digest: str,
        measure: CardMeasurer,
        progress: ProgressSink = lambda stage, done, total: None,
    ) -> Artifact:
        """The tier's artifact and its card for `eval_digest`: reused when intact, built (and
        measured) otherwise; an intact artifact without that card is loaded and measured."""
        progress("fingerprinting the model", 0, 1)
        inputs = self.key_inputs(tier, model_fingerprint(model_dir))
        folder = self.folder_for(tier, inputs)
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive(self.root / f".{folder.name}.lock"):
            try:
                self._verify(folder, inputs)
            except FileNotFoundError:
                pass  # never built
            except StaleArtifact as why:
                log.warning("artifact %s is unusable (%s); rebuilding it", folder, why)
                shutil.rmtree(folder, ignore_errors=True)
            else:
                card = _saved_card(folder, eval_digest)
                if card is not None:
                    return Artifact(folder, card)
                with self._cpus_to_build_on(progress):
                    progress(f"loading {tier.name}", 0, 1)
                    loaded = tier.load(model_dir, folder)
                    card = _measured_card(folder, eval_digest, loaded, measure, progress)
                    return Artifact(folder, card, loaded)
            with self._cpus_to_build_on(progress):
                return self._build(tier, model_dir, folder, inputs, eval_digest, measure, progress)

    @contextmanager
    def _cpus_to_build_on(self, progress: ProgressSink) -> Iterator[None]:
        """Hold a lock for every CPU this process may run on, in ascending order so that two
        builders never each hold what the other waits for."""
        with ExitStack() as held:
            for cpu in sorted(os.sched_getaffinity(0)):
                waiting = f"waiting for another tier's build on CPU {cpu}"
                held.enter_context(
                    exclusive(self.root / f".build-cpu{cpu}.lock", partial(progress, waiting, 0, 1))
                )
            yield

    def _verify(self, folder: Path, inputs: dict[str, Any]) -> None:
        """Raise FileNotFoundError if `folder` was never built, StaleArtifact if it must not be used."""
        manifest_path = folder / MANIFEST
        if not folder.exists():
            raise FileNotFoundError(folder)
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise StaleArtifact(f"manifest unreadable: {error}") from None
        if manifest.get("inputs") != inputs:
            raise StaleArtifact("built from other inputs")
        for name, digest in manifest.get("files", {}).items():
            path = folder / name
            if not path.is_file() or file_sha256(path) != digest:
                raise StaleArtifact(f"{name} is missing or does not match its checksum")

    def _build(
        self,
        tier: Tier,
        model_dir: Path,
        folder: Path,
        inputs: dict[str, Any],
        eval_digest: str,
        measure: CardMeasurer,
        progress: ProgressSink,
    ) -> Artifact:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=self.root))
        try:
            started = time.perf_counter()
            progress(f"building {tier.name}", 0, 1)
            tier.build(model_dir, staging, lambda message: progress(f"building {tier.name}: {message}", 0, 1))
            progress(f"loading {tier.name}", 0, 1)
            files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
            loaded = tier.load(model_dir, staging)
            card = _measured_card(staging, eval_digest, loaded, measure, progress)
            manifest = {"inputs": inputs, "files": files, "build_seconds": time.perf_counter() - started}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("built %s artifact %s: %s", tier.name, folder, card)
        return Artifact(folder, card, loaded)


def card_path(folder: Path, eval_digest: str) -> Path:
    """Where the artifact in `folder` keeps its card for `eval_digest`."""
    return folder / f"card-{hashlib.sha256(eval_digest.encode()).hexdigest()[:16]}.json"


def _saved_card(folder: Path, eval_digest: str) -> AccuracyCard | None:
    """The card saved for `eval_digest`, or None (never measured, or unreadable: measured again)."""
    path = card_path(folder, eval_digest)
    if not path.is_file():
        return None
    try:
        return AccuracyCard.load(path)
    except (OSError, ValueError, TypeError) as error:
        log.warning("accuracy card %s is unreadable (%s); measuring it again", path, error)
        return None


def _measured_card(
    folder: Path, eval_digest: str, loaded: LoadedModel, measure: CardMeasurer, progress: ProgressSink
) -> AccuracyCard:
    card = measure(loaded, lambda done, total: progress("measuring accuracy", done, total))
    path = card_path(folder, eval_digest)
    partial_path = path.with_suffix(".partial")
    card.save(partial_path)
    partial_path.replace(path)  # a reader never sees half a card
    return card
