"""Linear modules that run stored quantized weights on PyTorch's own CPU kernels (no bias).

- `Int8WoqLinear`: int8 weights with one scale per output channel, float activations; with
  bfloat16 activations on tierserve's kernel (`woq_int8.cpp`) where the CPU has AVX512_BF16, else
  `aten._weight_int8pack_mm`.
- `Int4WoqLinear`: 4-bit weights with a scale and zero point per group of input channels, float
  activations; with bfloat16 activations on tierserve's kernel (`woq_int4.cpp`) where the CPU has
  AVX512_BF16, else `aten._weight_int4pack_mm_for_cpu`.
- `DynamicInt8Linear`: int8 weights per output channel, activations quantized to 8 bits per
  token (each on its own range) at run time; on tierserve's kernel (`dynamic_int8.cpp`) where the
  CPU has AVX512_VNNI, else fbgemm's `quantized::linear_dynamic`.
- `Bf16Linear`: a bfloat16 matrix and activations on tierserve's kernel (`bf16_linear.cpp`),
  whose rows do not depend on the batch, where the CPU has AVX512_BF16.
- `Fp32Linear`: the same in float32 (`fp32_linear.cpp`) where the CPU has AVX-512F.
- `DenseLinear`: an unquantized matrix at the activation dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from tierserve.worker.kernels import decode_attention

# The largest |weight level| fbgemm's int16 pair sums take with 8-bit activations: 2 x 255 x 64 < 32767.
_INT16_SAFE_LEVELS = 64
# Group sizes `_weight_int4pack_mm_for_cpu` accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _library_op(name: str) -> Any | None:
    """`torch.ops.tierserve.<name>` from the library built with the decode-attention kernel, or
    None where the library has no such op (this CPU lacks its instructions) or could not be built."""
    decode_attention.load(decode_attention.default_dir())
    return getattr(torch.ops.tierserve, name, None)


def tierserve_int8_kernel() -> Any | None:
    """tierserve's int8 weight-only kernel (`woq_int8.cpp`; AVX512_BF16), or None."""
    return _library_op("int8_woq_linear")


def _weight_only_kernel_name(
    activations: torch.dtype, kernel: Callable[[], Any | None], ours: str, aten: str
) -> str:
    """`ours` where bfloat16 activations find tierserve's `kernel`, else `aten` (the library is
    not loaded for float32 activations, which take aten's kernel either way)."""
    return ours if activations == torch.bfloat16 and kernel() is not None else aten


def int8_kernel_name(activations: torch.dtype) -> str:
    """Which kernel an `Int8WoqLinear` at `activations` runs on this machine."""
    return _weight_only_kernel_name(
        activations,
        tierserve_int8_kernel,
        "tierserve int8_woq_linear (VDPBF16PS)",
        "aten._weight_int8pack_mm",
    )


def pack_for_dot_products(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K/2, 16, 2]: each pair of input channels of 16 output channels side by
    side, the layout VDPBF16PS multiplies (int8: `woq_int8.cpp`, bfloat16: `bf16_linear.cpp`).
    The same values, reordered."""
    n, k = (int(s) for s in qweight.shape)
    return qweight.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


class Int8WoqLinear(nn.Module):
    """y = x @ (qweight * scales).T, computed at `activations` and returned at `output` (default:
    the same). With bfloat16 activations on tierserve's kernel where it is built (one pass over
    the weights whatever the rows), else on aten._weight_int8pack_mm (its fast path wants
    bfloat16). The scales are rounded to `activations` either way, as aten takes them."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        activations: torch.dtype,
        output: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self.activations = activations
        self.output = output or activations
        kernel = tierserve_int8_kernel() if activations == torch.bfloat16 else None
        fits = self.out_features % 16 == 0 and self.in_features % 2 == 0
        # Fixed here, not per call: the traced graph keeps one path.
        self.kernel = kernel if fits else None
        if self.kernel is not None:
            self.register_buffer("weight", pack_for_dot_products(qweight.contiguous()))
            self.register_buffer("scales", scales.to(activations).float().contiguous())
        else:
            self.register_buffer("weight", qweight.contiguous())
            self.register_buffer("scales", scales.to(activations).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.activations).contiguous()
        if self.kernel is not None:
            y: torch.Tensor = self.kernel(flat, self.weight, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features).to(self.output)


if TYPE_CHECKING:
    _PackedLinear = Any
else:  # TorchScript needs the real class to type the packed weights
    _PackedLinear = torch.classes.quantized.LinearPackedParamsBase


@functools.cache
def _per_token_linear_dynamic() -> Any:
    """fbgemm's dynamic linear with each row (token) quantized on its own range, so that a row's
    result never depends on the rows beside it, as a TorchScript function (`torch.jit.trace`
    keeps it whole).

    fbgemm quantizes its whole input on one range: right for one decode token, but in a prompt
    an attention-sink token (activations ~1000x the others) would crush every other row, and in
    a batch of decode rows each row's numbers would depend on its neighbours (a greedy text made
    in a batch then parts from the text made alone). So each row is mapped affinely onto [-1, 1]
    (its minimum to -1, its maximum to +1: all 256 levels over the row's own range), an anchor
    row holding -1 and +1 makes fbgemm's range exactly [-1, 1] whatever the batch, and the output
    is mapped back: W x = half * (W unit) + center * (W 1), with `weight_sums` = W 1."""

    def linear(
        x: torch.Tensor, packed: _PackedLinear, anchor: torch.Tensor, weight_sums: torch.Tensor
    ) -> torch.Tensor:
        low = x.amin(dim=1, keepdim=True)
        high = x.amax(dim=1, keepdim=True)
        center = (high + low) * 0.5
        half = ((high - low) * 0.5).clamp_min(1e-12)
        unit = ((x - center) / half).clamp(-1.0, 1.0)
        y: torch.Tensor = torch.ops.quantized.linear_dynamic(torch.cat([unit, anchor]), packed, False)
        return y[:-1] * half + center * weight_sums

    return torch.jit.script(linear)


def tierserve_dynamic_int8_kernel() -> Any | None:
    """tierserve's dynamic int8 kernel (`dynamic_int8.cpp`; AVX512_VNNI), or None."""
    return _library_op("int8_dynamic_linear")


def dynamic_int8_kernel_name() -> str:
    """Which kernel a `DynamicInt8Linear` runs on this machine (where its shape fits)."""
    if tierserve_dynamic_int8_kernel() is not None:
        return "tierserve int8_dynamic_linear (VPDPBUSD)"
    return "fbgemm quantized::linear_dynamic"


def _row_sums(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W 1 for W = qweight * scales: each row's shift, undone after the product."""
    return (qweight.float() * scales.float()[:, None]).sum(dim=1)


def pack_for_vnni(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [N/16, K/4, 16, 4]: four input channels of 16 output channels side by side,
    the layout VPDPBUSD multiplies (`dynamic_int8.cpp`). The same bytes, reordered."""
    n, k = (int(s) for s in qweight.shape)
    return qweight.reshape(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous()


class DynamicInt8Linear(nn.Module):
    """y = x @ (qweight * scales).T with x quantized per token to 8-bit int at run time: on
    tierserve's kernel where the CPU has VNNI (`dynamic_int8.cpp`: the quantization and the
    product in one call, the weights read once for all rows), else on fbgemm.

    `int16_sums`: the CPU lacks VNNI, so fbgemm sums pairs of u8 x s8 products in int16, which
    8-bit activations and weights beyond ±64 can saturate. Such weights then run as two halves
    within ±64 (one packed matrix of twice the rows, the halves' outputs added), exact with all
    8 bits of the activations: fbgemm's own remedy, 7-bit activations (`reduce_range`), cost
    this model's int8-sq tier about 2% perplexity (docs/tiers.md)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, int16_sums: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        fits = self.out_features % 16 == 0 and self.in_features % 4 == 0
        # Fixed here, not per call: the traced graph keeps one path.
        self.kernel = tierserve_dynamic_int8_kernel() if fits and not int16_sums else None
        self.split = False
        if self.kernel is not None:
            self.register_buffer("weight_sums", _row_sums(qweight, scales))
            self.register_buffer("weight", pack_for_vnni(qweight.contiguous()))
            self.register_buffer("column_sums", qweight.to(torch.int32).sum(dim=1).to(torch.int32))
            self.register_buffer("scales", scales.float().contiguous())
            return
        self.split = int16_sums and int(qweight.abs().max()) > _INT16_SAFE_LEVELS
        if self.split:
            high = torch.div(qweight.to(torch.int16), 2, rounding_mode="floor")
            qweight = torch.cat([high, qweight.to(torch.int16) - high]).to(torch.int8)
            scales = torch.cat([scales, scales])
        quantized = torch._make_per_channel_quantized_tensor(
            qweight.contiguous(), scales.double(), torch.zeros_like(scales, dtype=torch.long), 0
        )
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.register_buffer("weight_sums", _row_sums(qweight, scales))  # both halves' when split
        anchor = torch.zeros(1, self.in_features)
        anchor[0, 0], anchor[0, -1] = 1.0, -1.0
        self.register_buffer("anchor", anchor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if self.kernel is not None:
            y: torch.Tensor = self.kernel(flat, self.weight, self.column_sums, self.scales, self.weight_sums)
        else:
            y = _per_token_linear_dynamic()(flat, self.packed, self.anchor, self.weight_sums)
        if self.split:
            y = y[:, : self.out_features] + y[:, self.out_features :]
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (even column low) -> int32 [N, K] in 0..15."""
    low = (nibbles & 0x0F).to(torch.int32)
    high = (nibbles >> 4).to(torch.int32)
    return torch.stack([low, high], dim=-1).reshape(nibbles.shape[0], -1).contiguous()


def tierserve_int4_kernel() -> Any | None:
    """tierserve's int4 weight-only kernel (`woq_int4.cpp`; AVX512_BF16), or None."""
    return _library_op("int4_woq_linear")


def int4_kernel_name(activations: torch.dtype) -> str:
    """Which kernel an `Int4WoqLinear` at `activations` runs on this machine."""
    return _weight_only_kernel_name(
        activations,
        tierserve_int4_kernel,
        "tierserve int4_woq_linear (VDPBF16PS)",
        "aten._weight_int4pack_mm_for_cpu",
    )


def pack_int4_for_dot_products(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (a byte: input channels 2p and 2p + 1 of one output channel) ->
    [N/16, K/4, 32] (`woq_int4.cpp`): for 16 output channels and input channels 4m..4m + 3, byte
    2c + i holds channel c's level at input 4m + i (low nibble) and at 4m + 2 + i (high)."""
    levels = unpack_nibbles(nibbles).to(torch.uint8)
    n, k = (int(s) for s in levels.shape)
    quads = levels.reshape(n // 16, 16, k // 4, 2, 2)  # [block, c, m, which pair, i]
    bytes_ = quads[:, :, :, 0, :] | (quads[:, :, :, 1, :] << 4)  # [block, c, m, i]
    return bytes_.permute(0, 2, 1, 3).reshape(n // 16, k // 4, 32).contiguous()


def pack_int4_scales_for_blocks(scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """[groups, N, 2] (scale, zero) -> [N/16, groups, 2, 16]: per block of 16 output channels, a
    group's scales then zeros in one 64-byte line, in the order the block's weights are read."""
    groups, n, _ = (int(s) for s in scales_and_zeros.shape)
    return scales_and_zeros.reshape(groups, n // 16, 16, 2).permute(1, 0, 3, 2).contiguous()


class Int4WoqLinear(nn.Module):
    """y = x @ dequant(q).T, dequant(q) = (q - 8) * scale + zero per group of input channels. With
    bfloat16 activations on tierserve's kernel where it is built (levels unpacked in registers,
    each unpacked register used for up to four rows; scales and zeros in bfloat16 beside their
    block), else on aten._weight_int4pack_mm_for_cpu.
    The scales and zeros are rounded to `activations` either way, as aten takes them."""

    def __init__(
        self, nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, activations: torch.dtype
    ) -> None:
        super().__init__()
        self.out_features = int(nibbles.shape[0])
        self.in_features = int(nibbles.shape[1]) * 2
        self.group_size = group_size
        self.activations = activations
        kernel = tierserve_int4_kernel() if activations == torch.bfloat16 else None
        fits = self.out_features % 16 == 0 and self.in_features % group_size == 0 and group_size % 4 == 0
        # Fixed here, not per call: the traced graph keeps one path.
        self.kernel = kernel if fits else None
        rounded = scales_and_zeros.to(activations)
        if self.kernel is not None:
            self.register_buffer("weight", pack_int4_for_dot_products(nibbles.contiguous()))
            self.register_buffer("scales_and_zeros", pack_int4_scales_for_blocks(rounded.bfloat16()))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles), 1)
            self.register_buffer("weight", packed)
            self.register_buffer("scales_and_zeros", rounded.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.activations).contiguous()
        if self.kernel is not None:
            y: torch.Tensor = self.kernel(flat, self.weight, self.scales_and_zeros, self.group_size)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.weight, self.group_size, self.scales_and_zeros
            )
        return y.reshape(*x.shape[:-1], self.out_features)


class DenseLinear(nn.Module):
    """An unquantized linear layer at the activation dtype (no bias)."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, activations: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.activations = activations
        self.register_buffer("weight", weight.to(activations).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.activations), self.weight)


def tierserve_bf16_kernel() -> Any | None:
    """tierserve's bfloat16 linear (`bf16_linear.cpp`; AVX512_BF16), or None."""
    return _library_op("bf16_linear")


BF16_KERNEL_NAME = "tierserve bf16_linear (VDPBF16PS, rows independent)"


def bf16_kernel_fits(weight: torch.Tensor) -> bool:
    """Whether `Bf16Linear` takes a matrix of this shape."""
    out_features, in_features = (int(s) for s in weight.shape)
    return out_features % 16 == 0 and in_features % 2 == 0


def tierserve_fp32_kernel() -> Any | None:
    """tierserve's float32 linear (`fp32_linear.cpp`; AVX-512F), or None."""
    return _library_op("fp32_linear")


FP32_KERNEL_NAME = "tierserve fp32_linear (AVX-512 FMA, rows independent)"


def fp32_kernel_fits(weight: torch.Tensor) -> bool:
    """Whether `Fp32Linear` takes a matrix of this shape."""
    return int(weight.shape[0]) % 16 == 0


def _dense_kernel(activations: torch.dtype) -> tuple[Any | None, str]:
    """tierserve's kernel for unquantized layers at `activations` on this machine (or None), and its name."""
    if activations == torch.bfloat16:
        return tierserve_bf16_kernel(), BF16_KERNEL_NAME
    if activations == torch.float32:
        return tierserve_fp32_kernel(), FP32_KERNEL_NAME
    return None, ""


def dense_linear(weight: torch.Tensor, activations: torch.dtype) -> nn.Module:
    """An unquantized layer: on tierserve's bfloat16 or float32 kernel where this CPU has it and it
    takes the shape, else `DenseLinear`."""
    kernel, _ = _dense_kernel(activations)
    if kernel is not None and activations == torch.bfloat16 and bf16_kernel_fits(weight):
        return Bf16Linear(weight, kernel)
    if kernel is not None and activations == torch.float32 and fp32_kernel_fits(weight):
        return Fp32Linear(weight, kernel)
    return DenseLinear(weight, activations)


def dense_kernel_name(activations: torch.dtype) -> str:
    """Which kernel `dense_linear` at `activations` runs on this machine."""
    kernel, name = _dense_kernel(activations)
    return name if kernel is not None else "torch linear"


def pack_for_fp32_lanes(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> [N / 16, K, 16]: each input channel's weights of 16 output channels side
    by side, one AVX-512 register (`fp32_linear.cpp`)."""
    out_features, in_features = (int(s) for s in weight.shape)
    return weight.reshape(out_features // 16, 16, in_features).transpose(1, 2).contiguous()


@dataclass(frozen=True)
class DenseLayout:
    """How one of tierserve's dense kernels takes its matrix."""

    dtype: torch.dtype
    shape_rule: str
    fits: Callable[[torch.Tensor], bool]
    pack: Callable[[torch.Tensor], torch.Tensor]


class _RowsIndependentLinear(nn.Module):
    """y = x @ weight.T at the layout's dtype on one of tierserve's dense kernels: each row's sums
    in one fixed order, whatever rows share the call, so a greedy text made in a batch equals the
    text made alone. Callers check the kernel is built and the layout `fits` the matrix first."""

    layout: ClassVar[DenseLayout]

    def __init__(self, weight: torch.Tensor, kernel: Any) -> None:
        super().__init__()
        if not self.layout.fits(weight):
            shape = tuple(weight.shape)
            raise ValueError(f"{type(self).__name__} takes {self.layout.shape_rule}, not {shape}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.kernel = kernel
        self.register_buffer("weight", self.layout.pack(weight.to(self.layout.dtype).contiguous()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.layout.dtype).contiguous()
        y: torch.Tensor = self.kernel(flat, self.weight)
        return y.reshape(*x.shape[:-1], self.out_features)


class Bf16Linear(_RowsIndependentLinear):
    """bfloat16 on `bf16_linear.cpp` (VDPBF16PS)."""

    layout = DenseLayout(torch.bfloat16, "N % 16 == 0 and even K", bf16_kernel_fits, pack_for_dot_products)


class Fp32Linear(_RowsIndependentLinear):
    """float32 on `fp32_linear.cpp` (AVX-512 FMA), the weights read once per call for up to six
    rows at a time."""

    layout = DenseLayout(torch.float32, "N % 16 == 0", fp32_kernel_fits, pack_for_fp32_lanes)


class GateUpSiluMul(nn.Module):
    """silu(x @ gate.T) * (x @ up.T) with gate and up as one matrix: one kernel call."""

    def __init__(self, linear: nn.Module, intermediate: int) -> None:
        super().__init__()
        self.linear = linear
        self.intermediate = intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.linear(x)
        return nn.functional.silu(y[..., : self.intermediate]) * y[..., self.intermediate :]
