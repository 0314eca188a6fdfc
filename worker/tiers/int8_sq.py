"""Tier int8-sq: SmoothQuant int8, in two modes chosen by the recipe's `activation_scales`.

SmoothQuant moves part of each linear layer's activation outliers into its weights
(per input channel, by a factor set by `alpha`), so that both can be quantized to int8,
weights per output channel. The modes differ in how activations get their int8 scale:

- "dynamic" (the default, `tierserve.worker.tiers.int8_sq_dynamic`): one scale per token, computed at
  run time. `build` calibrates on the texts (per-channel activation maxima), folds the factors
  exactly into the float model (`tierserve.worker.tiers.smoothing`: RMSNorm weights and v_proj rows) and
  stores them with the int8 weights; q/k/v, o, gate/up and lm_head then run as fbgemm's dynamic
  int8 linear (`quantized::linear_dynamic`, rows scaled apart so a prompt's tokens do not share a
  scale) inside IPEX's traced fp32 decoder graph. down_proj keeps int8 weights but bf16 inputs
  (`_weight_int8pack_mm`, weight-only): its input, silu(gate) * up, is where int8 activations
  cost the most accuracy, and at one token the weight-only kernel is as fast as fbgemm's.
- "static": IPEX's SmoothQuant, one static scale per tensor found by calibration. `build` runs
  the calibration texts through IPEX's prepared model and saves the observed ranges as a
  qconfig summary; `load` quantizes a fresh model from that summary and traces it.

Measured on the default model (SmolLM2-135M, 2 threads of an AVX-512 VNNI EPYC, no AMX),
8 calibration texts; speeds as ratios measured side by side in one run (absolute times on this
shared machine drift):

- dynamic, alpha 0.5, down_proj weight-only (the default), card on all 2456 evaluation tokens:
  perplexity +0.63% against fp32, KL 0.0094, top-1 agreement 93.9%; decode 9.49 ms per token
  against IPEX bf16's 13.01 and transformers' eager fp32's 65.67 in the same run (6.9x), a
  256-token prompt's first token 267 ms (bf16: 217). Alternatives measured the same way:
  every linear in int8: +1.62%, KL 0.0119 (on 1020 tokens it had read +0.65%: a 1000-token card
  resolves the change only to about a percent, hence the default of the whole text);
  down_proj in fp32: +0.37%, KL 0.0079, but 14.9 ms per token (its fp32 weights are 4x the
  bytes, read every token); in bf16: 14.7 ms; down_proj int8 with its 8, 32 or 64 largest
  input channels in fp32 (LLM.int8()-style split): +0.93%, +1.25%, +0.80%, KL 0.0110-0.0101,
  9.05 ms. Alpha (1020 tokens, all int8): 0.4 KL 0.0136, 0.5 0.0114, 0.6 0.0120, 0.7 0.0142;
  no smoothing 0.0203; position 0 left out of calibration 0.034. Sensitivity (one kind of
  linear in fp32, the rest int8): down_proj KL 0.0076, gate/up 0.0098, q/k/v 0.0101, o_proj
  0.0109, lm_head 0.0114 (no gain; so the lm_head is not smoothed). For a prompt (one forward of
  many tokens) per-row scales matter: next-token KL after 24 prompts of 16-255 tokens 0.014,
  against 0.12 with one fbgemm scale for the whole prompt.
- static, every linear in int8: about 11.5 ms per token (IPEX bf16: 11.8), perplexity +24.6%.
  Per-tensor static activation scales cannot cover the down_proj inputs: the model has
  "massive activations" at the first position (the attention sink), e.g. layer 11's down_proj
  input reaches ~3000 at position 0 against <= 10 at every other position (layer 28: ~2400
  against ~60), so one scale per tensor leaves the ordinary tokens a handful of quantization
  steps. No alpha fixes that (0.2: +191%, 0.35: +59%, 0.65: +22.5%, 0.8: +33%).
- static, every down_proj as PyTorch's weight-only int8 kernel (bf16 activations) and the
  lm_head as fbgemm's dynamic int8 linear: +1.5%, and slower (the weight-only down_proj costs
  about twice IPEX's fused int8 linear).
- static, `fp32_ops` = every down_proj: +3.5%; every down_proj and lm_head: +0.9%, but then
  about 26 ms per token, slower than bf16.
- static with bf16 autocast between the int8 ops (IPEX's `--quant-with-amp`): slower (about
  13 ms) and less accurate (+29.6%) here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from tierserve.domain.textsets import fingerprint, read_paragraphs
from tierserve.worker.tiers import int8_sq_dynamic
from tierserve.worker.tiers.base import LoadedModel, Progress, Tier, register_tier
from tierserve.worker.tiers.ipex_common import cpu_capability, graph_mode, load_hf_model

log = logging.getLogger(__name__)

QCONFIG_SUMMARY = "qconfig_summary.json"
# Calibration texts are cut to this many tokens (and to the model's context window).
CALIBRATION_MAX_TOKENS = 512
# Position of input ids, attention mask and position ids in IPEX's example-input tuple
# for decoder-only models (`get_dummy_input(model)`): (ids, mask, past_key_values[, position_ids]).
_IDS, _MASK, _POSITIONS = 0, 1, 3


def _smooth_quant_qconfig(alpha: float) -> Any:
    import intel_extension_for_pytorch as ipex

    return ipex.quantization.get_smooth_quant_qconfig_mapping(alpha=alpha)


def keep_in_fp32(summary: dict[str, Any], patterns: Sequence[str]) -> list[str]:
    """Mark the quantized ops of an IPEX qconfig summary whose name matches one of `patterns`
    (regular expressions searched in IPEX's op names, e.g. `mlp_linear_add\\.linear$` for every
    down_proj, `^lm_head$`) to run in fp32: their input and weight stay unquantized.
    Returns the names of the ops changed."""
    changed = []
    for layer in summary.values():
        for op in layer.get("q_op_infos", {}).values():
            if not any(re.search(pattern, op["fqn"]) for pattern in patterns):
                continue
            for tensor in op["input_tensor_infos"]:
                if tensor and tensor.get("inf_dtype") in ("torch.quint8", "torch.qint8"):
                    tensor["inf_dtype"] = tensor["force_dtype"] = "torch.float32"
            for tensor in op["weight_tensor_infos"]:
                if tensor:
                    tensor["inf_dtype"] = "torch.float32"
            changed.append(op["fqn"])
    return changed


@register_tier
class Int8SqTier(Tier):
    name = "int8-sq"
    recipe_fields = ("alpha", "calibration_samples", "activation_scales")
    # Static mode: quantized ops left in fp32 (patterns for `keep_in_fp32`). Empty: every linear layer,
    # lm_head included, runs in int8. See the accuracy/speed trade-off in the module notes.
    fp32_ops: ClassVar[tuple[str, ...]] = ()

    def calibration_texts(self) -> list[str]:
        """The calibration paragraphs this tier uses: at most `calibration_samples` of them."""
        return read_paragraphs(self.context.calibration_file)[: self.recipe.calibration_samples]

    @property
    def dynamic(self) -> bool:
        return self.recipe.activation_scales == "dynamic"

    def kernel_path(self) -> str:
        return "native" if self.dynamic else "ipex"

    def recipe_key(self) -> dict[str, Any]:
        key = {**super().recipe_key(), "calibration": fingerprint(self.calibration_texts())}
        if self.dynamic:
            key["dynamic_format"] = int8_sq_dynamic.FORMAT
        else:
            key["fp32_ops"] = list(self.fp32_ops)
        return key

    def check(self, model_config: Any) -> None:
        if self.dynamic and model_config is not None:
            int8_sq_dynamic.check(model_config, self.name)
        available = len(read_paragraphs(self.context.calibration_file))  # ConfigError if empty/missing
        wanted = self.recipe.calibration_samples
        if available < wanted:
            log.warning(
                "calibration file %s has %d paragraphs; int8-sq asked for %d and uses the %d there are",
                self.context.calibration_file,
                available,
                wanted,
                available,
            )

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
        if self.dynamic:
            int8_sq_dynamic.build(
                model_dir,
                artifact_dir,
                self.calibration_texts(),
                CALIBRATION_MAX_TOKENS,
                self.recipe.alpha,
                self._reduce_range(),
                progress,
            )
            return
        self._build_static(model_dir, artifact_dir, progress)

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        if self.dynamic:
            return int8_sq_dynamic.load(model_dir, artifact_dir, self.recipe.alpha, self._reduce_range())
        return self._load_static(model_dir, artifact_dir)

    def _reduce_range(self) -> bool:
        # fbgemm sums u8 x s8 products in int16 without VNNI: it needs 7-bit activations there.
        return not self.context.isa.avx512_vnni

    def _build_static(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
        import intel_extension_for_pytorch as ipex
        from intel_extension_for_pytorch.quantization import prepare
        from intel_extension_for_pytorch.transformers.optimize import get_dummy_input

        texts = self.calibration_texts()
        model, tokenizer = load_hf_model(model_dir)
        max_tokens = min(CALIBRATION_MAX_TOKENS, int(model.config.max_position_embeddings))
        qconfig = _smooth_quant_qconfig(self.recipe.alpha)
        progress("preparing the model for calibration")
        model = ipex.llm.optimize(
            model, dtype=torch.float32, quantization_config=qconfig, inplace=True, deployment_mode=False
        )
        example = get_dummy_input(model)
        if len(example) != 4:
            raise RuntimeError(
                f"int8-sq expects IPEX example inputs (ids, mask, past_key_values, position_ids) for "
                f"{model.config.architectures[0]}; got {len(example)} inputs"
            )
        prepared = prepare(model, qconfig, example_inputs=example, inplace=True)
        with torch.no_grad():
            for done, text in enumerate(texts, start=1):
                progress(f"calibrating {done}/{len(texts)}")
                ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
                inputs = list(example)
                inputs[_IDS] = ids
                inputs[_MASK] = torch.ones_like(ids)
                inputs[_POSITIONS] = torch.arange(ids.shape[1]).unsqueeze(0)
                prepared(*inputs)
        summary_path = artifact_dir / QCONFIG_SUMMARY
        prepared.save_qconf_summary(qconf_summary=str(summary_path))
        if self.fp32_ops:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            kept = keep_in_fp32(summary, self.fp32_ops)
            log.info("int8-sq keeps %d ops in fp32: %s", len(kept), ", ".join(kept))
            summary_path.write_text(json.dumps(summary), encoding="utf-8")

    def _load_static(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        import intel_extension_for_pytorch as ipex

        summary = artifact_dir / QCONFIG_SUMMARY
        if not summary.is_file():
            raise FileNotFoundError(f"int8-sq artifact has no {QCONFIG_SUMMARY}: {artifact_dir}")
        model, tokenizer = load_hf_model(model_dir)
        context_tokens = int(model.config.max_position_embeddings)
        alpha = self.recipe.alpha
        with torch.inference_mode():
            optimized = ipex.llm.optimize(
                model,
                dtype=torch.float32,
                quantization_config=_smooth_quant_qconfig(alpha),
                qconfig_summary_file=str(summary),
                inplace=True,
                deployment_mode=True,
            )
        fp32 = f", ops kept in fp32: {' '.join(self.fp32_ops)}" if self.fp32_ops else ""
        kernel = (
            f"IPEX SmoothQuant static int8 (alpha={alpha:g}): uint8 activations with one static "
            "scale per tensor, int8 weights per output channel (symmetric), fp32 between "
            f"quantized ops{fp32}, {graph_mode(optimized)}, "
            f"CPU ISA {cpu_capability()}"
        )
        return LoadedModel(
            model=optimized,
            tokenizer=tokenizer,
            backend=f"ipex {ipex.__version__}",
            kernel=kernel,
            # The matmuls run in int8, but what the model computes between them (norms,
            # softmax, residuals, logits) and hands back is fp32; int8 names the tier's
            # numeric format, which is what clients compare tiers by.
            dtype=torch.int8,
            context_tokens=context_tokens,
        )
