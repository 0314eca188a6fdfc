"""A tier's accuracy card is scored as its worker serves: through the batch's paged path where
batching is on, through `generate` where it is off, and the two cards are kept apart beside the
same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tierserve.domain.config import BatchingConfig, TierserveConfig
from tierserve.domain.textsets import eval_path, read_paragraphs
from tierserve.worker import preparation
from tierserve.worker.accuracy import batched_log_probs, eval_chunks, measure_card, reference_log_probs


def tiny_config(model_dir: Path, cache_dir: Path) -> TierserveConfig:
    return TierserveConfig.model_validate(
        {
            "model": {"path": str(model_dir), "cache_dir": str(cache_dir)},
            "data": {"eval_tokens": 64, "eval_chunk_tokens": 32},
            # IPEX's paged kernel: nothing to compile for this test.
            "batching": {"decode_attention": "ipex"},
            "workers": [{"name": "fp32-0", "tier": "fp32", "cores": [0]}],
        }
    )


def test_a_card_is_scored_through_the_path_its_worker_serves_through(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(llama_dir, tmp_path)
    batched_calls: list[int] = []

    def counted(loaded: Any, chunks: list[list[int]], kernel: Any = None) -> list[torch.Tensor]:
        batched_calls.append(len(chunks))
        return batched_log_probs(loaded, chunks, kernel)

    monkeypatch.setattr(preparation, "batched_log_probs", counted)
    batched = preparation.prepare_tier(config, "fp32")
    assert batched.scored_through == preparation.THROUGH_BATCH and batched_calls == [2]

    # The card is the batched path's, scored again here by hand.
    texts = read_paragraphs(eval_path(config.data))
    chunks = eval_chunks(batched.loaded.tokenizer, texts, 64, 32)
    expected = measure_card(
        batched.loaded,
        chunks,
        reference_log_probs(llama_dir, chunks),
        scored=batched_log_probs(batched.loaded, chunks),
    )
    assert batched.card == expected

    # Batching off: scored through generate into another card beside the same weights; batching on
    # again reuses the first card.
    off = preparation.prepare_tier(config, "fp32", batching=BatchingConfig(enabled=False))
    assert off.scored_through == preparation.THROUGH_GENERATE and batched_calls == [2]
    assert off.artifact_dir == batched.artifact_dir and len(list(off.artifact_dir.glob("card-*.json"))) == 2
    again = preparation.prepare_tier(config, "fp32")
    assert again.card == batched.card and batched_calls == [2]
