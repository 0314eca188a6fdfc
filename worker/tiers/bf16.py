"""Tier bf16: IPEX at bfloat16, run under CPU autocast."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from worker.tiers.base import LoadedModel, Tier, register_tier
from worker.tiers.ipex_common import ipex_optimize


def _bf16_autocast() -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@register_tier
class Bf16Tier(Tier):
    name = "bf16"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        loaded = ipex_optimize(model_dir, torch.bfloat16)
        loaded.run_context = _bf16_autocast
        return loaded
