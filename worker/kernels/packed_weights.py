"""The native paths' artifact: every quantized matrix of a model in one safetensors file.

The layout is machine-independent (int4 as two plain nibbles per byte); the linear modules
repack it for the CPU at load. q/k/v are quantized as one fused matrix and so are gate/up
(rows quantize independently, so this equals quantizing them apart), which saves kernel calls
per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tierserve.worker.kernels.quantizers import quantize_weight
from tierserve.worker.kernels.scheme import NativeScheme

ARTIFACT_FILE = "woq-native.safetensors"
# Bumped when the stored layout changes; it is part of the tiers' artifact keys.
ARTIFACT_FORMAT = "1"


def _metadata(scheme: NativeScheme) -> dict[str, str]:
    """What the stored tensors depend on (how they run at load does not matter)."""
    return {
        "format": ARTIFACT_FORMAT,
        "bits": str(scheme.bits),
        "group_size": str(scheme.group_size),
        "head_bits": str(scheme.head_bits),
    } | _narrow_int8(scheme)


def _narrow_int8(scheme: NativeScheme) -> dict[str, str]:
    """Present only for 7-bit dynamic layers, so the artifacts of every other scheme stay valid."""
    levels = scheme.int8_levels("layers.0.qkv")
    return {} if levels == 127 else {"dynamic_int8_levels": str(levels)}


def fused_float_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float weight) of every matrix the native paths quantize, q/k/v and gate/up fused."""
    for index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"layers.{index}.qkv", torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        yield f"layers.{index}.o", attn.o_proj.weight
        yield f"layers.{index}.gate_up", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        yield f"layers.{index}.down", mlp.down_proj.weight
    yield "lm_head", model.lm_head.weight


def quantize_model(
    model: Any, scheme: NativeScheme, progress: Callable[[str], None]
) -> dict[str, torch.Tensor]:
    """The stored tensors of every matrix of a float Llama-style model, keyed "<matrix>.<part>"."""
    tensors: dict[str, torch.Tensor] = {}
    layers = len(model.model.layers)
    for name, weight in fused_float_weights(model):
        bits = scheme.head_bits if name == "lm_head" else scheme.bits
        levels = scheme.int8_levels(name)
        for part, tensor in quantize_weight(weight, bits, scheme.group_size, levels).items():
            tensors[f"{name}.{part}"] = tensor
        if name.endswith(".down"):
            progress(f"quantized layer {int(name.split('.')[1]) + 1}/{layers}")
    return tensors


def save_artifact(artifact_dir: Path, tensors: dict[str, torch.Tensor], scheme: NativeScheme) -> Path:
    from safetensors.torch import save_file

    path = artifact_dir / ARTIFACT_FILE
    save_file(tensors, str(path), metadata=_metadata(scheme))
    return path


def read_artifact(artifact_dir: Path, scheme: NativeScheme) -> dict[str, torch.Tensor] | None:
    """The quantized weights, or None when the artifact is missing or was built for another scheme."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = artifact_dir / ARTIFACT_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata != _metadata(scheme):
        return None
    # Fresh (aligned) copies: safetensors maps the file, and a tensor at an arbitrary file offset
    # crashes aten._weight_int8pack_mm's vector loads.
    return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
