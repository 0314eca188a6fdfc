"""Quantization tiers (recipes), registered by name. Importing this package registers them all.

The kernels they run are in `tierserve.worker.kernels`; what each tier does on each kernel
path: docs/tiers.md.
"""

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
