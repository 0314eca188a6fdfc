"""Tier int8-sq: SmoothQuant int8, in two modes chosen by the recipe's `activation_scales`.

SmoothQuant moves part of each linear layer's activation outliers into its weights (per
input channel, by a factor set by `alpha`), so that both can be quantized to int8, weights
per output channel. The modes differ in how activations get their int8 scale, and each is
one kernel path:

- "dynamic" (the default; kernel path "native", `int8_sq_dynamic`): one scale per token,
  computed at run time, fbgemm's dynamic int8 linears inside IPEX's traced fp32 decoder graph;
  down_proj keeps int8 weights but bf16 inputs (weight-only).
- "static" (kernel path "ipex", `int8_sq_static`): IPEX's SmoothQuant, one static scale per
  tensor found by calibration.

Why dynamic is the default (static per-tensor scales cannot cover the attention sink's
activations), and the alternatives measured: docs/tiers.md.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from tierserve.domain.textsets import fingerprint, read_paragraphs
from tierserve.worker.tiers.base import KernelPath, PathTier, register_tier
from tierserve.worker.tiers.int8_sq_dynamic import DynamicSmoothQuant
from tierserve.worker.tiers.int8_sq_static import StaticSmoothQuant

log = logging.getLogger(__name__)

# Calibration texts are cut to this many tokens (and to the model's context window).
CALIBRATION_MAX_TOKENS = 512


@register_tier
class Int8SqTier(PathTier):
    name = "int8-sq"
    recipe_fields = ("alpha", "calibration_samples", "activation_scales")
    # Static mode: quantized ops left in fp32 (patterns for `int8_sq_static.keep_in_fp32`).
    # Empty: every linear layer, lm_head included, runs in int8.
    fp32_ops: ClassVar[tuple[str, ...]] = ()

    def calibration_texts(self) -> list[str]:
        """The calibration paragraphs this tier uses: at most `calibration_samples` of them."""
        return read_paragraphs(self.context.calibration_file)[: self.recipe.calibration_samples]

    def calibration_max_tokens(self, model_config: Any) -> int:
        """How many tokens of each calibration text are run."""
        return min(CALIBRATION_MAX_TOKENS, int(model_config.max_position_embeddings))

    def choose_path(self) -> KernelPath:
        if self.recipe.activation_scales == "dynamic":
            return DynamicSmoothQuant(self)
        return StaticSmoothQuant(self)

    def recipe_key(self) -> dict[str, Any]:
        return {**super().recipe_key(), "calibration": fingerprint(self.calibration_texts())}

    def check(self, model_config: Any) -> None:
        self.path.check(model_config)
        available = len(read_paragraphs(self.context.calibration_file))  # ConfigError if empty/missing
        wanted = self.recipe.calibration_samples
        if available < wanted:
            log.warning(
                "calibration file %s has %d paragraphs; int8-sq asked for %d and uses the %d there are",
                self.context.calibration_file,
                available,
                wanted,
                available,
            )
