"""The int8-sq tier on the tiny random model. Static activation scales (IPEX SmoothQuant):
calibrate, save the qconfig summary, load from it, generate. Dynamic (the default): smoothing
folded exactly into the float weights, per-token int8 activations, build, load, generate.
Plus the checks and the artifact key."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from transformers import LlamaConfig

from tests.tiny_model import TINY_CONTEXT_TOKENS, build_tiny_model_dir
from tests.unit.conftest import started_batching
from tierserve.domain.config import BatchingConfig, ConfigError, TierRecipe
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.accuracy import tier_log_probs
from tierserve.worker.engine import Engine, TokenEvent
from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import packed_weights, smoothing
from tierserve.worker.kernels.linears import DynamicInt8Linear, Int8WoqLinear, int8_kernel_name
from tierserve.worker.kernels.paged_kv import cache_shape
from tierserve.worker.kernels.quantizers import INT7_LEVELS, quantize_int8
from tierserve.worker.tiers import LoadedModel, TierContext, make_tier
from tierserve.worker.tiers.int8_sq import Int8SqTier
from tierserve.worker.tiers.int8_sq_static import QCONFIG_SUMMARY, keep_in_fp32
from tierserve.worker.tiers.loading import load_hf_model

PARAGRAPHS = [
    "Rivers carve valleys over thousands of years, carrying sand and stones towards the sea.",
    "A good recipe lists its ingredients in the order they are used, with exact amounts.",
    "The committee met on Tuesday and agreed to publish its findings before the summer.",
]
SAMPLES = 2
ActivationScales = Literal["dynamic", "static"]


def write_texts(path: Path, paragraphs: list[str]) -> Path:
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def context(
    calibration_file: Path, alpha: float = 0.5, samples: int = SAMPLES, scales: ActivationScales = "static"
) -> TierContext:
    recipe = TierRecipe(alpha=alpha, calibration_samples=samples, activation_scales=scales)
    return TierContext(recipe=recipe, calibration_file=calibration_file)


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


def test_the_default_is_dynamic_and_the_mode_keys_the_artifact(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "a.txt", PARAGRAPHS)
    dynamic = make_tier("int8-sq", TierContext(calibration_file=texts)).recipe_key()
    static = make_tier("int8-sq", context(texts)).recipe_key()
    assert dynamic["activation_scales"] == "dynamic" and "dynamic_format" in dynamic
    assert static["activation_scales"] == "static" and dynamic != static


# ------------------------------------------------------------------ dynamic activation scales


def test_smoothing_leaves_the_float_model_s_logits_unchanged(built: Built) -> None:
    model, tokenizer = load_hf_model(built.model_dir)
    ids = tokenizer(PARAGRAPHS[0], return_tensors="pt")["input_ids"]
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with torch.inference_mode():
        before = model(ids).logits
    ranges = smoothing.activation_ranges(model, [ids])
    factors = smoothing.smoothing_factors(model, ranges, alpha=0.8, smooth_head=True)
    # Not a trivial test: the factors really move the ranges around.
    assert all((f - 1.0).abs().max().item() > 0.1 for f in factors.values())
    smoothing.apply_smoothing(model, factors)
    with torch.inference_mode():
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    # The tied head was untied: the embeddings keep their weights.
    assert torch.equal(model.model.embed_tokens.weight, embeddings)


def test_smoothing_flattens_an_outlier_channel(built: Built) -> None:
    model, tokenizer = load_hf_model(built.model_dir)
    ids = tokenizer(PARAGRAPHS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 50.0  # q/k/v input channel 5: an outlier
    ranges = smoothing.activation_ranges(model, [ids])
    smoothing.apply_smoothing(model, smoothing.smoothing_factors(model, ranges, alpha=0.5))
    smoothed = smoothing.activation_ranges(model, [ids])["layers.0.qkv"]
    assert smoothed[5] / smoothed.median() < 0.2 * ranges["layers.0.qkv"][5] / ranges["layers.0.qkv"].median()


def test_per_token_quantization_keeps_an_outlier_row_from_hurting_the_others() -> None:
    torch.manual_seed(3)
    weight = torch.randn(96, 64) * 0.05
    q8 = quantize_int8(weight)
    # As the tier runs it on this CPU: without VNNI, fbgemm sums in int16 (weights run in halves).
    linear = DynamicInt8Linear(q8["qweight"], q8["scales"], int16_sums=not CpuIsa.detect().avx512_vnni)
    x = torch.randn(1, 5, 64)
    x[0, 0] *= 3000.0  # an attention-sink token
    y, expected = linear(x), x @ weight.T
    ordinary = (y - expected)[0, 1:].norm() / expected[0, 1:].norm()
    sink = (y - expected)[0, 0].norm() / expected[0, 0].norm()
    # Per tensor, the ordinary rows would get ~1/3000 of the int8 range: error ~100%.
    assert ordinary.item() < 0.03 and sink.item() < 0.03


@pytest.mark.parametrize("int16_sums", [False, True])
def test_a_rows_result_is_the_same_bits_alone_and_in_a_batch(int16_sums: bool) -> None:
    """What lets int8-sq batch: a decode row's numbers do not depend on the rows beside it."""
    torch.manual_seed(4)
    weight = torch.randn(96, 64) * 0.05
    q8 = quantize_int8(weight)
    if not int16_sums and not CpuIsa.detect().avx512_vnni:
        q8 = quantize_int8(weight, INT7_LEVELS)  # unsplit 8-bit weights saturate without VNNI
    linear = DynamicInt8Linear(q8["qweight"], q8["scales"], int16_sums)
    rows = torch.randn(6, 64)
    rows[1] *= 200.0  # a row of another scale
    rows[2] += 5.0  # one far from zero: its own range, not one around zero
    rows[3] = 0.25  # a constant row
    together = linear(rows)
    assert torch.equal(torch.cat([linear(row[None]) for row in rows]), together)
    assert torch.equal(linear(rows[[4, 0, 2]]), together[[4, 0, 2]])
    expected = rows @ (q8["qweight"].float() * q8["scales"][:, None]).T
    assert ((together - expected).norm(dim=1) / expected.norm(dim=1)).max().item() < 0.02


def test_weight_only_down_proj_computes_in_bf16_and_returns_the_graph_dtype() -> None:
    torch.manual_seed(5)
    weight = torch.randn(48, 64) * 0.05
    q8 = quantize_int8(weight)
    down = Int8WoqLinear(q8["qweight"], q8["scales"], torch.bfloat16, output=torch.float32)
    x = torch.randn(3, 64)
    x[:, 9] *= 100.0  # an outlier channel costs a weight-only layer nothing
    y, expected = down(x), x @ weight.T
    assert y.dtype == torch.float32
    assert ((y - expected).norm() / expected.norm()).item() < 0.02


@pytest.fixture(scope="module")
def dynamic(built: Built, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], LoadedModel]:
    tier = make_tier("int8-sq", context(built.calibration_file, scales="dynamic"))
    tier.check(load_hf_model(built.model_dir)[0].config)
    artifact_dir = tmp_path_factory.mktemp("int8-sq-dynamic")
    progress: list[str] = []
    tier.build(built.model_dir, artifact_dir, progress.append)
    return artifact_dir, progress, tier.load(built.model_dir, artifact_dir)


def test_dynamic_build_stores_factors_and_weights(dynamic: tuple[Path, list[str], LoadedModel]) -> None:
    artifact_dir, progress, _ = dynamic
    assert progress[0] == f"calibrating on {SAMPLES} texts"
    assert (artifact_dir / smoothing.FACTORS_FILE).is_file()
    assert (artifact_dir / packed_weights.ARTIFACT_FILE).is_file()
    factors = smoothing.load_factors(artifact_dir)
    assert factors is not None
    # down_proj is weight-only: nothing to smooth; the others are smoothed.
    assert all(torch.equal(f, torch.ones_like(f)) for n, f in factors.items() if n.endswith(".down"))
    assert not torch.equal(factors["layers.0.qkv"], torch.ones_like(factors["layers.0.qkv"]))


def test_dynamic_load_describes_and_generates(dynamic: tuple[Path, list[str], LoadedModel]) -> None:
    loaded = dynamic[2]
    assert loaded.dtype is torch.int8 and loaded.context_tokens == TINY_CONTEXT_TOKENS
    assert (
        "SmoothQuant (alpha=0.5)" in loaded.kernel
        and "per-token dynamic int8 activations (each token on its own range)" in loaded.kernel
    )
    isa = CpuIsa.detect()
    down = (
        "IPEX's weight-only int8 per-channel kernel"
        if isa.ipex_woq_fast
        else int8_kernel_name(torch.bfloat16)
    )
    assert f"down_proj {down}" in loaded.kernel and "(weight-only, bfloat16 inputs)" in loaded.kernel
    assert ("batch KV cache bfloat16" in loaded.kernel) == isa.ipex_bf16
    assert cache_shape(loaded.model).dtype == (torch.bfloat16 if isa.ipex_bf16 else torch.float32)
    assert 1 <= len(generate_greedy(loaded, 4)) <= 4
    chunk = loaded.tokenizer(PARAGRAPHS[2])["input_ids"][:10]
    assert torch.isfinite(tier_log_probs(loaded, chunk)).all()


def test_dynamic_tier_batches_and_its_batched_greedy_text_equals_the_text_alone(
    dynamic: tuple[Path, list[str], LoadedModel],
) -> None:
    engine = Engine(dynamic[2])
    with started_batching(engine, BatchingConfig(max_batch=4, prefill_chunk_tokens=0), "int8-sq") as (
        batch,
        reason,
    ):
        assert batch is not None, reason
        assert "greedy tokens made in a batch equal to those made alone" in reason
        requests = [
            GenerationParams(prompt, 8, SamplingParams(), (), "test")
            for prompt in ("Once upon a time", PARAGRAPHS[0][:120], "The", PARAGRAPHS[1][:60])
        ]

        def submitted(request: GenerationParams) -> Any:
            return batch.submit(
                engine.prepare(request), request, lambda _: None, lambda: False, time.perf_counter()
            )

        # Each alone through the batch's own path (its KV cache may be kept in bf16, where the
        # one-request path's is float32), then all four together: a row's bits do not depend on
        # the rows beside it (dynamic linears per token, down_proj padded on IPEX's kernel).
        expected = [submitted(r).future.result(timeout=120).text for r in requests]
        tickets = [submitted(r) for r in requests]
        assert [t.future.result(timeout=120).text for t in tickets] == expected


def test_dynamic_load_without_factors_fails(built: Built, tmp_path: Path) -> None:
    tier = make_tier("int8-sq", context(built.calibration_file, scales="dynamic"))
    with pytest.raises(FileNotFoundError, match=smoothing.FACTORS_FILE):
        tier.load(built.model_dir, tmp_path)


def test_dynamic_refuses_models_with_biases(tmp_path: Path) -> None:
    tier = make_tier("int8-sq", context(write_texts(tmp_path / "c.txt", PARAGRAPHS), scales="dynamic"))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, attention_bias=True)
    config.architectures = ["LlamaForCausalLM"]
    with pytest.raises(ConfigError, match="without bias"):
        tier.check(config)
