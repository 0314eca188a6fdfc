"""The weight-only tiers on IPEX's recipe: `ipex.llm.optimize` with a weight-only qconfig."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tierserve.domain.config import ConfigError
from tierserve.worker.kernels.ipex_internals import graph_mode
from tierserve.worker.tiers.base import KernelPath, LoadedModel, Progress, bf16_autocast, cpu_capability
from tierserve.worker.tiers.checkpoints import (
    checkpoint_width,
    describe_low_precision_checkpoint,
    read_low_precision_checkpoint,
)
from tierserve.worker.tiers.loading import load_hf_model

if TYPE_CHECKING:
    from tierserve.worker.tiers.woq import WoqTier

IPEX_SETTINGS_FILE = "woq-ipex.json"


class IpexWoq(KernelPath):
    name: ClassVar[str] = "ipex"

    def __init__(self, tier: WoqTier) -> None:
        self.tier = tier

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
        from intel_extension_for_pytorch.quantization import (
            WoqLowpMode,
            WoqWeightDtype,
            get_weight_only_quant_qconfig_mapping,
        )

        tier = self.tier
        model, tokenizer = load_hf_model(model_dir)
        tier.check(model.config)
        context_tokens = int(model.config.max_position_embeddings)
        settings = self.settings(model.config)
        # IPEX's NONE: compute at the activation dtype, which is fp32 for lowp FP32.
        lowp_modes = {"BF16": WoqLowpMode.BF16, "FP32": WoqLowpMode.NONE, "INT8": WoqLowpMode.INT8}
        qconfig = get_weight_only_quant_qconfig_mapping(
            weight_dtype=WoqWeightDtype.INT4 if tier.bits == 4 else WoqWeightDtype.INT8,
            lowp_mode=lowp_modes[settings["lowp_mode"]],
            group_size=settings["group_size"],
        )
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
        with torch.inference_mode():
            optimized = ipex.llm.optimize(
                model, dtype=dtype, inplace=True, quantization_config=qconfig, deployment_mode=True, **extra
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
