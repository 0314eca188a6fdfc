"""int8-sq with static activation scales: IPEX's SmoothQuant recipe.

`build` runs the calibration texts through IPEX's prepared model and saves the observed
ranges as a qconfig summary; `load` quantizes a fresh model from that summary and traces it
(one static scale per tensor for activations, int8 weights per output channel).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tierserve.worker.kernels.ipex_internals import calibration_example, graph_mode, with_tokens
from tierserve.worker.tiers.base import KernelPath, LoadedModel, Progress, cpu_capability
from tierserve.worker.tiers.loading import load_hf_model

if TYPE_CHECKING:
    from tierserve.worker.tiers.int8_sq import Int8SqTier

log = logging.getLogger(__name__)

QCONFIG_SUMMARY = "qconfig_summary.json"


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


class StaticSmoothQuant(KernelPath):
    name: ClassVar[str] = "ipex"

    def __init__(self, tier: Int8SqTier) -> None:
        self.tier = tier

    def key(self) -> dict[str, Any]:
        return {"fp32_ops": list(self.tier.fp32_ops)}

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
        import intel_extension_for_pytorch as ipex
        from intel_extension_for_pytorch.quantization import prepare

        tier = self.tier
        texts = tier.calibration_texts()
        model, tokenizer = load_hf_model(model_dir)
        max_tokens = tier.calibration_max_tokens(model.config)
        qconfig = _smooth_quant_qconfig(tier.recipe.alpha)
        progress("preparing the model for calibration")
        model = ipex.llm.optimize(
            model, dtype=torch.float32, quantization_config=qconfig, inplace=True, deployment_mode=False
        )
        example = calibration_example(model)
        prepared = prepare(model, qconfig, example_inputs=example, inplace=True)
        with torch.no_grad():
            for done, text in enumerate(texts, start=1):
                progress(f"calibrating {done}/{len(texts)}")
                ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
                prepared(*with_tokens(example, ids))
        summary_path = artifact_dir / QCONFIG_SUMMARY
        prepared.save_qconf_summary(qconf_summary=str(summary_path))
        if tier.fp32_ops:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            kept = keep_in_fp32(summary, tier.fp32_ops)
            log.info("int8-sq keeps %d ops in fp32: %s", len(kept), ", ".join(kept))
            summary_path.write_text(json.dumps(summary), encoding="utf-8")

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        import intel_extension_for_pytorch as ipex

        tier = self.tier
        summary = artifact_dir / QCONFIG_SUMMARY
        if not summary.is_file():
            raise FileNotFoundError(f"int8-sq artifact has no {QCONFIG_SUMMARY}: {artifact_dir}")
        model, tokenizer = load_hf_model(model_dir)
        context_tokens = int(model.config.max_position_embeddings)
        alpha = tier.recipe.alpha
        with torch.inference_mode():
            optimized = ipex.llm.optimize(
                model,
                dtype=torch.float32,
                quantization_config=_smooth_quant_qconfig(alpha),
                qconfig_summary_file=str(summary),
                inplace=True,
                deployment_mode=True,
            )
        fp32 = f", ops kept in fp32: {' '.join(tier.fp32_ops)}" if tier.fp32_ops else ""
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
