"""SmoothQuant's smoothing, done in the float model's own weights (no IPEX).

Each linear layer's input channel j is divided by a factor s_j and its weight column j
multiplied by it, which leaves the product unchanged while shrinking the activation outliers
that make int8 activations lossy:

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

max|X_j| is observed on calibration texts, max|W_j| over every weight that reads channel j.
The division is folded into whatever produces the input, only where that is exact:

- q/k/v: the input RMSNorm's weight; gate/up: the post-attention RMSNorm's weight;
- down_proj (input silu(gate) * up): the rows of up_proj;
- o_proj (input: the attention heads' outputs, each a mix of its kv head's values): the rows of
  v_proj. With grouped-query attention a kv head serves several query heads, so the factor is
  shared by the query heads of a group (computed from their joint maxima);
- lm_head: the final RMSNorm's weight, on an untied copy of the head (the embeddings keep theirs).

Names follow `tierserve.worker.kernels.packed_weights.fused_float_weights` ("layers.3.qkv",
"lm_head"), so the factors line up with the quantized matrices. Llama-style decoders only (Llama,
Mistral).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

FACTORS_FILE = "smoothing.safetensors"
# Channels whose calibration maximum is (almost) zero keep factor 1 instead of a huge one.
_MIN_RANGE = 1e-5


def _inputs(model: Any) -> dict[str, nn.Module]:
    """One linear layer per smoothed input: the one whose input range is observed."""
    modules: dict[str, nn.Module] = {}
    for index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        modules[f"layers.{index}.qkv"] = attn.q_proj
        modules[f"layers.{index}.o"] = attn.o_proj
        modules[f"layers.{index}.gate_up"] = mlp.gate_proj
        modules[f"layers.{index}.down"] = mlp.down_proj
    modules["lm_head"] = model.lm_head
    return modules


def activation_ranges(model: Any, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| each smoothed linear sees on `batches`
    (token id tensors [1, T]), in fp32. The first position (the attention sink, with the
    largest activations) counts too: leaving it out made the int8 model worse (docs/tiers.md)."""
    ranges: dict[str, torch.Tensor] = {}

    def observer(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def observe(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            ranges[name] = torch.maximum(ranges[name], seen) if name in ranges else seen

        return observe

    handles = [module.register_forward_pre_hook(observer(name)) for name, module in _inputs(model).items()]
    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def _factor(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    valid = (x_max > _MIN_RANGE) & (w_max > _MIN_RANGE)
    x, w = x_max.clamp(min=_MIN_RANGE), w_max.clamp(min=_MIN_RANGE)
    return torch.where(valid, x.pow(alpha) / w.pow(1.0 - alpha), torch.ones_like(x))


def _column_max(*weights: torch.Tensor) -> torch.Tensor:
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def _kv_groups(model: Any) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim)."""
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim


def smoothing_factors(
    model: Any,
    ranges: dict[str, torch.Tensor],
    alpha: float,
    smooth_head: bool = False,
    smooth_down: bool = True,
) -> dict[str, torch.Tensor]:
    """The factor s per input channel of each smoothed linear (o_proj: per kv channel), and of
    the lm_head with `smooth_head` (off by default: smoothing the head did not make the int8
    model measurably better, docs/tiers.md, and it unties the head from the embeddings). Without `smooth_down`
    down_proj's factors are 1: a weight-only down_proj has no int8 input to smooth, and
    smoothing would only widen its weight columns."""
    heads, kv_heads, head_dim = _kv_groups(model)
    per_kv = heads // kv_heads
    factors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"layers.{index}"
        factors[f"{prefix}.qkv"] = _factor(
            ranges[f"{prefix}.qkv"],
            _column_max(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
            alpha,
        )
        factors[f"{prefix}.gate_up"] = _factor(
            ranges[f"{prefix}.gate_up"], _column_max(mlp.gate_proj.weight, mlp.up_proj.weight), alpha
        )
        factors[f"{prefix}.down"] = (
            _factor(ranges[f"{prefix}.down"], _column_max(mlp.down_proj.weight), alpha)
            if smooth_down
            else torch.ones_like(ranges[f"{prefix}.down"])
        )
        # o_proj input channel (head h, dim d) comes from kv channel (h // per_kv, d): one factor
        # for the query heads of a group, from their joint maxima.
        x_max = ranges[f"{prefix}.o"].reshape(kv_heads, per_kv, head_dim).amax(dim=1)
        w_max = _column_max(attn.o_proj.weight).reshape(kv_heads, per_kv, head_dim).amax(dim=1)
        factors[f"{prefix}.o"] = _factor(x_max, w_max, alpha).reshape(-1)
    if smooth_head:
        factors["lm_head"] = _factor(ranges["lm_head"], _column_max(model.lm_head.weight), alpha)
    return factors


def _scale_columns(linear: nn.Linear, factor: torch.Tensor) -> None:
    weight: torch.Tensor = linear.weight
    weight.mul_(factor.to(weight.dtype)[None, :])


def _scale_rows(linear: nn.Linear, factor: torch.Tensor) -> None:
    weight: torch.Tensor = linear.weight
    weight.mul_(factor.to(weight.dtype)[:, None])


def apply_smoothing(model: Any, factors: dict[str, torch.Tensor]) -> None:
    """Fold `factors` into the model in place: the float model computes the same function
    (up to rounding), with smoother inputs to its linear layers."""
    heads, kv_heads, head_dim = _kv_groups(model)
    per_kv = heads // kv_heads
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"layers.{index}"
            s = factors[f"{prefix}.qkv"]
            layer.input_layernorm.weight.div_(s)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
                _scale_columns(linear, s)
            s = factors[f"{prefix}.gate_up"]
            layer.post_attention_layernorm.weight.div_(s)
            for linear in (mlp.gate_proj, mlp.up_proj):
                _scale_columns(linear, s)
            s = factors[f"{prefix}.down"]
            _scale_rows(mlp.up_proj, 1.0 / s)
            _scale_columns(mlp.down_proj, s)
            s = factors[f"{prefix}.o"]  # per kv channel
            _scale_rows(attn.v_proj, 1.0 / s)
            _scale_columns(attn.o_proj, s.reshape(kv_heads, 1, head_dim).expand(-1, per_kv, -1).reshape(-1))
        if "lm_head" in factors:
            s = factors["lm_head"]
            model.model.norm.weight.div_(s)
            # Untie: the embeddings read the same matrix and must not be scaled.
            model.lm_head.weight = nn.Parameter(
                model.lm_head.weight.detach() * s[None, :], requires_grad=False
            )
            model.config.tie_word_embeddings = False


def save_factors(artifact_dir: Path, factors: dict[str, torch.Tensor], alpha: float) -> Path:
    from safetensors.torch import save_file

    path = artifact_dir / FACTORS_FILE
    save_file(
        {name: f.contiguous() for name, f in factors.items()}, str(path), metadata={"alpha": repr(alpha)}
    )
    return path


def load_factors(artifact_dir: Path) -> dict[str, torch.Tensor] | None:
    """The saved factors, or None when the artifact has none."""
    from safetensors.torch import load_file

    path = artifact_dir / FACTORS_FILE
    return {name: t.clone() for name, t in load_file(str(path)).items()} if path.is_file() else None
