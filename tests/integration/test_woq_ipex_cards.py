"""The weight-only tiers through IPEX's recipe (kernel = "ipex") on the default model keep their
accuracy cards within 1% perplexity of fp32, on any CPU: where the CPU lacks AMX, IPEX runs its
reference kernels, slowly, so the card here scores a shorter text than a worker's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.tiny_model import default_model_dir
from tierserve.domain.config import DataConfig, TierRecipe
from tierserve.domain.textsets import eval_path, read_paragraphs
from tierserve.worker.accuracy import eval_chunks, measure_card, reference_log_probs
from tierserve.worker.isa import CpuIsa
from tierserve.worker.tiers import TierContext, make_tier

pytestmark = pytest.mark.integration

# Two chunks of 128 tokens: IPEX's reference int4 kernels take about a second a token on 2 cores.
EVAL_TOKENS = 256
MAX_LOSS_PCT = 1.0


@pytest.fixture(scope="module")
def scoring() -> tuple[Path, list[list[int]], list[torch.Tensor]]:
    model_dir = default_model_dir()
    data = DataConfig()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunks = eval_chunks(tokenizer, read_paragraphs(eval_path(data)), EVAL_TOKENS, data.eval_chunk_tokens)
    return model_dir, chunks, reference_log_probs(model_dir, chunks)


# Building and scoring one tier on IPEX's reference kernels took 9-15 minutes on 2 AVX2 cores.
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("tier_name", ["int8-woq", "int4-woq"])
def test_ipex_weight_only_tier_card_is_within_one_percent(
    scoring: tuple[Path, list[list[int]], list[torch.Tensor]], tier_name: str, tmp_path: Path
) -> None:
    model_dir, chunks, reference = scoring
    tier = make_tier(tier_name, TierContext(recipe=TierRecipe(kernel="ipex"), isa=CpuIsa.detect()))
    tier.build(model_dir, tmp_path, lambda message: None)
    loaded = tier.load(model_dir, tmp_path)
    card = measure_card(loaded, chunks, reference)
    figures = {
        "tier": tier_name,
        "kernel": loaded.kernel,
        "perplexity_delta_pct": card.perplexity_delta_pct,
        "kl_divergence": round(card.kl_divergence, 4),
        "top1_agreement": round(card.top1_agreement, 4),
        "eval_tokens": card.eval_tokens,
    }
    print(json.dumps(figures))
    assert loaded.kernel.startswith("ipex WOQ")
    if tier_name == "int4-woq":
        assert "exact zero points; lm_head INT8 per-channel" in loaded.kernel
    assert card.perplexity_delta_pct < MAX_LOSS_PCT, figures
