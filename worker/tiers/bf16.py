"""Tier bf16: bfloat16 weights and activations, on one of two kernel paths.

- "ipex": `ipex.llm.optimize` at bfloat16 under CPU autocast (TorchScript graph,
  oneDNN-prepacked weights). oneDNN prepacks bf16 weights only on CPUs with AVX512 BW/VL/DQ
  or AVX-NE-CONVERT (`CpuIsa.ipex_bf16`).
- "native": IPEX's decoder graph with every linear on tierserve's bfloat16 kernel
  (`kernels/bf16_linear.cpp`, AVX512_BF16), whose rows do not depend on the batch: IPEX's own
  bf16 linears block their sums by the number of rows, so a greedy text made in a batch parts
  from the text made alone at near-ties. Without AVX512_BF16 (AVX2-only CPUs): the weights
  rounded to bfloat16, run in IPEX's float32 graph. The model then answers as with bf16 weights
  (activations stay float32) at float32 speed and memory: PyTorch's own bf16 kernels on such
  CPUs are slower than float32 (see docs/tiers.md). A model the native decoder does not take
  runs on "ipex" where the CPU allows it.

`kernel = "auto"` takes "native" on CPUs with AVX512_BF16 and no AMX (there as fast as IPEX's
kernels: docs/benchmarks/bf16-kernel-ab-*), "ipex" on CPUs with AMX (its tiles multiply bf16
several times faster than AVX-512 does, which prompts feel) and on other CPUs it can run bf16 on,
and "native" (rounded weights) elsewhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from tierserve.worker.kernels import linears
from tierserve.worker.tiers.base import (
    KernelPath,
    LoadedModel,
    PathTier,
    TierContext,
    bf16_autocast,
    register_tier,
)
from tierserve.worker.tiers.ipex_llm import ipex_optimize
from tierserve.worker.tiers.native_dense import dense_refusal, load_native_dense

log = logging.getLogger(__name__)


class IpexBf16(KernelPath):
    name: ClassVar[str] = "ipex"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        loaded = ipex_optimize(model_dir, torch.bfloat16)
        loaded.run_context = bf16_autocast
        return loaded


class NativeBf16(KernelPath):
    name: ClassVar[str] = "native"

    def __init__(self, context: TierContext) -> None:
        self.context = context

    def key(self) -> dict[str, Any]:
        # Which linears run here: the card is scored through them.
        linear = linears.BF16_KERNEL_NAME if self.context.isa.avx512_bf16 else "weights rounded, float32"
        return {"native_bf16_linear": linear}

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        if not self.context.isa.avx512_bf16:
            return self._rounded_weights(model_dir)
        refusal = dense_refusal(model_dir, linears.tierserve_bf16_kernel(), "tierserve's bf16 kernel")
        if refusal is not None:
            log.warning("bf16: the native path %s; running IPEX's bf16 kernels instead", refusal)
            return IpexBf16().load(model_dir, artifact_dir)
        return load_native_dense(model_dir, torch.bfloat16, run_context=bf16_autocast)

    @staticmethod
    def _rounded_weights(model_dir: Path) -> LoadedModel:
        loaded = ipex_optimize(model_dir, torch.float32, weights_rounded_to=torch.bfloat16)
        loaded.kernel = (
            "native: weights rounded to bf16 in the " + loaded.kernel + " (this CPU has no AVX512_BF16 "
            "for bf16 products)"
        )
        return loaded


@register_tier
class Bf16Tier(PathTier):
    name = "bf16"
    recipe_fields = ("kernel",)

    def choose_path(self) -> KernelPath:
        kernel, isa = self.recipe.kernel, self.context.isa
        if kernel == "native":
            return NativeBf16(self.context)
        if kernel == "ipex" or (isa.ipex_bf16 and (isa.amx or not isa.avx512_bf16)):
            return IpexBf16()
        return NativeBf16(self.context)
