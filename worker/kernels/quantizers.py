"""Round-to-nearest weight quantizers, in the layouts the native kernels (and IPEX's int4
kernels) read."""

from __future__ import annotations

from typing import Literal

import torch

# Stored width of a matrix: 4 or 8 bits, or 16 for unquantized (kept at the activation dtype).
Bits = Literal[4, 8, 16]


# Levels of a 7-bit weight: what fbgemm's int8 kernels can take with 8-bit activations on a CPU
# without VNNI, where they sum pairs of u8 x s8 products in int16 (2 x 255 x 63 < 32767).
INT7_LEVELS = 63
# Clipping ratios `quantize_int8` tries per output channel when asked to (1.0 = no clipping).
_CLIP_RATIOS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76)


def quantize_int8(weight: torch.Tensor, levels: int = 127, clip: bool = False) -> dict[str, torch.Tensor]:
    """Symmetric int8, one scale per output channel: weight ≈ qweight * scales[:, None], with
    |qweight| <= levels. `clip`: per channel, the scale among max|w| * ratio (`_CLIP_RATIOS`) with
    the least squared error; with few levels, rounding the many small weights finer is worth
    clipping the few large ones."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / levels).clamp(min=1e-12)
    if clip:
        scales = _least_error_scales(w, scales, levels)
    qweight = torch.round(w / scales[:, None]).clamp(-levels, levels).to(torch.int8)
    return {"qweight": qweight.contiguous(), "scales": scales.contiguous()}


def _least_error_scales(w: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    best, best_error = scales, torch.full_like(scales, float("inf"))
    for ratio in _CLIP_RATIOS:
        candidate = scales * ratio
        rounded = torch.round(w / candidate[:, None]).clamp(-levels, levels) * candidate[:, None]
        error = ((rounded - w) ** 2).sum(dim=1)
        better = error < best_error
        best, best_error = torch.where(better, candidate, best), torch.where(better, error, best_error)
    return best


def _int4_levels(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max 4-bit levels per group of `group_size` input channels: (levels [N, K] as uint8,
    each group's minimum and step [N, K / group_size]), so weight ≈ level * step + minimum."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide {k} input channels")
    groups = w.reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    step = ((high - low) / 15.0).clamp(min=1e-12)
    levels = torch.round((groups - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.uint8)
    return levels.reshape(n, k), low, step


def pack_int4(levels: torch.Tensor) -> torch.Tensor:
    """Two 4-bit levels per byte, the even column in the low nibble (an odd width padded with 0)."""
    if levels.shape[1] % 2:
        levels = torch.nn.functional.pad(levels, (0, 1))
    return (levels[:, 0::2] | (levels[:, 1::2] << 4)).contiguous()


def quantize_int4(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Asymmetric 4-bit per group of `group_size` input channels: weight ≈ q * scale + min.

    Stored as two nibbles per byte (even column in the low nibble) and, per group and
    output channel, (scale, zero) in the form `_weight_int4pack_mm_for_cpu` wants:
    weight = (q - 8) * scale + zero, so zero = min + 8 * scale.
    """
    levels, low, scale = _int4_levels(weight, group_size)
    scales_and_zeros = torch.stack([scale, low + 8.0 * scale], dim=-1).transpose(0, 1).contiguous()
    return {"qweight": pack_int4(levels), "scales_and_zeros": scales_and_zeros}


def quantize_int4_float_zero(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """The same 4-bit levels as `quantize_int4`, in the form IPEX's weight-only int4 kernels take:
    weight ≈ (q - zero_point) * scale, with the zero point a float (-min / scale), not rounded to
    an integer, so a weight already on a 4-bit grid with a float minimum (GGUF Q4_1) is kept
    exactly. Zero points of groups that do not span 0 lie outside [0, 15].
    """
    levels, low, scale = _int4_levels(weight, group_size)
    return {
        "qweight": pack_int4(levels),
        "scales": scale.contiguous(),
        "zero_points": (-low / scale).contiguous(),
    }


def quantize_weight(
    weight: torch.Tensor, bits: Bits, group_size: int, int8_levels: int = 127
) -> dict[str, torch.Tensor]:
    """The stored tensors of one matrix at `bits` (16: the float weight itself). With fewer
    than 127 `int8_levels`, int8 scales are clipped to the least error."""
    if bits == 4:
        return quantize_int4(weight, group_size)
    if bits == 8:
        return quantize_int8(weight, int8_levels, clip=int8_levels < 127)
    return {"weight": weight.detach().float().contiguous()}
