"""The weight-only tiers on IPEX's recipe: `ipex.llm.optimize` with a weight-only qconfig.

int4 without a `low_precision_checkpoint` does not keep the weights IPEX quantizes itself:
IPEX rounds every group's zero point to an integer, which shifts the 16-level grid against
the model's own (the default model's weights are dequantized GGUF Q4_1, a float minimum per
block of 32), and it quantizes the lm_head to int4 as well. IPEX's int4 kernels take float zero
points, so this path lowers the model without tracing, replaces every weight-only linear with
one quantized min/max per group with an exact zero point (`quantize_int4_float_zero`) and the
lm_head with IPEX's int8 per-channel one, and then traces. Not with lowp_mode INT8, whose
kernels read the zero points as int8. Measurements: docs/tiers.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tierserve.domain.config import ConfigError
from tierserve.worker.kernels import ipex_internals
from tierserve.worker.kernels.ipex_internals import graph_mode
from tierserve.worker.kernels.quantizers import quantize_int4_float_zero
from tierserve.worker.tiers.base import KernelPath, LoadedModel, Progress, bf16_autocast, cpu_capability
from tierserve.worker.tiers.checkpoints import (
    checkpoint_width,
    describe_low_precision_checkpoint,
    read_low_precision_checkpoint,
)
from tierserve.worker.tiers.loading import load_hf_model

if TYPE_CHECKING:
    from tierserve.worker.tiers.woq import WoqTier

log = logging.getLogger(__name__)

IPEX_SETTINGS_FILE = "woq-ipex.json"
# How the int4 layers are stored when IPEX's own quantization is replaced (`exact_int4`); keys
# the artifact, so cards measured on IPEX's own int4 weights are not reused.
EXACT_INT4_FORMAT = "int4 exact float zero points, lm_head int8 per-channel"


class IpexWoq(KernelPath):
    name: ClassVar[str] = "ipex"

    def __init__(self, tier: WoqTier) -> None:
        self.tier = tier

    def key(self) -> dict[str, Any]:
        return {"ipex_format": EXACT_INT4_FORMAT} if self.exact_int4() else {}

    def exact_int4(self) -> bool:
        """Whether this recipe replaces IPEX's own int4 weights (see the module docstring); `load`
        does so where IPEX's lowered layout of the model is known (`woq_slots_known`)."""
        tier = self.tier
        return tier.bits == 4 and not tier.recipe.low_precision_checkpoint and self.lowp_mode() != "INT8"

    def check(self, model_config: Any) -> None:
        tier = self.tier
        group = tier.group_size(model_config)
        if tier.bits == 4 and group & (group - 1):
            raise ConfigError(f"{tier.name}: IPEX needs group_size to be a power of two, got {group}")
        if tier.recipe.low_precision_checkpoint:
            checkpoint = Path(tier.recipe.low_precision_checkpoint).expanduser()
            if not checkpoint.exists():
                raise ConfigError(f"{tier.name}: low_precision_checkpoint {checkpoint} does not exist")
        lowp = self.lowp_mode()
        if lowp != "FP32" and not tier.context.isa.ipex_bf16:
            raise ConfigError(
                f"{tier.name}: lowp_mode {lowp} runs IPEX at bfloat16, which needs AVX512 BW/VL/DQ or "
                f"AVX-NE-CONVERT (this CPU: {tier.context.isa.summary()}); use lowp_mode FP32 or AUTO"
            )

    def lowp_mode(self) -> str:
        """AUTO is bf16 compute where IPEX can run bfloat16, fp32 elsewhere (AVX2-only CPUs)."""
        lowp = self.tier.recipe.lowp_mode
        if lowp == "AUTO":
            return "BF16" if self.tier.context.isa.ipex_bf16 else "FP32"
        return lowp

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
        # IPEX quantizes while optimizing, at load; record what it will be asked for.
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(model_dir)
        self.tier.check(model_config)
        (artifact_dir / IPEX_SETTINGS_FILE).write_text(
            json.dumps(self.settings(model_config), indent=2) + "\n", encoding="utf-8"
        )

    def settings(self, model_config: Any) -> dict[str, Any]:
        """What IPEX is asked for: weight width, group size (-1: per channel), lowp mode, dtype."""
        tier = self.tier
        group = tier.group_size(model_config)
        lowp = self.lowp_mode()
        return {
            "weight_dtype": f"INT{tier.bits}",
            "group_size": group if group else -1,
            "lowp_mode": lowp,
            "dtype": "float32" if lowp == "FP32" else "bfloat16",
            "low_precision_checkpoint": tier.recipe.low_precision_checkpoint,
        }

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        import intel_extension_for_pytorch as ipex

        tier = self.tier
        model, tokenizer = load_hf_model(model_dir)
        tier.check(model.config)
        context_tokens = int(model.config.max_position_embeddings)
        settings = self.settings(model.config)
        qconfig = ipex_internals.woq_qconfig(tier.bits, settings["lowp_mode"], settings["group_size"])
        dtype = torch.float32 if settings["dtype"] == "float32" else torch.bfloat16
        group = settings["group_size"]
        weights = f"INT{tier.bits} {'per-channel' if group == -1 else f'group {group}'}"
        extra: dict[str, Any] = {}
        if tier.recipe.low_precision_checkpoint:
            checkpoint = Path(tier.recipe.low_precision_checkpoint).expanduser()
            extra["low_precision_checkpoint"] = read_low_precision_checkpoint(checkpoint)
            method, width = checkpoint_width(extra["low_precision_checkpoint"])
            if width != f"INT{tier.bits}":
                # IPEX would run the checkpoint's width whatever the tier says: refuse the mismatch.
                raise ConfigError(
                    f"{tier.name}: low_precision_checkpoint {checkpoint} holds {method} {width} weights; "
                    f"serve it as {'int4-woq' if width == 'INT4' else 'a tier of that width'}"
                )
            weights = describe_low_precision_checkpoint(extra["low_precision_checkpoint"])
        exact = self.exact_int4() and ipex_internals.woq_slots_known(model.config)
        if self.exact_int4() and not exact:
            log.warning(
                "%s: exact int4 weights need a Llama or Mistral model without biases on IPEX %sx "
                "(here %s on IPEX %s); keeping IPEX's own int4 weights (integer zero points, int4 "
                "lm_head), which cost accuracy (docs/tiers.md)",
                tier.name,
                ipex_internals.SUPPORTED_SERIES,
                (model.config.architectures or ["this model"])[0],
                ipex.__version__,
            )
        with torch.inference_mode():
            if exact:
                # Quantized from the float weights, which ipex.llm.optimize converts and drops.
                layers, lm_head = _exact_int4_linears(model, group, settings["lowp_mode"])
                weights = f"{weights} exact zero points; lm_head INT8 per-channel"
            optimized = ipex.llm.optimize(
                model,
                dtype=dtype,
                inplace=True,
                quantization_config=qconfig,
                deployment_mode=not exact,
                **extra,
            )
            if exact:
                ipex_internals.replace_woq_linears(optimized, layers, lm_head)
                optimized = ipex_internals.trace_optimized_for_generation(
                    optimized, bf16_autocast=dtype == torch.bfloat16
                )
        speed = (
            "AMX fast kernels"
            if tier.context.isa.ipex_woq_fast
            else "reference kernels: every weight dequantized at every step (no AMX+AVX512_FP16)"
        )
        kernel = (
            f"ipex WOQ {weights} lowp {settings['lowp_mode']}, {settings['dtype']} activations, "
            f"{graph_mode(optimized)}; {speed}; "
            f"CPU ISA {cpu_capability()}"
        )
        return LoadedModel(
            model=optimized,
            tokenizer=tokenizer,
            backend=f"ipex {ipex.__version__}",
            kernel=kernel,
            dtype=dtype,
            context_tokens=context_tokens,
            run_context=bf16_autocast if dtype == torch.bfloat16 else contextlib.nullcontext,
        )


def _exact_int4_linears(model: Any, group_size: int, lowp_mode: str) -> tuple[dict[str, Any], Any]:
    """IPEX weight-only linears for the float `model`: every decoder linear int4 with exact zero
    points (by its path in IPEX's lowered model), and the lm_head int8 per output channel."""
    layer_qconfig = ipex_internals.woq_qconfig(4, lowp_mode, group_size).global_qconfig
    layers = {}
    for path, weight in ipex_internals.woq_layer_weights(model).items():
        # -1 (IPEX's per output channel) is one group as wide as the row.
        packed = quantize_int4_float_zero(weight, group_size if group_size > 0 else weight.shape[1])
        layers[path] = ipex_internals.int4_woq_linear(
            packed["qweight"],
            packed["scales"],
            packed["zero_points"],
            in_features=weight.shape[1],
            group_size=group_size,
            qconfig=layer_qconfig,
        )
    lm_head = ipex_internals.woq_linear_from_float(
        model.lm_head.weight, ipex_internals.woq_qconfig(8, lowp_mode, -1).global_qconfig
    )
    return layers, lm_head
