"""Tier bf16: bfloat16 weights and activations, on one of two kernel paths.

- "ipex": `ipex.llm.optimize` at bfloat16 under CPU autocast (TorchScript graph,
  oneDNN-prepacked weights). oneDNN prepacks bf16 weights only on CPUs with AVX512 BW/VL/DQ
  or AVX-NE-CONVERT (`CpuIsa.ipex_bf16`).
- "native": the transformers model with its weights stored at bfloat16, on PyTorch's own
  kernels, for CPUs where IPEX cannot prepack bf16 (AVX2-only CPUs).

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
    cpu_capability,
    register_tier,
)
from tierserve.worker.tiers.ipex_llm import ipex_optimize
from tierserve.worker.tiers.loading import load_hf_model


class IpexBf16(KernelPath):
    name: ClassVar[str] = "ipex"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        loaded = ipex_optimize(model_dir, torch.bfloat16)
        loaded.run_context = bf16_autocast
        return loaded


class NativeBf16(KernelPath):
    name: ClassVar[str] = "native"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        model, tokenizer = load_hf_model(model_dir)
        model = model.to(torch.bfloat16)
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            backend=f"torch {torch.__version__}",
            kernel=(
                "transformers eager, bf16 weights (native: IPEX cannot prepack bf16 without "
                f"AVX512 BW/VL/DQ), CPU ISA {cpu_capability()}"
            ),
            dtype=torch.bfloat16,
            context_tokens=int(model.config.max_position_embeddings),
        )


@register_tier
class Bf16Tier(PathTier):
    name = "bf16"
    recipe_fields = ("kernel",)

    def choose_path(self) -> KernelPath:
        kernel = self.recipe.kernel
        if kernel == "ipex" or (kernel == "auto" and self.context.isa.ipex_bf16):
            return IpexBf16()
        return NativeBf16()
