"""Tiers int8-woq and int4-woq: kernel choice by ISA and recipe, recipe checks, the quantizers,
the native path end to end on the tiny random model (build, reuse the artifact, generate), the
IPEX path loading a GPTQ int4 `low_precision_checkpoint`, and the IPEX path's int4 with exact
zero points and an int8 lm_head."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import intel_extension_for_pytorch
import pytest
import torch
from intel_extension_for_pytorch.quantization import (
    WoqLowpMode,
    WoqWeightDtype,
    get_weight_only_quant_qconfig_mapping,
)
from transformers import LlamaConfig

from tests.gptq_checkpoint import dequantize_gptq, unpack_int4_rows, write_gptq_checkpoint
from tests.tiny_model import TINY_CONTEXT_TOKENS, build_tiny_model_dir, copy_tokenizer
from tierserve.domain.config import ConfigError, TierRecipe
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.accuracy import tier_log_probs
from tierserve.worker.engine import Engine, TokenEvent
from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import ipex_internals, packed_weights
from tierserve.worker.kernels.linears import (
    DynamicInt8Linear,
    Int4WoqLinear,
    Int8WoqLinear,
    dynamic_int8_kernel_name,
    int4_kernel_name,
)
from tierserve.worker.kernels.quantizers import quantize_int4, quantize_int4_float_zero, quantize_int8
from tierserve.worker.kernels.scheme import NativeScheme, make_linear
from tierserve.worker.tiers import LoadedModel, TierContext, make_tier
from tierserve.worker.tiers.checkpoints import describe_low_precision_checkpoint
from tierserve.worker.tiers.loading import load_hf_model
from tierserve.worker.tiers.woq_ipex import EXACT_INT4_FORMAT, IPEX_SETTINGS_FILE

TIERS = ("int8-woq", "int4-woq")
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2"}
FAST_WOQ_CPU = CpuIsa.from_flags({"amx_tile", "amx_int8", "amx_bf16", "avx512_fp16", *AVX512})
ZEN4 = CpuIsa.from_flags({"avx512_bf16", "avx512_vnni", *AVX512})
AVX2_ONLY = CpuIsa.from_flags({"avx2", "fma"})
# The tiny model is 64 wide with a 128-wide MLP.
TINY_RECIPE = TierRecipe(group_size=32, kernel="native")


def smollm_like_config(**overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "architectures": ["LlamaForCausalLM"],
        **overrides,
    }
    return LlamaConfig(**settings)


def tier_for(name: str, recipe: TierRecipe = TINY_RECIPE, isa: CpuIsa = ZEN4) -> Any:
    return make_tier(name, TierContext(recipe=recipe, isa=isa))


# ------------------------------------------------------------------ kernel choice


@pytest.mark.parametrize("name", TIERS)
def test_auto_takes_ipex_only_where_its_woq_kernels_are_fast(name: str) -> None:
    assert tier_for(name, TierRecipe(), FAST_WOQ_CPU).kernel_path() == "ipex"
    assert tier_for(name, TierRecipe(), ZEN4).kernel_path() == "native"
    amx_without_fp16 = CpuIsa.from_flags({"amx_tile", "amx_int8", "amx_bf16", "avx512f"})
    assert tier_for(name, TierRecipe(), amx_without_fp16).kernel_path() == "native"


@pytest.mark.parametrize("name", TIERS)
def test_recipe_kernel_forces_either_path(name: str) -> None:
    for isa in (FAST_WOQ_CPU, ZEN4):
        assert tier_for(name, TierRecipe(kernel="ipex"), isa).kernel_path() == "ipex"
        assert tier_for(name, TierRecipe(kernel="native"), isa).kernel_path() == "native"


@pytest.mark.parametrize("name", TIERS)
def test_kernel_path_keys_the_artifact(name: str) -> None:
    fast = tier_for(name, TierRecipe(), FAST_WOQ_CPU).recipe_key()
    slow = tier_for(name, TierRecipe(), ZEN4).recipe_key()
    assert fast["kernel_path"] == "ipex"
    assert slow["kernel_path"] == "native"
    assert fast != slow


# ------------------------------------------------------------------ recipe checks


@pytest.mark.parametrize("group_size", [100, 256, 40])
def test_group_size_that_does_not_divide_the_model_is_refused(group_size: int) -> None:
    tier = tier_for("int4-woq", TierRecipe(group_size=group_size))
    with pytest.raises(
        ConfigError, match=rf"group_size {group_size}.*hidden size 576.*intermediate size 1536"
    ):
        tier.check(smollm_like_config())


def test_explicit_group_size_128_is_refused_on_a_576_wide_model() -> None:
    with pytest.raises(ConfigError, match="group_size 128"):
        tier_for("int4-woq", TierRecipe(group_size=128)).check(smollm_like_config())


def test_unset_group_size_is_32_and_fits_the_default_model() -> None:
    tier = tier_for("int4-woq", TierRecipe())
    assert tier.group_size(smollm_like_config()) == 32
    tier.check(smollm_like_config())
    with pytest.raises(ConfigError, match="group_size 32 does not divide"):
        tier.check(smollm_like_config(hidden_size=600))


def test_artifact_key_names_the_group_size_and_the_native_format() -> None:
    unset = tier_for("int4-woq", TierRecipe()).recipe_key()
    explicit = tier_for("int4-woq", TierRecipe(group_size=64)).recipe_key()
    assert unset["group_size"] == 32
    assert explicit["group_size"] == 64
    assert "native_format" in unset
    assert "native_format" not in tier_for("int4-woq", TierRecipe(), FAST_WOQ_CPU).recipe_key()


def test_native_int4_needs_a_kernel_group_size() -> None:
    with pytest.raises(ConfigError, match="native int4 kernel"):
        tier_for("int4-woq", TierRecipe(group_size=16)).check(smollm_like_config())
    with pytest.raises(ConfigError, match="per output channel"):
        tier_for("int4-woq", TierRecipe(group_size=0)).check(smollm_like_config())
    # IPEX takes per-channel int4.
    tier_for("int4-woq", TierRecipe(group_size=0, kernel="ipex")).check(smollm_like_config())


def test_int8_is_per_channel_and_ignores_group_size() -> None:
    tier = tier_for("int8-woq", TierRecipe(group_size=48))
    assert tier.group_size(smollm_like_config()) == 0
    tier.check(smollm_like_config())
    assert "group_size" not in tier.recipe_key()
    assert "group_size" in tier_for("int4-woq").recipe_key()


@pytest.mark.parametrize("name", TIERS)
def test_native_refuses_what_only_ipex_does(name: str) -> None:
    if name == "int4-woq":  # no native int4 kernel with int8 activations
        with pytest.raises(ConfigError, match="lowp_mode INT8"):
            tier_for(name, TierRecipe(lowp_mode="INT8")).check(smollm_like_config())
    with pytest.raises(ConfigError, match="low_precision_checkpoint"):
        tier_for(name, TierRecipe(low_precision_checkpoint="/x.safetensors")).check(smollm_like_config())
    with pytest.raises(ConfigError, match="native WOQ kernel path supports"):
        tier_for(name, TierRecipe()).check(smollm_like_config(architectures=["GPT2LMHeadModel"]))
    tier_for(name, TierRecipe(lowp_mode="INT8", kernel="ipex")).check(smollm_like_config())


@pytest.mark.parametrize("name", TIERS)
def test_ipex_path_computes_in_fp32_where_ipex_cannot_run_bf16(name: str) -> None:
    config = smollm_like_config()
    assert tier_for(name, TierRecipe(kernel="ipex"), AVX2_ONLY).path.settings(config)["lowp_mode"] == "FP32"
    assert tier_for(name, TierRecipe(kernel="ipex"), ZEN4).path.settings(config)["lowp_mode"] == "BF16"
    for lowp in ("BF16", "INT8"):
        with pytest.raises(ConfigError, match=f"lowp_mode {lowp} runs IPEX at bfloat16"):
            tier_for(name, TierRecipe(kernel="ipex", lowp_mode=lowp), AVX2_ONLY).check(config)


def test_ipex_path_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    tier = tier_for("int4-woq", TierRecipe(kernel="ipex", low_precision_checkpoint=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="does not exist"):
        tier.check(smollm_like_config())


def test_a_replaced_checkpoint_at_the_same_path_keys_a_new_artifact(tmp_path: Path) -> None:
    checkpoint = tmp_path / "gptq.safetensors"
    checkpoint.write_bytes(b"first")
    tier = tier_for("int4-woq", TierRecipe(kernel="ipex", low_precision_checkpoint=str(checkpoint)))
    before = tier.recipe_key()
    os.utime(checkpoint, ns=(1, 1))
    checkpoint.write_bytes(b"second file")
    assert tier.recipe_key() != before
    assert tier.recipe_key()["checkpoint_files"][0][:2] == ("gptq.safetensors", len(b"second file"))


# ------------------------------------------------------------------ quantizers and kernels


def test_int4_recovers_weights_on_a_16_level_grid_per_group() -> None:
    torch.manual_seed(0)
    n, k, group = 96, 128, 32
    levels = torch.randint(0, 16, (n, k)).float()
    levels[:, ::group] = 0  # every group spans the full grid, as a Q4_1 block does
    levels[:, 1::group] = 15
    scale = torch.rand(n, k // group) * 0.01 + 0.001
    low = torch.randn(n, k // group) * 0.05
    weight = levels * scale.repeat_interleave(group, 1) + low.repeat_interleave(group, 1)
    packed = quantize_int4(weight, group)
    linear = Int4WoqLinear(packed["qweight"], packed["scales_and_zeros"], group, torch.float32)
    x = torch.randn(3, k)
    torch.testing.assert_close(linear(x), x @ weight.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float32])
def test_int8_and_int4_linears_match_their_float_weights(activations: torch.dtype) -> None:
    torch.manual_seed(1)
    weight = torch.randn(64, 128) * 0.05
    x = torch.randn(2, 5, 128)
    expected = x @ weight.T
    q8 = quantize_int8(weight)
    int8 = Int8WoqLinear(q8["qweight"], q8["scales"], activations)
    q4 = quantize_int4(weight, 32)
    int4 = Int4WoqLinear(q4["qweight"], q4["scales_and_zeros"], 32, activations)
    scale = expected.abs().mean().item()
    assert int8(x).shape == expected.shape
    assert (int8(x).float() - expected).abs().mean().item() < 0.02 * scale
    assert (int4(x).float() - expected).abs().mean().item() < 0.15 * scale


@pytest.mark.parametrize("int16_sums", [False, True])
def test_dynamic_int8_head_matches_its_float_weights(int16_sums: bool) -> None:
    torch.manual_seed(2)
    weight = torch.randn(96, 64) * 0.05
    x = torch.randn(1, 3, 64).to(torch.bfloat16)
    expected = x.float() @ weight.T
    q8 = quantize_int8(weight)
    head = DynamicInt8Linear(q8["qweight"], q8["scales"], int16_sums)
    y = head(x)
    assert y.shape == expected.shape and y.dtype == torch.bfloat16
    assert (y.float() - expected).abs().mean().item() < 0.03 * expected.abs().mean().item()


def test_native_int8_lowp_int8_runs_every_layer_with_dynamic_activations(tiny_model_dir: Path) -> None:
    tier = tier_for("int8-woq", TierRecipe(lowp_mode="INT8"))
    tier.check(smollm_like_config())
    scheme = tier.native_scheme(LlamaConfig(hidden_size=64, intermediate_size=128))
    kernel = "fbgemm quantized::linear_dynamic" if scheme.int16_sums else dynamic_int8_kernel_name()
    assert scheme.dynamic_layers and scheme.describe().startswith(f"layers {kernel} int8 per-channel")
    assert tier.recipe_key() != tier_for("int8-woq").recipe_key()
    tensors = packed_weights.quantize_model(load_hf_model(tiny_model_dir)[0], scheme, lambda message: None)
    linear = make_linear(tensors, "layers.0.o", 8, scheme)
    assert isinstance(linear, DynamicInt8Linear)


@pytest.mark.parametrize(("lowp_mode", "dynamic"), [("AUTO", True), ("BF16", False), ("FP32", False)])
def test_lm_head_runs_dynamic_int8_only_by_default(lowp_mode: str, dynamic: bool) -> None:
    tier = tier_for("int8-woq", TierRecipe(lowp_mode=lowp_mode))  # type: ignore[arg-type]
    scheme = tier.native_scheme(LlamaConfig(hidden_size=64, intermediate_size=128))
    assert scheme.head_dynamic is dynamic
    assert ("per-token dynamic int8 activations" in scheme.describe()) is dynamic


@pytest.mark.parametrize("name", ["int8-woq", "int4-woq"])
def test_auto_keeps_the_lm_head_weight_only_without_vnni(name: str) -> None:
    """Without VNNI fbgemm's activations have 7 bits (+1.3% perplexity for int4-woq on a Zen 3)."""
    tier = tier_for(name, TierRecipe(), AVX2_ONLY)
    scheme = tier.native_scheme(LlamaConfig(hidden_size=64, intermediate_size=128))
    assert not scheme.head_dynamic and "per-token dynamic int8" not in scheme.describe()
    assert tier.recipe_key() != tier_for(name, TierRecipe(), ZEN4).recipe_key()
    with_int8 = tier_for(name.replace("int4", "int8"), TierRecipe(lowp_mode="INT8"), AVX2_ONLY)
    assert with_int8.native_scheme(LlamaConfig(hidden_size=64, intermediate_size=128)).head_dynamic


# ------------------------------------------------------------------ native path end to end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def artifact_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for name in TIERS:
        folder = tmp_path_factory.mktemp(name)
        messages: list[str] = []
        tier_for(name).build(tiny_model_dir, folder, messages.append)
        assert (folder / packed_weights.ARTIFACT_FILE).is_file()
        assert messages
        dirs[name] = folder
    return dirs


@pytest.fixture(scope="module", params=TIERS)
def loaded(
    request: pytest.FixtureRequest, tiny_model_dir: Path, artifact_dirs: dict[str, Path]
) -> LoadedModel:
    name: str = request.param
    result: LoadedModel = tier_for(name).load(tiny_model_dir, artifact_dirs[name])
    return result


def generate(loaded: LoadedModel, sampling: SamplingParams, tokens: int = 6) -> list[TokenEvent]:
    engine = Engine(loaded)
    request = GenerationParams(
        prompt="Once upon a time", max_new_tokens=tokens, sampling=sampling, stop=(), request_id="woq"
    )
    events: list[TokenEvent] = []
    engine.generate(engine.prepare(request), request, events.append)
    return events


def test_loaded_model_says_what_runs(loaded: LoadedModel) -> None:
    assert loaded.kernel.startswith("native:")
    # Default lowp_mode AUTO: the lm_head runs fbgemm's dynamic int8 linear on both tiers.
    assert f"lm_head {dynamic_int8_kernel_name()}" in loaded.kernel
    assert loaded.backend.startswith(f"torch {torch.__version__} native")
    assert loaded.context_tokens == TINY_CONTEXT_TOKENS
    assert loaded.dtype == torch.bfloat16


def test_int4_kernel_names_its_group() -> None:
    scheme = NativeScheme(bits=4, group_size=32, head_bits=8, activations=torch.bfloat16)
    assert f"{int4_kernel_name(torch.bfloat16)} int4 group 32" in scheme.describe()
    on_float32 = NativeScheme(bits=4, group_size=32, head_bits=8, activations=torch.float32)
    assert "aten._weight_int4pack_mm_for_cpu int4 group 32" in on_float32.describe()


def test_generates_greedy_and_sampled(loaded: LoadedModel) -> None:
    greedy = generate(loaded, SamplingParams())
    assert 1 <= len(greedy) <= 6
    assert [e.token_id for e in generate(loaded, SamplingParams())] == [e.token_id for e in greedy]
    sampled = generate(loaded, SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7))
    assert 1 <= len(sampled) <= 6


def test_second_load_reuses_the_artifact(
    tiny_model_dir: Path, artifact_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_quantizing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("load quantized again although the artifact exists")

    monkeypatch.setattr(packed_weights, "quantize_model", no_quantizing)
    for name in TIERS:
        again = tier_for(name).load(tiny_model_dir, artifact_dirs[name])
        assert generate(again, SamplingParams(), tokens=2)


def test_load_without_artifact_quantizes(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = packed_weights.quantize_model

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(packed_weights, "quantize_model", counting)
    tier_for("int4-woq").load(tiny_model_dir, tmp_path)
    assert calls == [1]


def test_artifact_for_another_group_size_is_not_used(
    tiny_model_dir: Path, artifact_dirs: dict[str, Path]
) -> None:
    scheme = tier_for("int4-woq", TierRecipe(group_size=64, kernel="native")).native_scheme(
        LlamaConfig(hidden_size=64, intermediate_size=128)
    )
    assert packed_weights.read_artifact(artifact_dirs["int4-woq"], scheme) is None


def test_ipex_path_build_records_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    tier = tier_for("int4-woq", TierRecipe(group_size=32, kernel="ipex"))
    tier.build(tiny_model_dir, tmp_path, lambda message: None)
    assert (tmp_path / IPEX_SETTINGS_FILE).read_text(encoding="utf-8").count('"group_size": 32') == 1


# ------------------------------------------------------------------ IPEX path with a GPTQ checkpoint

GPTQ_GROUP = 32
SCORED_TEXT = "Once upon a time there was a little fox"


@pytest.fixture(scope="module")
def gptq_checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPTQ int4 checkpoint of a *changed* copy of the tiny model (as if fine-tuned): every
    weight moved by noise several quantization steps wide. IPEX quantizing the model's own float
    weights (the checkpoint ignored) would land near the original model, not near this one."""
    model, _ = load_hf_model(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.1)
    path = tmp_path_factory.mktemp("gptq") / "model.safetensors"
    return write_gptq_checkpoint(model, path, GPTQ_GROUP)


def float_log_probs(
    model_dir: Path, chunk: list[int], weights: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    """Plain fp32 transformers, with `weights` (linear weights by state-dict key) swapped in."""
    model, _ = load_hf_model(model_dir)
    if weights:
        missing = set(weights) - set(model.state_dict())
        assert not missing, missing
        model.load_state_dict(weights, strict=False)
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([chunk])).logits[0, :-1].float(), dim=-1)


def log_prob_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_gptq_checkpoint_is_described_by_what_it_holds(gptq_checkpoint: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(gptq_checkpoint))
    q_proj = "model.layers.0.self_attn.q_proj"
    # K = 64 inputs, N = 64 outputs, groups of 32.
    assert state[f"{q_proj}.qweight"].shape == (8, 64) and state[f"{q_proj}.qweight"].dtype == torch.int32
    assert state[f"{q_proj}.qzeros"].shape == (2, 8)
    assert state[f"{q_proj}.scales"].shape == (2, 64)
    assert not any(key.startswith("lm_head.") for key in state)
    # Zero points vary along N, so a wrong qzeros packing order would show.
    zeros = unpack_int4_rows(state[f"{q_proj}.qzeros"].t())
    assert len(torch.unique(zeros)) >= 3
    assert describe_low_precision_checkpoint(state) == (
        "low_precision_checkpoint gptq INT4 group 32, lm_head unquantized"
    )
    # A config.json's quantization_config takes precedence, as in IPEX.
    described = describe_low_precision_checkpoint((state, {"quant_method": "gptq", "group_size": 64}))
    assert described.startswith("low_precision_checkpoint gptq INT4 group 64")


@pytest.mark.parametrize(
    ("lowp_mode", "tolerance"),
    [
        # fp32 activations: the same weights give the same log-probs up to float rounding.
        ("FP32", 1e-3),
        # The default: bf16 activations where IPEX runs bfloat16 (bf16 rounding only, measured 0.24
        # at most), fp32 elsewhere.
        ("AUTO", 0.6),
    ],
)
def test_ipex_loads_a_gptq_int4_checkpoint(
    tiny_model_dir: Path, gptq_checkpoint: Path, tmp_path: Path, lowp_mode: str, tolerance: float
) -> None:
    from safetensors.torch import load_file

    recipe = TierRecipe(
        group_size=GPTQ_GROUP,
        kernel="ipex",
        lowp_mode=lowp_mode,  # type: ignore[arg-type]
        low_precision_checkpoint=str(gptq_checkpoint),
    )
    tier = tier_for("int4-woq", recipe, CpuIsa.detect())  # it runs the kernels of this CPU
    tier.build(tiny_model_dir, tmp_path, lambda message: None)
    loaded = tier.load(tiny_model_dir, tmp_path)
    assert "ipex WOQ low_precision_checkpoint gptq INT4 group 32, lm_head unquantized" in loaded.kernel
    greedy = generate(loaded, SamplingParams())
    assert 1 <= len(greedy) <= 6

    chunk: list[int] = loaded.tokenizer(SCORED_TEXT)["input_ids"]
    served = tier_log_probs(loaded, chunk)  # through generate, as the accuracy card scores it
    state = load_file(str(gptq_checkpoint))
    checkpoint_weights = float_log_probs(tiny_model_dir, chunk, dequantize_gptq(state))
    # Near misses: zero points read as stored (off by one step), and the checkpoint ignored.
    zeros_as_stored = float_log_probs(tiny_model_dir, chunk, dequantize_gptq(state, zero_offset=0))
    original = float_log_probs(tiny_model_dir, chunk, None)

    error = log_prob_distance(served, checkpoint_weights)
    assert error < tolerance
    assert error < 0.1 * log_prob_distance(checkpoint_weights, zeros_as_stored)
    assert error < 0.1 * log_prob_distance(checkpoint_weights, original)
    assert log_prob_distance(served, original) > 10 * error
    if lowp_mode == "FP32":
        # Same greedy continuation as transformers with the checkpoint's weights.
        prompt = loaded.tokenizer("Once upon a time", return_tensors="pt")
        reference, _ = load_hf_model(tiny_model_dir)
        reference.load_state_dict(dequantize_gptq(state), strict=False)
        with torch.inference_mode():
            expected = reference.generate(**prompt, max_new_tokens=6, do_sample=False)[0]
        new_ids = expected[prompt["input_ids"].shape[1] :].tolist()
        assert [event.token_id for event in greedy] == new_ids[: len(greedy)]


def test_int8_woq_refuses_an_int4_checkpoint(
    tiny_model_dir: Path, gptq_checkpoint: Path, tmp_path: Path
) -> None:
    tier = tier_for("int8-woq", TierRecipe(kernel="ipex", low_precision_checkpoint=str(gptq_checkpoint)))
    tier.build(tiny_model_dir, tmp_path, lambda message: None)
    with pytest.raises(ConfigError, match="holds gptq INT4 weights; serve it as int4-woq"):
        tier.load(tiny_model_dir, tmp_path)


# ------------------------------------------------------------------ IPEX path: exact int4 zero points


def snap_to_q4_1_grid(weight: torch.Tensor, group: int) -> torch.Tensor:
    """`weight` on 16 levels per group of `group` input channels from the group's own (float)
    minimum, as GGUF Q4_1 stores it."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // group, group)
    low = groups.amin(dim=-1, keepdim=True)
    step = (groups.amax(dim=-1, keepdim=True) - low) / 15
    return (torch.round((groups - low) / step) * step + low).reshape(rows, columns)


def test_exact_int4_linear_recovers_a_q4_1_grid_that_ipex_rtn_does_not() -> None:
    torch.manual_seed(0)
    n, k, group = 96, 256, 32
    levels = torch.randint(0, 16, (n, k)).float()
    levels[:, ::group], levels[:, 1::group] = 0, 15  # every group spans its grid, as in Q4_1
    step = torch.rand(n, k // group) * 0.01 + 0.001
    # A float minimum, not a multiple of the step; some groups lie all on one side of zero.
    low = (torch.rand(n, k // group) - 0.6) * 0.2
    weight = levels * step.repeat_interleave(group, 1) + low.repeat_interleave(group, 1)
    qconfig = get_weight_only_quant_qconfig_mapping(
        weight_dtype=WoqWeightDtype.INT4, lowp_mode=WoqLowpMode.NONE, group_size=group
    ).global_qconfig
    x = torch.randn(3, k)
    expected = x @ weight.T
    packed = quantize_int4_float_zero(weight, group)
    exact = ipex_internals.int4_woq_linear(
        packed["qweight"],
        packed["scales"],
        packed["zero_points"],
        in_features=k,
        group_size=group,
        qconfig=qconfig,
    )
    torch.testing.assert_close(exact(x), expected, rtol=1e-4, atol=1e-4)
    rtn = ipex_internals.woq_linear_from_float(weight, qconfig)  # IPEX's own, integer zero points
    assert (rtn(x) - expected).abs().max() > 100 * (exact(x) - expected).abs().max()


def test_only_ipex_int4_without_checkpoint_keys_the_exact_format(tmp_path: Path) -> None:
    assert tier_for("int4-woq", TierRecipe(kernel="ipex")).recipe_key()["ipex_format"] == EXACT_INT4_FORMAT
    checkpoint = tmp_path / "gptq.safetensors"
    checkpoint.write_bytes(b"weights")
    for name, recipe in [
        ("int8-woq", TierRecipe(kernel="ipex")),
        ("int4-woq", TierRecipe(kernel="native")),
        ("int4-woq", TierRecipe(kernel="ipex", low_precision_checkpoint=str(checkpoint))),
        # IPEX's int8 compute reads the zero points as int8: no exact ones to keep.
        ("int4-woq", TierRecipe(kernel="ipex", lowp_mode="INT8")),
    ]:
        assert "ipex_format" not in tier_for(name, recipe).recipe_key(), (name, recipe)


def test_exact_int4_needs_a_known_lowered_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ipex_internals.woq_slots_known(smollm_like_config())
    assert not ipex_internals.woq_slots_known(smollm_like_config(architectures=["GPT2LMHeadModel"]))
    assert not ipex_internals.woq_slots_known(smollm_like_config(attention_bias=True))
    monkeypatch.setattr(intel_extension_for_pytorch, "__version__", "2.9.0+cpu")
    assert not ipex_internals.woq_slots_known(smollm_like_config())


@pytest.fixture(scope="module")
def q4_1_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with every decoder linear on a Q4_1 grid (groups of 32), as the default
    model's weights are; the tied embedding and lm_head stay float."""
    model, _ = load_hf_model(tiny_model_dir)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(snap_to_q4_1_grid(module.weight, 32))
    path = tmp_path_factory.mktemp("tiny-q4-1")
    model.save_pretrained(path, safe_serialization=True)
    copy_tokenizer(tiny_model_dir, path)
    return path


def test_ipex_int4_keeps_exact_zero_points_and_an_int8_lm_head(
    q4_1_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = tier_for("int4-woq", TierRecipe(group_size=32, kernel="ipex"), CpuIsa.detect())
    tier.build(q4_1_model_dir, tmp_path, lambda message: None)
    loaded = tier.load(q4_1_model_dir, tmp_path)
    assert "exact zero points; lm_head INT8 per-channel" in loaded.kernel
    assert "TorchScript graph" in loaded.kernel
    greedy = generate(loaded, SamplingParams())
    assert 1 <= len(greedy) <= 6

    chunk: list[int] = loaded.tokenizer(SCORED_TEXT)["input_ids"]
    float_model = float_log_probs(q4_1_model_dir, chunk, None)
    exact_error = log_prob_distance(tier_log_probs(loaded, chunk), float_model)
    # IPEX's own int4 weights, which a model of unknown lowered layout keeps.
    monkeypatch.setattr(ipex_internals, "woq_slots_known", lambda model_config: False)
    own = tier.load(q4_1_model_dir, tmp_path)
    assert "exact zero points" not in own.kernel
    own_error = log_prob_distance(tier_log_probs(own, chunk), float_model)
    assert exact_error < 0.2 * own_error, (exact_error, own_error)
