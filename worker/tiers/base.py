"""What a tier is: a recipe that turns a model folder into a ready-to-generate model.

A new tier is one class in one file, registered by name with `@register_tier`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from tierserve.config import ConfigError
from tierserve.tiers import TIER_NAMES


@dataclass
class LoadedModel:
    """A model ready for `generate`, and what it really runs on."""

    model: Any  # a transformers PreTrainedModel, possibly rewritten by IPEX
    tokenizer: Any
    backend: str
    kernel: str
    dtype: torch.dtype
    context_tokens: int
    # Entered around every forward pass (e.g. bf16 autocast).
    run_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


class Tier(ABC):
    """A quantization recipe. Subclasses set `name` and implement `load`."""

    name: ClassVar[str]

    @abstractmethod
    def load(self, model_dir: Path) -> LoadedModel:
        """Load the model from a Hugging Face folder and apply this tier's recipe."""


_REGISTRY: dict[str, type[Tier]] = {}


def register_tier(cls: type[Tier]) -> type[Tier]:
    if cls.name not in TIER_NAMES:
        raise ValueError(f"tier {cls.name!r} is not in tierserve.tiers.TIER_NAMES")
    _REGISTRY[cls.name] = cls
    return cls


def registered_tiers() -> list[str]:
    return sorted(_REGISTRY, key=TIER_NAMES.index)


def make_tier(name: str) -> Tier:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(f"unknown tier {name!r}; known tiers: {', '.join(registered_tiers())}") from None
