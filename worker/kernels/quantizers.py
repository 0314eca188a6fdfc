"""Round-to-nearest weight quantizers, in the layouts the native kernels read."""

from __future__ import annotations

from typing import Literal

import torch

# Stored width of a matrix: 4 or 8 bits, or 16 for unquantized (kept at the activation dtype).
Bits = Literal[4, 8, 16]


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric int8, one scale per output channel: weight ≈ qweight * scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": qweight.contiguous(), "scales": scales.contiguous()}


def quantize_int4(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Asymmetric 4-bit per group of `group_size` input channels: weight ≈ q * scale + min.

    Stored as two nibbles per byte (even column in the low nibble) and, per group and
    output channel, (scale, zero) in the form `_weight_int4pack_mm_for_cpu` wants:
    weight = (q - 8) * scale + zero, so zero = min + 8 * scale.
    """
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide {k} input channels")
    groups = w.reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    scales_and_zeros = torch.stack([scale, low + 8.0 * scale], dim=-1).transpose(0, 1).contiguous()
    return {"qweight": nibbles, "scales_and_zeros": scales_and_zeros}


def quantize_weight(weight: torch.Tensor, bits: Bits, group_size: int) -> dict[str, torch.Tensor]:
    """The stored tensors of one matrix at `bits` (16: the float weight itself)."""
    if bits == 4:
        return quantize_int4(weight, group_size)
    if bits == 8:
        return quantize_int8(weight)
    return {"weight": weight.detach().float().contiguous()}
