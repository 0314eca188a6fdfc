"""How a native model's linear layers are stored and run, and the module each one becomes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from tierserve.worker.kernels.ipex_int8_linear import IpexInt8WoqLinear, rows_independent
from tierserve.worker.kernels.linears import (
    DynamicInt8Linear,
    Int4WoqLinear,
    Int8WoqLinear,
    dense_kernel_name,
    dense_linear,
    dynamic_int8_kernel_name,
    int4_kernel_name,
    int8_kernel_name,
)
from tierserve.worker.kernels.quantizers import INT7_LEVELS, Bits

log = logging.getLogger(__name__)


def _dynamic_int8(int16_sums: bool) -> str:
    """How dynamic int8 layers run: fbgemm where it sums in int16 (no VNNI; `DynamicInt8Linear`)."""
    kernel = "fbgemm quantized::linear_dynamic" if int16_sums else dynamic_int8_kernel_name()
    return (
        f"{kernel} int8 per-channel weights, per-token dynamic int8 activations (each token on its own range)"
    )


_IPEX_INT8 = "IPEX's weight-only int8 per-channel kernel where rows stay independent (else Int8WoqLinear's)"


@dataclass(frozen=True)
class NativeScheme:
    """How the linear layers are stored and run. 16 bits means unquantized (activation dtype)."""

    bits: Bits
    group_size: int  # int4: one of linears.INT4_GROUP_SIZES; int8: 0 (one scale per output channel)
    head_bits: Bits  # lm_head
    activations: torch.dtype  # torch.bfloat16 or torch.float32
    # lm_head with 8 bits: quantize its activations per token at run time (fbgemm) instead of
    # multiplying int8 weights with float activations. Same stored weights.
    head_dynamic: bool = False
    # Every int8 layer as fbgemm's dynamic int8 linear (IPEX's lowp_mode INT8): int8 dot
    # products instead of converting every weight, at an accuracy cost (docs/tiers.md).
    dynamic_layers: bool = False
    # The CPU lacks VNNI: fbgemm sums pairs of u8 x s8 products in int16, exact with 8-bit
    # activations only for weights within ±64. The dynamic layers then store 7-bit weights
    # (clipped to the least error) and the lm_head runs its 8-bit weights as two halves
    # (`DynamicInt8Linear`). With VNNI (int32 sums) every dynamic weight keeps 8 bits.
    int16_sums: bool = True
    # With dynamic_layers: down_proj still weight-only (`Int8WoqLinear`, bfloat16 inputs):
    # its input, silu(gate) * up, is the hardest activation to put in int8. Same stored weights.
    down_weight_only: bool = False
    # That weight-only down_proj on IPEX's kernel (`ipex_int8_linear`), which takes a prompt
    # chunk's or a batch's rows in one pass, where its rows come out independent of the batch.
    down_on_ipex: bool = False
    # The batch's paged KV cache in bfloat16 where attention computes in float32: half the bytes
    # a decode step reads and keeps per token.
    kv_cache_bf16: bool = False

    def int8_levels(self, name: str) -> int:
        """The largest |level| of stored int8 matrix `name` ("layers.3.qkv", "lm_head")."""
        if not (self.int16_sums and self.dynamic_layers and self.bits == 8) or name == "lm_head":
            return 127  # the head keeps 8 bits: `DynamicInt8Linear` runs it in two halves
        weight_only_down = name.endswith(".down") and self.down_weight_only
        return 127 if weight_only_down else INT7_LEVELS

    def describe(self) -> str:
        act = str(self.activations).removeprefix("torch.")
        layers = _describe_format(self.bits, self.group_size, self.activations)
        dynamic = _dynamic_int8(self.int16_sums)
        if self.bits == 8 and self.dynamic_layers:
            layers = dynamic
        head = _describe_format(self.head_bits, self.group_size, self.activations)
        if self.head_bits == 8 and (self.head_dynamic or self.dynamic_layers):
            head = dynamic
        if self.int16_sums and self.dynamic_layers:
            layers = layers.replace("int8 per-channel weights", "7-bit per-channel weights (clipped)")
        if self.int16_sums and head == dynamic:
            head = head.replace("int8 per-channel weights", "int8 per-channel weights as two 7-bit halves")
        down = ""
        if self.bits == 8 and self.dynamic_layers and self.down_weight_only:
            kernel = _IPEX_INT8 if self.down_on_ipex else _describe_format(8, 0, torch.bfloat16)
            down = f"; down_proj {kernel} (weight-only, bfloat16 inputs)"
        cache = "; batch KV cache bfloat16" if self.kv_cache_bf16 else ""
        return f"layers {layers}{down}; lm_head {head}; {act} activations{cache}"


def _describe_format(bits: Bits, group_size: int, activations: torch.dtype) -> str:
    if bits == 4:
        return f"{int4_kernel_name(activations)} int4 group {group_size} asymmetric"
    if bits == 8:
        return f"{int8_kernel_name(activations)} int8 per-channel symmetric"
    return f"{dense_kernel_name(activations)} unquantized"


def make_linear(tensors: dict[str, torch.Tensor], name: str, bits: Bits, scheme: NativeScheme) -> nn.Module:
    """The module for stored matrix `name` (e.g. "layers.3.qkv") at `bits`."""
    if bits == 4:
        return Int4WoqLinear(
            tensors[f"{name}.qweight"],
            tensors[f"{name}.scales_and_zeros"],
            scheme.group_size,
            scheme.activations,
        )
    if bits == 8 and scheme.dynamic_layers:
        return DynamicInt8Linear(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], scheme.int16_sums)
    if bits == 8:
        return Int8WoqLinear(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], scheme.activations)
    return dense_linear(tensors[f"{name}.weight"], scheme.activations)


def down_linear(tensors: dict[str, torch.Tensor], name: str, scheme: NativeScheme) -> nn.Module:
    """A layer's down_proj: weight-only with bfloat16 inputs where the scheme says so."""
    if scheme.bits == 8 and scheme.dynamic_layers and scheme.down_weight_only:
        qweight, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
        if scheme.down_on_ipex:
            linear = IpexInt8WoqLinear(qweight, scales, scheme.activations)
            if rows_independent(linear):
                return linear
            log.warning("%s: IPEX's int8 kernel gives a row other bits in a batch; using aten's", name)
        return Int8WoqLinear(qweight, scales, torch.bfloat16, scheme.activations)
    return make_linear(tensors, name, scheme.bits, scheme)


def head_linear(tensors: dict[str, torch.Tensor], scheme: NativeScheme) -> nn.Module:
    """The lm_head: fbgemm's dynamic int8 linear where the scheme says so."""
    if scheme.head_bits == 8 and (scheme.head_dynamic or scheme.dynamic_layers):
        return DynamicInt8Linear(tensors["lm_head.qweight"], tensors["lm_head.scales"], scheme.int16_sums)
    return make_linear(tensors, "lm_head", scheme.head_bits, scheme)
