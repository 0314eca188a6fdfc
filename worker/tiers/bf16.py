"""Tier bf16: bfloat16 weights and activations, on one of two kernel paths.

- "ipex": `ipex.llm.optimize` at bfloat16 under CPU autocast (TorchScript graph,
  oneDNN-prepacked weights). oneDNN prepacks bf16 weights only on CPUs with AVX512 BW/VL/DQ
  or AVX-NE-CONVERT (`CpuIsa.ipex_bf16`).
- "native", for CPUs where IPEX cannot prepack bf16 (AVX2-only CPUs): the weights rounded to
  bfloat16, run in IPEX's float32 graph. The model then answers as with bf16 weights (activations
  stay float32) at float32 speed and memory: PyTorch's own bf16 kernels on such CPUs are slower
  than float32 (see docs/tiers.md).

`kernel = "auto"` takes "ipex" where the CPU allows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from tierserve.worker.tiers.base import (
    KernelPath,
    LoadedModel,
    PathTier,
    bf16_autocast,
    register_tier,
)
from tierserve.worker.tiers.ipex_llm import ipex_optimize


class IpexBf16(KernelPath):
    name: ClassVar[str] = "ipex"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        loaded = ipex_optimize(model_dir, torch.bfloat16)
        loaded.run_context = bf16_autocast
        return loaded


class NativeBf16(KernelPath):
    name: ClassVar[str] = "native"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        loaded = ipex_optimize(model_dir, torch.float32, weights_rounded_to=torch.bfloat16)
        loaded.kernel = (
            "native: weights rounded to bf16 in the " + loaded.kernel + " (IPEX cannot run bf16 on this CPU: "
            "no AVX512 BW/VL/DQ or AVX-NE-CONVERT)"
        )
        return loaded


@register_tier
class Bf16Tier(PathTier):
    name = "bf16"
    recipe_fields = ("kernel",)

    def choose_path(self) -> KernelPath:
        kernel = self.recipe.kernel
        if kernel == "ipex" or (kernel == "auto" and self.context.isa.ipex_bf16):
            return IpexBf16()
        return NativeBf16()
