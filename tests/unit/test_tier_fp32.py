"""Tier fp32: tierserve's float32 kernel in IPEX's decoder where the CPU has AVX-512F, IPEX's fp32
recipe elsewhere (its lm_head on oneDNN too), and either forced by the recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tierserve.domain.config import TierRecipe
from tierserve.worker.isa import CpuIsa
from tierserve.worker.tiers import TierContext, make_tier

AVX512 = CpuIsa.from_flags({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2"})
AVX2_ONLY = CpuIsa.from_flags({"avx2"})


def kernel_path(recipe: TierRecipe, isa: CpuIsa) -> str:
    return make_tier("fp32", TierContext(recipe=recipe, isa=isa)).kernel_path()


def test_auto_takes_the_native_kernel_where_the_cpu_has_avx512() -> None:
    assert kernel_path(TierRecipe(), AVX512) == "native"
    assert kernel_path(TierRecipe(), AVX2_ONLY) == "ipex"


@pytest.mark.parametrize("isa", [AVX512, AVX2_ONLY])
def test_recipe_kernel_forces_either_path(isa: CpuIsa) -> None:
    assert kernel_path(TierRecipe(kernel="ipex"), isa) == "ipex"
    assert kernel_path(TierRecipe(kernel="native"), isa) == "native"


def test_kernel_path_keys_the_artifact() -> None:
    native = make_tier("fp32", TierContext(recipe=TierRecipe(), isa=AVX512)).recipe_key()
    ipex = make_tier("fp32", TierContext(recipe=TierRecipe(), isa=AVX2_ONLY)).recipe_key()
    assert ipex == {"tier": "fp32", "kernel_path": "ipex", "kernel": "auto"}
    assert native["kernel_path"] == "native" and native["native_fp32_linear"].startswith(
        "tierserve fp32_linear"
    )


def _eager_log_probs(model_dir: Path, chunk: list[int]) -> torch.Tensor:
    from tierserve.worker.tiers.loading import load_hf_model

    model, _ = load_hf_model(model_dir)
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([chunk])).logits[0, :-1], dim=-1)


def test_both_paths_answer_as_the_float_model(tmp_path: Path) -> None:
    from tests.tiny_model import build_tiny_model_dir
    from tierserve.worker.accuracy import tier_log_probs
    from tierserve.worker.kernels.linears import Fp32Linear, tierserve_fp32_kernel

    if tierserve_fp32_kernel() is None:
        pytest.skip("the fp32 kernel needs AVX-512F, which this CPU lacks")
    model_dir = build_tiny_model_dir(tmp_path / "model")
    native = make_tier("fp32", TierContext(recipe=TierRecipe(kernel="native"))).load(model_dir, tmp_path)
    ipex = make_tier("fp32", TierContext(recipe=TierRecipe(kernel="ipex"))).load(model_dir, tmp_path)
    assert native.kernel.startswith("native: layers tierserve fp32_linear"), native.kernel
    assert ipex.kernel.startswith("ipex.llm.optimize dtype=float32"), ipex.kernel
    modules = list(native.model.modules())
    assert sum(isinstance(m, Fp32Linear) for m in modules) >= 4 * 2 + 1  # four per layer and the head
    assert not any(isinstance(m, torch.nn.Linear) for m in modules)
    chunk: list[int] = native.tokenizer("Once upon a time there was a little fox")["input_ids"]
    eager = _eager_log_probs(model_dir, chunk)
    for loaded in (native, ipex):
        assert (tier_log_probs(loaded, chunk) - eager).abs().max().item() < 1e-4


def test_ipex_path_gives_a_tied_lm_head_its_own_weights_for_onednn(tmp_path: Path) -> None:
    from tests.tiny_model import build_tiny_model_dir

    model_dir = build_tiny_model_dir(tmp_path / "model")  # its lm_head is tied to the embedding
    loaded = make_tier("fp32", TierContext(recipe=TierRecipe(kernel="ipex"))).load(model_dir, tmp_path)
    # Prepacked by IPEX (oneDNN), as every other linear; a tied head stays a plain Linear (aten::mm).
    assert type(loaded.model.lm_head).__name__ == "_IPEXLinear"


def test_a_model_the_native_decoder_does_not_take_runs_on_ipex_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.tiny_model import build_tiny_model_dir

    model_dir = build_tiny_model_dir(tmp_path / "model", architecture="Qwen2ForCausalLM")
    with caplog.at_level("WARNING", logger="tierserve.worker.tiers.fp32"):
        loaded = make_tier("fp32", TierContext(recipe=TierRecipe(kernel="native"))).load(model_dir, tmp_path)
    assert loaded.kernel.startswith("ipex.llm.optimize dtype=float32"), loaded.kernel
    assert any("not Qwen2ForCausalLM" in r.getMessage() for r in caplog.records), caplog.text
