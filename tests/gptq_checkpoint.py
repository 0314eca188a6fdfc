"""A GPTQ-format int4 checkpoint of a model's linear layers, and its independent dequantization.

The layout is the one AutoGPTQ writes and IPEX's `low_precision_checkpoint` reads by default
(`quant_method` "gptq"; intel_extension_for_pytorch/utils/weight_only_quantization.py and
nn/utils/_model_convert.py), for a linear layer `<name>` with N outputs and K inputs, group size G:

- `<name>.qweight`: int32 [K / 8, N]. Eight 4-bit codes per int32 along the *input* dimension:
  bits 4i..4i+3 of row r hold input channel 8r + i (lowest nibble first).
- `<name>.qzeros`: int32 [K / G, N / 8]. Eight 4-bit zero points per int32 along the *output*
  dimension, stored minus one (GPTQ "v1" convention; IPEX adds the one back, modulo 16).
- `<name>.scales`: float16 [K / G, N].
- `<name>.g_idx`: int32 [K], the group of each input channel (i // G without act-order; IPEX
  recognises that and drops it).

Weight: W[n, k] = scales[g, n] * (code[k, n] - (stored_zero[g, n] + 1)), g = g_idx[k].
The lm_head is left out, as GPTQ tools do; IPEX then keeps it in floating point.
"""

from __future__ import annotations

from pathlib import Path

import torch

_NIBBLES = 8  # 4-bit values per int32


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] integers in 0..15 -> int32 [R / 8, C]; row 8r + i goes to bits 4i..4i+3 of row r."""
    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows // _NIBBLES, _NIBBLES, cols)
    packed = torch.zeros(rows // _NIBBLES, cols, dtype=torch.int64)
    for i in range(_NIBBLES):
        packed |= grouped[:, i, :] << (4 * i)
    # Reinterpret as two's-complement int32, as the checkpoints store it.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_rows`: int32 [R, C] -> int64 [8R, C] in 0..15."""
    wide = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(wide >> (4 * i)) & 0xF for i in range(_NIBBLES)], dim=1)
    return nibbles.reshape(packed.shape[0] * _NIBBLES, packed.shape[1])


def quantize_gptq(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Asymmetric min/max int4 quantization of one [N, K] weight, in GPTQ layout. Zero points
    are kept in 1..15, where every GPTQ reader agrees (a zero of 0 is stored as -1, which
    AutoGPTQ reads back as 16 and IPEX as 0)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(-1).clamp(max=0)
    high = groups.amax(-1).clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-6).to(torch.float16)
    scale = scales.float()[..., None]
    zeros = torch.round(-low / scales.float()).clamp(1, 15).to(torch.int64)  # [N, K/G]
    codes = torch.clamp(torch.round(groups / scale) + zeros[..., None], 0, 15).to(torch.int64)
    return {
        "qweight": pack_int4_rows(codes.reshape(out_features, in_features).t()),
        # [N, K/G] packed along N: [N/8, K/G], transposed.
        "qzeros": pack_int4_rows(zeros - 1).t().contiguous(),
        "scales": scales.t().contiguous(),
        "g_idx": torch.arange(in_features, dtype=torch.int32) // group_size,
    }


def gptq_state_dict(model: torch.nn.Module, group_size: int) -> dict[str, torch.Tensor]:
    """Every nn.Linear but the lm_head, quantized, under the model's own module names."""
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            for key, tensor in quantize_gptq(module.weight.detach(), group_size).items():
                state[f"{name}.{key}"] = tensor
    return state


def write_gptq_checkpoint(model: torch.nn.Module, path: Path, group_size: int) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(gptq_state_dict(model, group_size), str(path))
    return path


def dequantize_gptq(state: dict[str, torch.Tensor], zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """{"<name>.weight": float [N, K]} for every quantized layer, read by the formula in the module
    docstring. `zero_offset` 0 reads the zero points as stored (the GPTQ "v2" convention), which
    is wrong for these files and serves as a near miss."""
    weights: dict[str, torch.Tensor] = {}
    for key in state:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        codes = unpack_int4_rows(state[key])  # [K, N]
        zeros = unpack_int4_rows(state[f"{name}.qzeros"].t()).t() + zero_offset  # [K/G, N]
        scales = state[f"{name}.scales"].float()  # [K/G, N]
        group = state[f"{name}.g_idx"].long()  # [K]
        weights[f"{name}.weight"] = ((codes - zeros[group]) * scales[group]).t().contiguous()
    return weights
