"""Tier bf16: tierserve's bf16 kernel in IPEX's decoder where the CPU has AVX512_BF16 and no AMX,
IPEX's bf16 recipe where it has AMX or oneDNN can prepack bf16 weights otherwise, bf16-rounded
weights in IPEX's float32 graph elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tierserve.domain.config import TierRecipe
from tierserve.worker.isa import CpuIsa
from tierserve.worker.tiers import TierContext, make_tier

AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2"}
ZEN4 = CpuIsa.from_flags(AVX512 | {"avx512_bf16"})
AMX = {"amx_tile", "amx_int8", "amx_bf16"}
SAPPHIRE_RAPIDS = CpuIsa.from_flags(AVX512 | AMX | {"avx512_bf16", "avx512_fp16"})
ICE_LAKE = CpuIsa.from_flags(AVX512)
AVX2_ONLY = CpuIsa.from_flags({"avx2"})


def kernel_path(recipe: TierRecipe, isa: CpuIsa) -> str:
    return make_tier("bf16", TierContext(recipe=recipe, isa=isa)).kernel_path()


def test_auto_takes_the_native_kernel_where_avx512_bf16_has_no_amx_beside_it() -> None:
    assert kernel_path(TierRecipe(), ZEN4) == "native"
    assert kernel_path(TierRecipe(), SAPPHIRE_RAPIDS) == "ipex"
    assert kernel_path(TierRecipe(), ICE_LAKE) == "ipex"
    assert kernel_path(TierRecipe(), AVX2_ONLY) == "native"
    assert kernel_path(TierRecipe(), CpuIsa.from_flags({"avx_ne_convert", "avx2"})) == "ipex"


@pytest.mark.parametrize("isa", [ZEN4, AVX2_ONLY])
def test_recipe_kernel_forces_either_path(isa: CpuIsa) -> None:
    assert kernel_path(TierRecipe(kernel="ipex"), isa) == "ipex"
    assert kernel_path(TierRecipe(kernel="native"), isa) == "native"


def test_kernel_path_keys_the_artifact() -> None:
    ipex = make_tier("bf16", TierContext(recipe=TierRecipe(), isa=SAPPHIRE_RAPIDS)).recipe_key()
    native = make_tier("bf16", TierContext(recipe=TierRecipe(), isa=AVX2_ONLY)).recipe_key()
    kernel = make_tier("bf16", TierContext(recipe=TierRecipe(), isa=ZEN4)).recipe_key()
    assert (ipex["kernel_path"], native["kernel_path"], kernel["kernel_path"]) == ("ipex", "native", "native")
    assert ipex == {"tier": "bf16", "kernel_path": "ipex", "kernel": "auto"}
    # The card is scored through the linears: which ones run is in the key.
    assert native["native_bf16_linear"] != kernel["native_bf16_linear"]


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


def test_native_path_with_avx512_bf16_runs_every_linear_on_tierserves_kernel(tmp_path: Path) -> None:
    from tests.tiny_model import build_tiny_model_dir
    from tierserve.worker.accuracy import tier_log_probs
    from tierserve.worker.kernels.linears import Bf16Linear, tierserve_bf16_kernel

    if tierserve_bf16_kernel() is None:
        pytest.skip("the bf16 kernel needs AVX512_BF16, which this CPU lacks")
    model_dir = build_tiny_model_dir(tmp_path / "model")
    native = make_tier("bf16", TierContext(recipe=TierRecipe(), isa=ZEN4)).load(model_dir, tmp_path)
    ipex_tier = make_tier("bf16", TierContext(recipe=TierRecipe(kernel="ipex"), isa=ZEN4))
    ipex = ipex_tier.load(model_dir, tmp_path)
    assert native.kernel.startswith("native: layers tierserve bf16_linear")
    assert native.dtype == torch.bfloat16
    modules = list(native.model.modules())
    assert sum(isinstance(m, Bf16Linear) for m in modules) >= 4 * 2 + 1  # four per layer and the head
    assert not any(isinstance(m, torch.nn.Linear) for m in modules)
    chunk: list[int] = native.tokenizer("Once upon a time there was a little fox")["input_ids"]
    fp32 = make_tier("fp32", TierContext(recipe=TierRecipe(), isa=ZEN4)).load(model_dir, tmp_path)
    reference = tier_log_probs(fp32, chunk)
    # As close to float32 as IPEX's bf16 kernels are: the same bf16 model, its sums in another order
    # (on a tiny random model both are off by about 0.03 on average, 0.3 at most).
    native_error = (tier_log_probs(native, chunk) - reference).abs()
    ipex_error = (tier_log_probs(ipex, chunk) - reference).abs()
    assert native_error.mean().item() <= 1.5 * ipex_error.mean().item()
    assert native_error.max().item() <= 2 * ipex_error.max().item()


def test_a_model_the_native_decoder_does_not_take_runs_on_ipex_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.tiny_model import build_tiny_model_dir

    if not CpuIsa.detect().ipex_bf16:
        pytest.skip("IPEX's bf16 kernels need AVX512 BW/VL/DQ or AVX-NE-CONVERT, which this CPU lacks")
    model_dir = build_tiny_model_dir(tmp_path / "model", architecture="Qwen2ForCausalLM")
    with caplog.at_level("WARNING", logger="tierserve.worker.tiers.bf16"):
        loaded = make_tier("bf16", TierContext(recipe=TierRecipe(), isa=ZEN4)).load(model_dir, tmp_path)
    assert loaded.kernel.startswith("ipex.llm.optimize dtype=bfloat16"), loaded.kernel
    assert any("not Qwen2ForCausalLM" in r.getMessage() for r in caplog.records), caplog.text
