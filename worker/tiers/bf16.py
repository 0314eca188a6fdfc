"""Tier bf16: IPEX at bfloat16, run under CPU autocast."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.tiers.base import LoadedModel, Tier, register_tier
from worker.tiers.ipex_common import bf16_autocast, ipex_optimize


@register_tier
class Bf16Tier(Tier):
    name = "bf16"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        loaded = ipex_optimize(model_dir, torch.bfloat16)
        loaded.run_context = bf16_autocast
        return loaded
