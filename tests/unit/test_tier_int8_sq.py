"""The int8-sq tier (IPEX SmoothQuant static int8) on the tiny random model: calibrate, save the
qconfig summary, load from it, generate; plus the checks and the artifact key."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.tiny_model import TINY_CONTEXT_TOKENS, build_tiny_model_dir
from tierserve.config import ConfigError, TierRecipe
from tierserve.requests import GenerationParams, SamplingParams
from worker.accuracy import tier_log_probs
from worker.engine import Engine, TokenEvent
from worker.tiers import LoadedModel, TierContext, make_tier
from worker.tiers.int8_sq import QCONFIG_SUMMARY, Int8SqTier, keep_in_fp32

PARAGRAPHS = [
    "Rivers carve valleys over thousands of years, carrying sand and stones towards the sea.",
    "A good recipe lists its ingredients in the order they are used, with exact amounts.",
    "The committee met on Tuesday and agreed to publish its findings before the summer.",
]
SAMPLES = 2


def write_texts(path: Path, paragraphs: list[str]) -> Path:
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def context(calibration_file: Path, alpha: float = 0.5, samples: int = SAMPLES) -> TierContext:
    return TierContext(
        recipe=TierRecipe(alpha=alpha, calibration_samples=samples), calibration_file=calibration_file
    )


@dataclass
class Built:
    model_dir: Path
    calibration_file: Path
    artifact_dir: Path
    progress: list[str]
    loaded: LoadedModel


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("int8-sq")
    model_dir = build_tiny_model_dir(root / "model")
    calibration_file = write_texts(root / "calibration.txt", PARAGRAPHS)
    tier = make_tier("int8-sq", context(calibration_file))
    artifact_dir = root / "artifact"
    artifact_dir.mkdir()
    progress: list[str] = []
    tier.build(model_dir, artifact_dir, progress.append)
    return Built(model_dir, calibration_file, artifact_dir, progress, tier.load(model_dir, artifact_dir))


def test_build_calibrates_on_the_samples_and_writes_the_qconfig_summary(built: Built) -> None:
    calibrating = [m for m in built.progress if m.startswith("calibrating")]
    assert calibrating == ["calibrating 1/2", "calibrating 2/2"]
    summary = built.artifact_dir / QCONFIG_SUMMARY
    assert summary.is_file()
    assert json.loads(summary.read_text(encoding="utf-8"))  # a non-empty JSON document


def test_load_describes_a_traced_smoothquant_int8_model(built: Built) -> None:
    loaded = built.loaded
    assert loaded.dtype is torch.int8
    assert loaded.context_tokens == TINY_CONTEXT_TOKENS
    assert loaded.backend.startswith("ipex ")
    assert "SmoothQuant" in loaded.kernel and "alpha=0.5" in loaded.kernel
    assert "TorchScript graph" in loaded.kernel


def test_loaded_model_generates_through_the_engine(built: Built) -> None:
    engine = Engine(built.loaded)
    for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=7)):
        request = GenerationParams(
            prompt="Once upon a time,", max_new_tokens=6, sampling=sampling, stop=(), request_id="unit-test"
        )
        events: list[TokenEvent] = []
        outcome = engine.generate(engine.prepare(request), request, events.append)
        assert 1 <= len(events) <= 6
        assert outcome.text == "".join(e.text for e in events)


def test_teacher_forcing_scores_every_step(built: Built) -> None:
    chunk = built.loaded.tokenizer(PARAGRAPHS[0])["input_ids"][:12]
    log_probs = tier_log_probs(built.loaded, chunk)
    assert log_probs.shape[0] == len(chunk) - 1
    assert torch.isfinite(log_probs).all()


def generate_greedy(loaded: LoadedModel, tokens: int) -> list[TokenEvent]:
    engine = Engine(loaded)
    request = GenerationParams(
        prompt="Once upon a time,", max_new_tokens=tokens, sampling=SamplingParams(), stop=(), request_id="t"
    )
    events: list[TokenEvent] = []
    engine.generate(engine.prepare(request), request, events.append)
    return events


class _HeadInFp32(Int8SqTier):
    fp32_ops = ("^lm_head$",)


def test_ops_kept_in_fp32_load_and_generate(built: Built, tmp_path: Path) -> None:
    summary = json.loads((built.artifact_dir / QCONFIG_SUMMARY).read_text(encoding="utf-8"))
    assert keep_in_fp32(summary, _HeadInFp32.fp32_ops) == ["lm_head"]
    (tmp_path / QCONFIG_SUMMARY).write_text(json.dumps(summary), encoding="utf-8")
    tier = _HeadInFp32(context(built.calibration_file))
    assert tier.recipe_key()["fp32_ops"] == ["^lm_head$"]
    loaded = tier.load(built.model_dir, tmp_path)
    assert "kept in fp32: ^lm_head$" in loaded.kernel
    assert 1 <= len(generate_greedy(loaded, 3)) <= 3


def test_empty_or_missing_calibration_file_is_a_config_error(tmp_path: Path) -> None:
    empty = write_texts(tmp_path / "empty.txt", ["", "  "])
    with pytest.raises(ConfigError, match="empty"):
        make_tier("int8-sq", context(empty)).check(None)
    with pytest.raises(ConfigError, match="cannot read"):
        make_tier("int8-sq", context(tmp_path / "missing.txt")).check(None)


def test_fewer_paragraphs_than_samples_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tier = make_tier("int8-sq", context(write_texts(tmp_path / "c.txt", PARAGRAPHS), samples=10))
    with caplog.at_level(logging.WARNING):
        tier.check(None)
    assert "has 3 paragraphs" in caplog.text


def test_recipe_key_follows_alpha_and_the_calibration_texts_used(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "a.txt", PARAGRAPHS)
    base = make_tier("int8-sq", context(texts)).recipe_key()
    assert base["tier"] == "int8-sq" and base["alpha"] == 0.5 and base["calibration_samples"] == SAMPLES
    assert make_tier("int8-sq", context(texts, alpha=0.6)).recipe_key() != base
    assert make_tier("int8-sq", context(texts, samples=3)).recipe_key() != base
    edited = write_texts(tmp_path / "b.txt", ["Something else entirely.", *PARAGRAPHS[1:]])
    assert make_tier("int8-sq", context(edited)).recipe_key() != base
    # Paragraphs past calibration_samples are never read, so they do not key the artifact.
    longer = write_texts(tmp_path / "c.txt", [*PARAGRAPHS, "An extra paragraph."])
    assert make_tier("int8-sq", context(longer)).recipe_key() == base
