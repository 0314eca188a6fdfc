"""Quantization tiers, registered by name. Importing this package registers them all."""

from tierserve.worker.tiers import bf16, fp32, int8_sq, woq
from tierserve.worker.tiers.base import LoadedModel, Tier, TierContext, make_tier, registered_tiers

__all__ = [
    "LoadedModel",
    "Tier",
    "TierContext",
    "bf16",
    "fp32",
    "int8_sq",
    "make_tier",
    "registered_tiers",
    "woq",
]
