"""The artifact store: build once, reuse, rebuild with a warning when corrupt or stale; cards per
evaluation beside the weights, measured again without a rebuild."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from tierserve.domain.config import TierRecipe
from tierserve.worker.accuracy import AccuracyCard
from tierserve.worker.artifacts import MANIFEST, ArtifactStore, card_path, model_fingerprint
from tierserve.worker.isa import CpuIsa
from tierserve.worker.tiers.base import LoadedModel, Progress, Tier, TierContext

CARD_VALUE = AccuracyCard(10.0, 1.5, 0.01, 0.97, 100, 9.85)


class CountingTier(Tier):
    """A tier whose build writes one file; counts builds and loads."""

    name: ClassVar[str] = "int8-woq"
    recipe_fields = ("group_size",)

    def __init__(self, context: TierContext) -> None:
        super().__init__(context)
        self.builds = self.loads = 0

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
        self.builds += 1
        (artifact_dir / "weights.bin").write_bytes(b"packed" * 100)

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        self.loads += 1
        assert (artifact_dir / "weights.bin").read_bytes().startswith(b"packed")
        return LoadedModel(
            model=None, tokenizer=None, backend="test", kernel="test", dtype=torch.float32, context_tokens=8
        )


def measure(loaded: LoadedModel, report: Callable[[int, int], None]) -> AccuracyCard:
    report(1, 1)
    return CARD_VALUE


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def tier(group_size: int = 128) -> CountingTier:
    return CountingTier(TierContext(recipe=TierRecipe(group_size=group_size), isa=CpuIsa.from_flags(set())))


def test_builds_once_then_reuses(tmp_path: Path, model_dir: Path) -> None:
    store, first = ArtifactStore(tmp_path / "artifacts"), tier()
    built = store.ensure(first, model_dir, "eval", measure)
    assert built.loaded is not None and built.card == CARD_VALUE and first.builds == 1
    second = tier()
    reused = store.ensure(second, model_dir, "eval", measure)
    assert reused.path == built.path and reused.loaded is None and reused.card == CARD_VALUE
    assert second.builds == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: (folder / "weights.bin").write_bytes(b"truncated"),
        lambda folder: (folder / "weights.bin").unlink(),
        lambda folder: (folder / MANIFEST).write_text("{not json"),
    ],
    ids=["corrupt-file", "missing-file", "corrupt-manifest"],
)
def test_a_damaged_artifact_is_rebuilt_with_a_warning(
    tmp_path: Path, model_dir: Path, damage: Callable[[Path], Any], caplog: pytest.LogCaptureFixture
) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    folder = store.ensure(tier(), model_dir, "eval", measure).path
    damage(folder)
    again = tier()
    with caplog.at_level(logging.WARNING):
        rebuilt = store.ensure(again, model_dir, "eval", measure)
    assert again.builds == 1 and rebuilt.card == CARD_VALUE
    assert "rebuilding" in caplog.text
    assert store.ensure(tier(), model_dir, "eval", measure).loaded is None  # intact again


def test_a_damaged_card_is_measured_again_without_a_rebuild(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    folder = store.ensure(tier(), model_dir, "eval", measure).path
    card_path(folder, "eval").write_text('{"perplexity": "x"}')
    again = tier()
    with caplog.at_level(logging.WARNING):
        remeasured = store.ensure(again, model_dir, "eval", measure)
    assert again.builds == 0 and again.loads == 1 and remeasured.card == CARD_VALUE
    assert remeasured.path == folder and remeasured.loaded is not None
    assert "measuring it again" in caplog.text


def test_another_evaluation_measures_another_card_on_the_same_weights(
    tmp_path: Path, model_dir: Path
) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    built = store.ensure(tier(), model_dir, "eval", measure)
    other_card = AccuracyCard(11.0, 2.0, 0.02, 0.9, 100, 9.85)
    second = tier()
    other = store.ensure(second, model_dir, "batched-eval", lambda loaded, report: other_card)
    assert other.path == built.path and other.card == other_card and second.builds == 0 and second.loads == 1
    # Each evaluation keeps its own card.
    assert store.ensure(tier(), model_dir, "eval", measure).card == CARD_VALUE
    assert store.ensure(tier(), model_dir, "batched-eval", measure).card == other_card


def test_key_follows_model_and_recipe(tmp_path: Path, model_dir: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    base = store.ensure(tier(), model_dir, "eval", measure).path
    assert store.ensure(tier(group_size=64), model_dir, "eval", measure).path != base
    before = model_fingerprint(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"other weights")
    assert model_fingerprint(model_dir) != before
    assert store.ensure(tier(), model_dir, "eval", measure).path != base


def test_builds_sharing_a_cpu_take_turns_and_the_waiting_one_says_so(tmp_path: Path, model_dir: Path) -> None:
    root = tmp_path / "artifacts"
    store, other = ArtifactStore(root), ArtifactStore(root)
    first_building, first_may_finish = threading.Event(), threading.Event()
    events: list[str] = []

    class SlowTier(CountingTier):
        def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
            first_building.set()
            assert first_may_finish.wait(timeout=30)
            events.append("first built")
            super().build(model_dir, artifact_dir, progress)

    builder = threading.Thread(
        target=store.ensure, args=(SlowTier(tier().context), model_dir, "eval", measure)
    )
    builder.start()
    assert first_building.wait(timeout=30)
    # Another tier (another recipe: another folder) on the same CPUs waits for the first build.
    waiting: list[str] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith("waiting for another tier's build on CPU"):
            waiting.append(stage)
            first_may_finish.set()

    second = tier(group_size=64)
    other.ensure(second, model_dir, "eval", measure, progress)
    events.append("second built")
    builder.join(timeout=30)
    assert waiting and events == ["first built", "second built"] and second.builds == 1
