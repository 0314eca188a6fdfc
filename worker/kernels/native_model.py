"""A native model: IPEX's traced decoder graph with every linear layer one of our kernels.

Where IPEX's own quantized kernels are slow (its weight-only kernels without AMX and
AVX512_FP16), this keeps what makes IPEX fast for a small model (its TorchScript graph: fused
RoPE, attention with its own KV cache, RMSNorm, little Python per layer) and swaps every
linear layer, lm_head included, for a module from `linears`, as `scheme` says.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tierserve.worker.kernels import ipex_internals, paged_kv
from tierserve.worker.kernels.linears import GateUpSiluMul
from tierserve.worker.kernels.scheme import NativeScheme, down_linear, head_linear, make_linear


def native_decoder_refusal(model_config: Any) -> str | None:
    """Why IPEX's decoder with our linears cannot run this model (a phrase that follows "the
    native ... path"), or None."""
    architecture = (getattr(model_config, "architectures", None) or [type(model_config).__name__])[0]
    if architecture not in ipex_internals.SUPPORTED_ARCHITECTURES:
        return f"supports {', '.join(ipex_internals.SUPPORTED_ARCHITECTURES)}, not {architecture}"
    if getattr(model_config, "attention_bias", False) or getattr(model_config, "mlp_bias", False):
        return "needs linear layers without bias"
    return None


def _layer_linears(
    tensors: dict[str, torch.Tensor], index: int, scheme: NativeScheme, intermediate: int
) -> ipex_internals.LayerLinears:
    prefix = f"layers.{index}"
    return ipex_internals.LayerLinears(
        qkv=make_linear(tensors, f"{prefix}.qkv", scheme.bits, scheme),
        o=make_linear(tensors, f"{prefix}.o", scheme.bits, scheme),
        down=down_linear(tensors, f"{prefix}.down", scheme),
        gate_up_silu_mul=GateUpSiluMul(
            make_linear(tensors, f"{prefix}.gate_up", scheme.bits, scheme), intermediate
        ),
    )


def build_native_model(model: Any, tensors: dict[str, torch.Tensor], scheme: NativeScheme) -> Any:
    """The float `model` lowered into IPEX's decoder with the quantized `tensors` (from
    `packed_weights`) as its linears, traced and frozen for `generate`."""
    intermediate = int(model.config.intermediate_size)
    with torch.no_grad():
        model = ipex_internals.lowered_decoder(model, scheme.activations)
        ipex_internals.install_linears(
            model,
            lambda index: _layer_linears(tensors, index, scheme, intermediate),
            lambda: head_linear(tensors, scheme),
        )
        leftover = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        if leftover:  # the kernel description would be a lie
            raise RuntimeError(f"native WOQ left float linear layers in the model: {', '.join(leftover[:5])}")
        bf16_autocast = scheme.activations == torch.bfloat16
        traced = ipex_internals.trace_for_generation(model, bf16_autocast=bf16_autocast)
    if scheme.kv_cache_bf16:
        paged_kv.keep_cache_in(traced, torch.bfloat16)
    return traced
