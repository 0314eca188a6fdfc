"""Weight-only quantization on PyTorch's own CPU kernels, inside IPEX's traced decoder graph.

Where IPEX's fast WOQ kernels are missing (no AMX + AVX512_FP16), IPEX dequantizes every
weight at every step. This path keeps what makes IPEX bf16 fast for a small model (its
TorchScript graph: fused RoPE, attention with its own KV cache, RMSNorm, little Python
per layer) and swaps every linear layer for one of PyTorch's weight-only kernels:

- int8: `aten._weight_int8pack_mm`, int8 weights with one symmetric scale per output
  channel (no groups);
- int4: `aten._weight_int4pack_mm_for_cpu`, 4-bit weights in groups of `group_size`
  input channels, each group with its own scale and zero point (asymmetric min/max).

Both take bf16 (fast) or fp32 (slow) activations and accumulate in fp32. The lm_head
(49152 x 576 here, a fifth of all weights) can instead run fbgemm's dynamic int8 linear
(`quantized::linear_dynamic`: the same per-channel int8 weights, each token's activations
quantized to int8 at run time, int8 dot products), as IPEX's lowp_mode INT8 does for every
layer: measured side by side in one process, about 1.7-2 ms per token faster than
`_weight_int8pack_mm` for that matrix on an AVX512-VNNI CPU without AMX. q/k/v are
quantized as one fused matrix and so are gate/up (rows quantize independently, so this
equals quantizing them apart), which saves kernel calls per layer.

The artifact is a safetensors file of quantized weights in a machine-independent layout
(int4 as two plain nibbles per byte); `load` only repacks them for this CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

ARTIFACT_FILE = "woq-native.safetensors"
ARTIFACT_FORMAT = "1"
# Group sizes `_weight_int4pack_mm_for_cpu` accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Architectures whose IPEX decoder layer exposes the fused q/k/v, o, gate/up and down linears
# this path replaces (and which have no biases on them).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

Bits = Literal[4, 8, 16]


@dataclass(frozen=True)
class NativeScheme:
    """How the linear layers are stored and run. 16 bits means unquantized (activation dtype)."""

    bits: Literal[4, 8]
    group_size: int  # int4: one of INT4_GROUP_SIZES; int8: 0 (one scale per output channel)
    head_bits: Bits  # lm_head
    activations: torch.dtype  # torch.bfloat16 or torch.float32
    # lm_head with 8 bits: quantize its activations per token at run time (fbgemm) instead of
    # multiplying int8 weights with float activations. Same stored weights, so not in metadata.
    head_dynamic: bool = False
    # Every int8 layer as fbgemm's dynamic int8 linear (IPEX's lowp_mode INT8): about 1.4x faster
    # than `_weight_int8pack_mm` here (int8 dot products instead of converting every weight), at
    # a measurable accuracy cost (see worker.tiers.woq).
    dynamic_layers: bool = False
    # fbgemm's 7-bit activation range, needed where u8 x s8 products are summed in int16
    # (CPUs without VNNI); with VNNI the full 8 bits are exact.
    reduce_range: bool = True
    # With dynamic_layers: down_proj still weight-only (`_weight_int8pack_mm`, bfloat16 inputs).
    # Its input (silu(gate) * up) is the hardest activation to put in int8, and at one token
    # the weight-only kernel costs no more than fbgemm's dynamic one here (about 47 us each for
    # 576x1536 on 2 threads). Same stored weights, so not in metadata.
    down_weight_only: bool = False

    def metadata(self) -> dict[str, str]:
        return {
            "format": ARTIFACT_FORMAT,
            "bits": str(self.bits),
            "group_size": str(self.group_size),
            "head_bits": str(self.head_bits),
        }

    def describe(self) -> str:
        act = str(self.activations).removeprefix("torch.")
        layers = _describe_format(self.bits, self.group_size)
        if self.bits == 8 and self.dynamic_layers:
            layers = _DYNAMIC_INT8
        head = _describe_format(self.head_bits, self.group_size)
        if self.head_bits == 8 and (self.head_dynamic or self.dynamic_layers):
            head = _DYNAMIC_INT8
        if self.reduce_range and _DYNAMIC_INT8 in (layers, head):
            act += ", dynamic int8 activations in a 7-bit range"
        down = ""
        if self.bits == 8 and self.dynamic_layers and self.down_weight_only:
            down = f"; down_proj {_describe_format(8, 0)} (weight-only, bfloat16 inputs)"
        return f"layers {layers}{down}; lm_head {head}; {act} activations"


_DYNAMIC_INT8 = (
    "fbgemm quantized::linear_dynamic int8 per-channel weights, per-token dynamic int8 activations"
)


def _describe_format(bits: Bits, group_size: int) -> str:
    if bits == 4:
        return f"aten._weight_int4pack_mm_for_cpu int4 group {group_size} asymmetric"
    if bits == 8:
        return "aten._weight_int8pack_mm int8 per-channel symmetric"
    return "unquantized linear"


# --- quantization (build time) ---------------------------------------------------------------


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


def fused_float_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float weight) of every matrix this path quantizes, q/k/v and gate/up fused."""
    for index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"layers.{index}.qkv", torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        yield f"layers.{index}.o", attn.o_proj.weight
        yield f"layers.{index}.gate_up", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        yield f"layers.{index}.down", mlp.down_proj.weight
    yield "lm_head", model.lm_head.weight


def quantize_weight(weight: torch.Tensor, bits: Bits, group_size: int) -> dict[str, torch.Tensor]:
    if bits == 4:
        return quantize_int4(weight, group_size)
    if bits == 8:
        return quantize_int8(weight)
    return {"weight": weight.detach().float().contiguous()}


def quantize_model(
    model: Any, scheme: NativeScheme, progress: Callable[[str], None]
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    layers = len(model.model.layers)
    for name, weight in fused_float_weights(model):
        bits = scheme.head_bits if name == "lm_head" else scheme.bits
        for part, tensor in quantize_weight(weight, bits, scheme.group_size).items():
            tensors[f"{name}.{part}"] = tensor
        if name.endswith(".down"):
            progress(f"quantized layer {int(name.split('.')[1]) + 1}/{layers}")
    return tensors


def save_artifact(artifact_dir: Path, tensors: dict[str, torch.Tensor], scheme: NativeScheme) -> Path:
    from safetensors.torch import save_file

    path = artifact_dir / ARTIFACT_FILE
    save_file(tensors, str(path), metadata=scheme.metadata())
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
    if metadata != scheme.metadata():
        return None
    # Fresh (aligned) copies: safetensors maps the file, and a tensor at an arbitrary file offset
    # crashes aten._weight_int8pack_mm's vector loads.
    return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}


# --- modules (load time) ---------------------------------------------------------------------


class Int8WoqLinear(nn.Module):
    """y = x @ (qweight * scales).T via aten._weight_int8pack_mm, computed at `activations`
    (its fast path wants bfloat16: with float32 inputs it is ~25x slower here) and returned at
    `output` (default: the same)."""

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
        self.register_buffer("weight", qweight.contiguous())
        self.register_buffer("scales", scales.to(activations).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.activations).contiguous()
        y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features).to(self.output)


if TYPE_CHECKING:
    _PackedLinear = Any
else:  # TorchScript needs the real class to type the packed weights
    _PackedLinear = torch.classes.quantized.LinearPackedParamsBase


@functools.cache
def _per_token_linear_dynamic() -> Any:
    """fbgemm's dynamic linear with one activation scale per row (token), as a TorchScript
    function so that the row-count branch survives `torch.jit.trace`.

    fbgemm quantizes its whole input with one scale: right for one decode token, but in a
    prompt an attention-sink token (activations ~1000x the others) would crush every other
    row. Dividing each row by its own abs-max first gives every row the full int8 range;
    the output rows are multiplied back (the linear commutes with per-row scaling)."""

    def linear(x: torch.Tensor, packed: _PackedLinear, reduce_range: bool) -> torch.Tensor:
        if x.size(0) == 1:
            y: torch.Tensor = torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
            return y
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        scaled: torch.Tensor = torch.ops.quantized.linear_dynamic(x / scale, packed, reduce_range)
        return scaled * scale

    return torch.jit.script(linear)


class DynamicInt8Linear(nn.Module):
    """y = x @ (qweight * scales).T with x quantized per token to int8 at run time (fbgemm)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, reduce_range: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self.reduce_range = reduce_range
        quantized = torch._make_per_channel_quantized_tensor(
            qweight.contiguous(), scales.double(), torch.zeros_like(scales, dtype=torch.long), 0
        )
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        y: torch.Tensor = _per_token_linear_dynamic()(flat, self.packed, self.reduce_range)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (even column low) -> int32 [N, K] in 0..15."""
    low = (nibbles & 0x0F).to(torch.int32)
    high = (nibbles >> 4).to(torch.int32)
    return torch.stack([low, high], dim=-1).reshape(nibbles.shape[0], -1).contiguous()


class Int4WoqLinear(nn.Module):
    """y = x @ dequant(q).T via aten._weight_int4pack_mm_for_cpu, group-wise scales and zeros."""

    def __init__(
        self, nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, activations: torch.dtype
    ) -> None:
        super().__init__()
        self.out_features = int(nibbles.shape[0])
        self.in_features = int(nibbles.shape[1]) * 2
        self.group_size = group_size
        self.activations = activations
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles), 1)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(activations).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.activations).contiguous()
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
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


class GateUpSiluMul(nn.Module):
    """silu(x @ gate.T) * (x @ up.T) with gate and up as one matrix: one kernel call."""

    def __init__(self, linear: nn.Module, intermediate: int) -> None:
        super().__init__()
        self.linear = linear
        self.intermediate = intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.linear(x)
        return nn.functional.silu(y[..., : self.intermediate]) * y[..., self.intermediate :]


def make_linear(tensors: dict[str, torch.Tensor], name: str, bits: Bits, scheme: NativeScheme) -> nn.Module:
    if bits == 4:
        return Int4WoqLinear(
            tensors[f"{name}.qweight"],
            tensors[f"{name}.scales_and_zeros"],
            scheme.group_size,
            scheme.activations,
        )
    if bits == 8 and scheme.dynamic_layers:
        return DynamicInt8Linear(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], scheme.reduce_range)
    if bits == 8:
        return Int8WoqLinear(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], scheme.activations)
    return DenseLinear(tensors[f"{name}.weight"], scheme.activations)


# --- the model ---------------------------------------------------------------------------------


def _install_linears(model: Any, tensors: dict[str, torch.Tensor], scheme: NativeScheme) -> None:
    """Put the quantized linears into IPEX's lowered (not yet traced) decoder layers."""
    intermediate = int(model.config.intermediate_size)
    for index, layer in enumerate(model.model.layers):
        prefix = f"layers.{index}"
        concat = layer.self_attn.concat_qkv
        concat.concat_linear = make_linear(tensors, f"{prefix}.qkv", scheme.bits, scheme)
        for i in range(int(concat.num_concat)):
            if hasattr(concat, f"linear_{i}"):
                delattr(concat, f"linear_{i}")
        layer.mha_linear_add.linear = make_linear(tensors, f"{prefix}.o", scheme.bits, scheme)
        down = f"{prefix}.down"
        if scheme.bits == 8 and scheme.dynamic_layers and scheme.down_weight_only:
            layer.mlp_linear_add.linear = Int8WoqLinear(
                tensors[f"{down}.qweight"], tensors[f"{down}.scales"], torch.bfloat16, scheme.activations
            )
        else:
            layer.mlp_linear_add.linear = make_linear(tensors, down, scheme.bits, scheme)
        layer.linear_silu_mul = GateUpSiluMul(
            make_linear(tensors, f"{prefix}.gate_up", scheme.bits, scheme), intermediate
        )
    if scheme.head_bits == 8 and (scheme.head_dynamic or scheme.dynamic_layers):
        model.lm_head = DynamicInt8Linear(
            tensors["lm_head.qweight"], tensors["lm_head.scales"], scheme.reduce_range
        )
    else:
        model.lm_head = make_linear(tensors, "lm_head", scheme.head_bits, scheme)
    leftover = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if leftover:  # the kernel description would be a lie
        raise RuntimeError(f"native WOQ left float linear layers in the model: {', '.join(leftover[:5])}")


def build_native_model(model: Any, tensors: dict[str, torch.Tensor], scheme: NativeScheme) -> Any:
    """IPEX's reference + lowered decoder with our linears, traced and frozen for `generate`."""
    import intel_extension_for_pytorch  # noqa: F401  # registers IPEX's ops
    import transformers
    from intel_extension_for_pytorch.transformers import optimize as ipex_llm
    from intel_extension_for_pytorch.transformers.models.cpu.fusions.mha_fusion import _IPEXRMSNormCPU
    from intel_extension_for_pytorch.transformers.models.reference.models import output_hook

    bf16 = scheme.activations == torch.bfloat16
    with torch.no_grad():
        model = ipex_llm.model_convert_reference(model)
        # The float linears are replaced below; drop the tied lm_head now so .to() does not copy it.
        model.lm_head = nn.Identity()
        model = model.to(scheme.activations)
        for norm in (
            transformers.models.llama.modeling_llama.LlamaRMSNorm,
            transformers.models.mistral.modeling_mistral.MistralRMSNorm,
        ):
            ipex_llm.lowering_class_cpu(model, norm, _IPEXRMSNormCPU, model.config, tpp=False, woq=False)
        # is_quantization=True: no ipex.optimize (it would repack nn.Linear), no TPP, no trace yet.
        model = ipex_llm.model_convert_lowering(
            model, "cpu", scheme.activations, None, False, is_quantization=True, woq=False
        )
        _install_linears(model, tensors, scheme)
        sample_inputs = ipex_llm.get_dummy_input(model, return_dict=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            trace: Any = torch.jit.trace  # untyped in torch
            traced = trace(model, example_kwarg_inputs=sample_inputs, strict=False, check_trace=False)
            traced = torch.jit.freeze(traced)
        model = ipex_llm._set_optimized_model_for_generation(model, optimized_model=traced)
    model.register_forward_hook(output_hook, with_kwargs=True)
    return model
