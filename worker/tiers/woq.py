"""Tiers int8-woq and int4-woq: weight-only quantization (activations stay bf16 or fp32).

Two kernel paths, picked once by `choose_path`:

- "ipex" (`woq_ipex`): `ipex.llm.optimize` with `get_weight_only_quant_qconfig_mapping`, and
  the recipe's `low_precision_checkpoint` if any. IPEX quantizes at load; `build` only records
  the settings. Fast only on CPUs with AMX and AVX512_FP16 (`CpuIsa.ipex_woq_fast`); elsewhere
  IPEX dequantizes every weight at every step.
- "native" (`woq_native`): PyTorch's own weight-only kernels inside IPEX's traced decoder graph
  (`tierserve.worker.kernels`). `build` quantizes once and writes the packed weights; `load`
  only reads and repacks them.

`kernel = "auto"` takes "ipex" only where its kernels are fast. Recipe fields: `group_size`
(int4 only; int8 is always one scale per output channel), `lowp_mode`,
`low_precision_checkpoint` (IPEX path only), `kernel`. What each does on each path, and the
measurements behind the defaults: docs/tiers.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from tierserve.domain.config import ConfigError
from tierserve.worker.kernels.quantizers import Bits
from tierserve.worker.kernels.scheme import NativeScheme
from tierserve.worker.tiers.base import KernelPath, PathTier, register_tier
from tierserve.worker.tiers.checkpoints import checkpoint_fingerprint
from tierserve.worker.tiers.woq_ipex import IpexWoq
from tierserve.worker.tiers.woq_native import NativeWoq


class WoqTier(PathTier):
    """Shared by int8-woq and int4-woq; subclasses set the weight widths."""

    bits: ClassVar[Literal[4, 8]]
    # The lm_head's width on the native path (tied to the embeddings in the default model, a
    # fifth of all its weights).
    native_head_bits: ClassVar[Bits]

    def choose_path(self) -> KernelPath:
        kernel = self.recipe.kernel
        if kernel == "ipex" or (kernel == "auto" and self.context.isa.ipex_woq_fast):
            return IpexWoq(self)
        return NativeWoq(self)

    def recipe_key(self) -> dict[str, Any]:
        key = super().recipe_key()
        if self.recipe.low_precision_checkpoint:
            # Its path alone would keep a card measured on an older file at the same path.
            key["checkpoint_files"] = checkpoint_fingerprint(Path(self.recipe.low_precision_checkpoint))
        return key

    def group_size(self, model_config: Any) -> int:
        """Input channels per quantization group; 0 means one group per output channel."""
        if self.bits == 8:
            return 0
        return self.recipe.group_size

    def native_scheme_head(self) -> str:
        """How the native path runs the lm_head. AUTO: int8 dynamic (the faster, docs/tiers.md)
        where fbgemm sums in int32 (VNNI). Without VNNI AUTO keeps the head weight-only: measured
        when the dynamic head took 7-bit activations there, which cost about 1% perplexity on the
        head alone; its two-halves form (`DynamicInt8Linear`) is not yet compared for these tiers. An explicit
        BF16 or FP32 lowp_mode keeps float activations everywhere; INT8 asks for dynamic."""
        if self.recipe.lowp_mode == "INT8":
            return "dynamic-int8"
        if self.recipe.lowp_mode == "AUTO" and self.context.isa.avx512_vnni:
            return "dynamic-int8"
        return "weight-only"

    def native_activations(self) -> torch.dtype:
        """The native path's activation dtype: float32 only where the recipe asks for FP32."""
        return torch.float32 if self.recipe.lowp_mode == "FP32" else torch.bfloat16

    def native_scheme(self, model_config: Any) -> NativeScheme:
        """How the native path stores and runs this recipe's linears."""
        return NativeScheme(
            bits=self.bits,
            group_size=self.group_size(model_config),
            head_bits=self.native_head_bits,
            activations=self.native_activations(),
            head_dynamic=self.native_scheme_head() == "dynamic-int8",
            dynamic_layers=self.recipe.lowp_mode == "INT8",
            # Without VNNI fbgemm sums u8 x s8 products in int16: 7-bit weights there (NativeScheme).
            int16_sums=not self.context.isa.avx512_vnni,
        )

    def check(self, model_config: Any) -> None:
        if self.bits == 4:
            self._check_group_divides(model_config)
        self.path.check(model_config)

    def _check_group_divides(self, model_config: Any) -> None:
        group = self.group_size(model_config)
        if group == 0:
            return
        sizes = _grouped_sizes(model_config)
        fitting = [g for g in (256, 128, 64, 32, 16) if all(s % g == 0 for s in sizes)]
        if any(s % group for s in sizes):
            raise ConfigError(
                f"{self.name}: group_size {group} does not divide the model's hidden size {sizes[0]} "
                f"and intermediate size {sizes[1]}; choose one that divides both"
                + (f" (e.g. {', '.join(map(str, fitting))})" if fitting else "")
            )


def _grouped_sizes(model_config: Any) -> tuple[int, int]:
    """The input widths every quantized matrix has: hidden size (q/k/v, gate/up, o, lm_head) and
    intermediate size (down)."""
    return int(model_config.hidden_size), int(model_config.intermediate_size)


@register_tier
class Int8WoqTier(WoqTier):
    name = "int8-woq"
    bits = 8
    native_head_bits = 8
    recipe_fields = ("lowp_mode", "low_precision_checkpoint", "kernel")


@register_tier
class Int4WoqTier(WoqTier):
    name = "int4-woq"
    bits = 4
    native_head_bits = 8
    recipe_fields = ("group_size", "lowp_mode", "low_precision_checkpoint", "kernel")
