"""The names of the quantization tiers tierserve knows, most precise first.

This is part of the contract shared by the router (which validates a pinned
tier) and the worker (whose tier registry implements exactly these names).
"""

from typing import Final

TIER_NAMES: Final[tuple[str, ...]] = ("fp32", "bf16", "int8-sq", "int8-woq", "int4-woq")

# The tier every accuracy card is measured against.
REFERENCE_TIER: Final = "fp32"


def is_known_tier(name: str) -> bool:
    return name in TIER_NAMES
