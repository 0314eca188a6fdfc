"""What a tier is: a recipe that turns a model folder (and its cached artifact) into a
ready-to-generate model.

A tier is one class registered by name with `@register_tier` (the name must be in
`tierserve.domain.tiers.TIER_NAMES`; docs/tiers.md says what else a new tier takes). Tiers
with an offline step (calibration, packing weights) implement `build`, which writes into
the artifact folder; `load` then rebuilds the model from it quickly. A tier that can run on
more than one kernel path is a `PathTier`: it picks one `KernelPath` at construction and
delegates to it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from tierserve.domain.config import ConfigError, TierRecipe
from tierserve.domain.textsets import BUNDLED
from tierserve.domain.tiers import TIER_NAMES
from tierserve.worker.isa import CpuIsa

Progress = Callable[[str], None]


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to here (e.g. AVX512), for kernel strings."""
    return str(torch.backends.cpu.get_cpu_capability())


def bf16_autocast() -> contextlib.AbstractContextManager[Any]:
    """CPU autocast to bfloat16: the run context of tiers that compute in bf16."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


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
    # Every linear gives a row the same bits whatever rows share the call (tierserve's dense
    # kernels), so a batch may pack a prompt's tokens with the running rows' and still give each
    # the text it would get alone.
    rows_independent: bool = False


@dataclass(frozen=True)
class TierContext:
    """What a tier may use besides the model: its recipe, the CPU's ISA, the calibration texts."""

    recipe: TierRecipe = field(default_factory=TierRecipe)
    isa: CpuIsa = field(default_factory=CpuIsa.detect)
    calibration_file: Path = field(default_factory=lambda: BUNDLED / "calibration.txt")


class Tier(ABC):
    """A quantization recipe. Subclasses set `name` and implement `load` (and `build` if needed)."""

    name: ClassVar[str]
    # The TierRecipe fields this tier reads; they key its cached artifact.
    recipe_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: TierContext) -> None:
        self.context = context

    @property
    def recipe(self) -> TierRecipe:
        return self.context.recipe

    def kernel_path(self) -> str:
        """The kernel path this tier will take on this CPU; part of the artifact key."""
        return "ipex"

    def recipe_key(self) -> dict[str, Any]:
        return {
            "tier": self.name,
            "kernel_path": self.kernel_path(),
            **{name: getattr(self.recipe, name) for name in self.recipe_fields},
        }

    def check(self, model_config: Any) -> None:  # noqa: B027  # optional hook
        """Refuse recipe settings that cannot work with this model (raise ConfigError)."""

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:  # noqa: B027
        """Write what `load` needs into artifact_dir (nothing, for tiers without an offline step)."""

    @abstractmethod
    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        """Load the model and apply this tier's recipe, using what `build` wrote."""


class KernelPath(ABC):
    """One way to run a tier (e.g. IPEX's recipe, or tierserve's native kernels): the entries it
    adds to the artifact key, its recipe checks, its offline step and its load."""

    name: ClassVar[str]  # "ipex" or "native": the tier's `kernel_path()`

    def key(self) -> dict[str, Any]:
        """Artifact-key entries this path adds to the tier's."""
        return {}

    def check(self, model_config: Any) -> None:  # noqa: B027  # optional hook
        """Refuse recipe settings this path cannot run (raise ConfigError)."""

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:  # noqa: B027
        """Write what `load` needs into artifact_dir."""

    @abstractmethod
    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        """Load the model on this path, using what `build` wrote."""


class PathTier(Tier):
    """A tier with more than one kernel path: `choose_path` picks one from the recipe and the
    CPU, once, and `check`, `build`, `load` and the artifact key go to it."""

    def __init__(self, context: TierContext) -> None:
        super().__init__(context)
        self.path = self.choose_path()

    @abstractmethod
    def choose_path(self) -> KernelPath:
        """The kernel path for this recipe on this CPU."""

    def kernel_path(self) -> str:
        return self.path.name

    def recipe_key(self) -> dict[str, Any]:
        return {**super().recipe_key(), **self.path.key()}

    def check(self, model_config: Any) -> None:
        self.path.check(model_config)

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
        self.path.build(model_dir, artifact_dir, progress)

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        return self.path.load(model_dir, artifact_dir)


_REGISTRY: dict[str, type[Tier]] = {}


def register_tier(cls: type[Tier]) -> type[Tier]:
    if cls.name not in TIER_NAMES:
        raise ValueError(f"tier {cls.name!r} is not in tierserve.domain.tiers.TIER_NAMES")
    _REGISTRY[cls.name] = cls
    return cls


def registered_tiers() -> list[str]:
    return sorted(_REGISTRY, key=TIER_NAMES.index)


def make_tier(name: str, context: TierContext | None = None) -> Tier:
    try:
        tier_class = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown tier {name!r}; known tiers: {', '.join(registered_tiers())}") from None
    return tier_class(context or TierContext())
