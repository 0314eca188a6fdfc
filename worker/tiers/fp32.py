"""Tier fp32: the full-precision IPEX model, the reference every accuracy card compares against."""

from __future__ import annotations

from pathlib import Path

import torch

from tierserve.worker.tiers.base import LoadedModel, Tier, register_tier
from tierserve.worker.tiers.ipex_llm import ipex_optimize


@register_tier
class Fp32Tier(Tier):
    name = "fp32"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        return ipex_optimize(model_dir, torch.float32)
