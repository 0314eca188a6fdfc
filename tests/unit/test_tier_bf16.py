"""Tier bf16: IPEX's bf16 recipe where oneDNN can prepack bf16 weights, bf16-rounded weights in IPEX's
float32 graph elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tierserve.domain.config import TierRecipe
from tierserve.worker.isa import CpuIsa
from tierserve.worker.tiers import TierContext, make_tier

ZEN4 = CpuIsa.from_flags({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2"})
AVX2_ONLY = CpuIsa.from_flags({"avx2"})


def kernel_path(recipe: TierRecipe, isa: CpuIsa) -> str:
    return make_tier("bf16", TierContext(recipe=recipe, isa=isa)).kernel_path()


def test_auto_takes_ipex_only_where_onednn_prepacks_bf16() -> None:
    assert kernel_path(TierRecipe(), ZEN4) == "ipex"
    assert kernel_path(TierRecipe(), AVX2_ONLY) == "native"
    assert kernel_path(TierRecipe(), CpuIsa.from_flags({"avx_ne_convert", "avx2"})) == "ipex"


@pytest.mark.parametrize("isa", [ZEN4, AVX2_ONLY])
def test_recipe_kernel_forces_either_path(isa: CpuIsa) -> None:
    assert kernel_path(TierRecipe(kernel="ipex"), isa) == "ipex"
    assert kernel_path(TierRecipe(kernel="native"), isa) == "native"


def test_kernel_path_keys_the_artifact() -> None:
    ipex = make_tier("bf16", TierContext(recipe=TierRecipe(), isa=ZEN4)).recipe_key()
    native = make_tier("bf16", TierContext(recipe=TierRecipe(), isa=AVX2_ONLY)).recipe_key()
    assert (ipex["kernel_path"], native["kernel_path"]) == ("ipex", "native")
    assert ipex == {"tier": "bf16", "kernel_path": "ipex", "kernel": "auto"}


def test_native_path_answers_as_the_model_with_bf16_rounded_weights(tmp_path: Path) -> None:
    from tests.tiny_model import build_tiny_model_dir
    from tierserve.worker.accuracy import tier_log_probs
    from tierserve.worker.tiers.loading import load_hf_model

    model_dir = build_tiny_model_dir(tmp_path / "model")
    loaded = make_tier("bf16", TierContext(recipe=TierRecipe(kernel="native"), isa=AVX2_ONLY)).load(
        model_dir, tmp_path
    )
    assert loaded.kernel.startswith("native: weights rounded to bf16 in the ipex.llm.optimize dtype=float32")
    chunk: list[int] = loaded.tokenizer("Once upon a time there was a little fox")["input_ids"]
    served = tier_log_probs(loaded, chunk)

    def eager_log_probs(round_to_bf16: bool) -> torch.Tensor:
        model, _ = load_hf_model(model_dir)
        with torch.inference_mode():
            if round_to_bf16:
                for parameter in model.parameters():
                    parameter.copy_(parameter.to(torch.bfloat16).float())
            return torch.log_softmax(model(torch.tensor([chunk])).logits[0, :-1], dim=-1)

    rounded, exact = eager_log_probs(True), eager_log_probs(False)
    error = (served - rounded).abs().max().item()
    assert error < 1e-3
    assert (rounded - exact).abs().max().item() > 10 * error
