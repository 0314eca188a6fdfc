"""Tier fp32: the full-precision model, the reference every accuracy card compares against, on
one of two kernel paths.

- "native": IPEX's decoder graph with every linear, lm_head included, on tierserve's float32
  kernel (`kernels/fp32_linear.cpp`, AVX-512F), whose rows do not depend on the batch, so a
  greedy text made in a batch is the text made alone, bit for bit.
- "ipex": `ipex.llm.optimize` at float32 (TorchScript graph, oneDNN-prepacked weights), with the
  lm_head given its own copy of the tied embedding so that oneDNN runs it too.

`kernel = "auto"` takes "native" on CPUs with AVX-512F: on a Zen 4 core the decode step's linears
took 1.4-2.2x less time than oneDNN's for 1-4 rows (docs/benchmarks/fp32-kernel-*); not measured on
an AMX Xeon, where `kernel = "ipex"` forces IPEX's. Elsewhere, and for a model the native decoder
does not take, "ipex".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from tierserve.worker.kernels import linears
from tierserve.worker.tiers.base import KernelPath, LoadedModel, PathTier, register_tier
from tierserve.worker.tiers.ipex_llm import ipex_optimize
from tierserve.worker.tiers.native_dense import dense_refusal, load_native_dense

log = logging.getLogger(__name__)


class IpexFp32(KernelPath):
    name: ClassVar[str] = "ipex"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        return ipex_optimize(model_dir, torch.float32)


class NativeFp32(KernelPath):
    name: ClassVar[str] = "native"

    def key(self) -> dict[str, Any]:
        return {"native_fp32_linear": linears.FP32_KERNEL_NAME}  # the card is scored through it

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        refusal = dense_refusal(model_dir, linears.tierserve_fp32_kernel(), "tierserve's fp32 kernel")
        if refusal is not None:
            log.warning("fp32: the native path %s; running IPEX's fp32 kernels instead", refusal)
            return IpexFp32().load(model_dir, artifact_dir)
        return load_native_dense(model_dir, torch.float32)


@register_tier
class Fp32Tier(PathTier):
    name = "fp32"
    recipe_fields = ("kernel",)

    def choose_path(self) -> KernelPath:
        kernel = self.recipe.kernel
        if kernel == "native" or (kernel == "auto" and self.context.isa.avx512):
            return NativeFp32()
        return IpexFp32()
