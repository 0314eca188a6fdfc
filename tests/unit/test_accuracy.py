"""Accuracy cards on the tiny model: fp32 against itself is lossless; bf16 differs measurably."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model_dir
from tierserve.worker.accuracy import AccuracyCard, eval_chunks, measure_card, reference_log_probs
from tierserve.worker.tiers import make_tier

TEXTS = [
    "Rivers carve valleys over thousands of years, carrying sand and stones towards the sea.",
    "A good recipe lists its ingredients in the order they are used, with exact amounts.",
    "The committee met on Tuesday and agreed to publish its findings before the summer.",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-acc") / "model")


def card_for(tier: str, model_dir: Path) -> AccuracyCard:
    loaded = make_tier(tier).load(model_dir, model_dir)
    chunks = eval_chunks(loaded.tokenizer, TEXTS, eval_tokens=48, chunk_tokens=24)
    progress: list[tuple[int, int]] = []
    card = measure_card(
        loaded, chunks, reference_log_probs(model_dir, chunks), lambda d, t: progress.append((d, t))
    )
    assert progress[-1] == (card.eval_tokens, card.eval_tokens)
    assert card.eval_tokens == sum(len(c) - 1 for c in chunks) == 46
    return card


def test_fp32_tier_matches_the_reference(tiny_model_dir: Path) -> None:
    card = card_for("fp32", tiny_model_dir)
    assert abs(card.perplexity_delta_pct) < 0.01
    assert card.kl_divergence < 1e-4 and card.top1_agreement == 1.0
    assert card.perplexity == pytest.approx(card.reference_perplexity, rel=1e-4)


def test_bf16_tier_is_measured_against_fp32(tiny_model_dir: Path) -> None:
    card = card_for("bf16", tiny_model_dir)
    assert card.kl_divergence > 0
    assert 0.5 <= card.top1_agreement <= 1.0
    assert card.perplexity > 1


def test_card_round_trips_through_json(tmp_path: Path) -> None:
    card = AccuracyCard(12.5, 0.4, 0.002, 0.98, 1000, 12.45)
    card.save(tmp_path / "card.json")
    assert AccuracyCard.load(tmp_path / "card.json") == card
    proto = card.to_proto()
    assert proto.measured and proto.eval_tokens == 1000


def test_chunks_skip_fragments_too_short_to_score() -> None:
    class Tokenizer:
        def __call__(self, text: str) -> dict[str, list[int]]:
            return {"input_ids": list(range(11))}

    assert eval_chunks(Tokenizer(), ["x"], eval_tokens=11, chunk_tokens=5) == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
    ]
