"""Every use of IPEX's private API, behind one version guard.

The native kernel paths run PyTorch's own quantized linears inside IPEX's lowered decoder
(fused RoPE, attention with its own KV cache, RMSNorm), SmoothQuant calibration feeds IPEX's
example inputs, and int4-woq's IPEX path replaces the weight-only linears IPEX quantized with
its own before tracing. None of that is public API: the functions that build the decoder, the
attributes that hold its linears and the layout of its example inputs change between IPEX
releases. This module was written against IPEX 2.8; on any other version its functions raise
`UnsupportedIpexVersion` before touching anything. The public recipe (`ipex.llm.optimize`,
`ipex.quantization.*`) stays in the tiers and needs no guard.

Importing this module does not import IPEX; the first call does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from tierserve.domain.errors import StartupError

SUPPORTED_SERIES = "2.8."
# Architectures whose lowered IPEX decoder layer has the fused q/k/v, o, gate/up and down
# linear slots `install_linears` fills (and no biases on them).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Named in the version error, so an operator knows what would have to be ported.
INTERNALS_USED = (
    "intel_extension_for_pytorch.transformers.optimize: model_convert_reference, lowering_class_cpu, "
    "model_convert_lowering, get_dummy_input, _set_optimized_model_for_generation; _IPEXRMSNormCPU; "
    "output_hook; the lowered decoder layers' linear slots; "
    "intel_extension_for_pytorch.nn.modules.WeightOnlyQuantizedLinear"
)


class UnsupportedIpexVersion(StartupError):
    """The installed IPEX is not the series whose internals this module was written against."""


def check_ipex_version(version: str, needed_by: str = "native kernel path") -> None:
    if not version.startswith(SUPPORTED_SERIES):
        raise UnsupportedIpexVersion(
            f"tierserve's {needed_by} relies on IPEX {SUPPORTED_SERIES.rstrip('.')} internals "
            f"({INTERNALS_USED}); found IPEX {version}. Install intel-extension-for-pytorch "
            f"{SUPPORTED_SERIES}x, or choose a recipe on IPEX's public API"
        )


def require_supported_ipex(needed_by: str = "native kernel path") -> None:
    """Raise `UnsupportedIpexVersion` unless the installed IPEX is the supported series."""
    import intel_extension_for_pytorch as ipex

    check_ipex_version(str(ipex.__version__), needed_by)


def graph_mode(optimized: Any) -> str:
    """Whether `ipex.llm.optimize`'s deployment mode really traced the model, in words for the
    kernel string (read from IPEX's private `trace_graph` attribute; not claimed on other versions)."""
    import intel_extension_for_pytorch as ipex

    version = str(ipex.__version__)
    if not version.startswith(SUPPORTED_SERIES):
        return f"deployment mode (graph not checked on IPEX {version})"
    traced = getattr(optimized, "trace_graph", None) is not None
    return "TorchScript graph" if traced else "eager (tracing fell back)"


# --- SmoothQuant calibration --------------------------------------------------------------------

# Positions of input ids, attention mask and position ids in IPEX's example inputs for a
# decoder-only model: (ids, mask, past_key_values, position_ids).
_IDS, _MASK, _POSITIONS = 0, 1, 3
_EXAMPLE_LENGTH = 4


def calibration_example(model: Any) -> tuple[Any, ...]:
    """IPEX's example inputs of a model prepared by `ipex.llm.optimize` (what `prepare` traces with)."""
    require_supported_ipex("SmoothQuant calibration")
    from intel_extension_for_pytorch.transformers.optimize import get_dummy_input

    example: tuple[Any, ...] = get_dummy_input(model)
    if len(example) != _EXAMPLE_LENGTH:
        raise RuntimeError(
            f"int8-sq expects IPEX example inputs (ids, mask, past_key_values, position_ids) for "
            f"{model.config.architectures[0]}; got {len(example)} inputs"
        )
    return example


def with_tokens(example: Sequence[Any], ids: torch.Tensor) -> list[Any]:
    """`example` (from `calibration_example`) with the token ids [1, T] of a calibration text."""
    inputs = list(example)
    inputs[_IDS] = ids
    inputs[_MASK] = torch.ones_like(ids)
    inputs[_POSITIONS] = torch.arange(ids.shape[1]).unsqueeze(0)
    return inputs


# --- the native paths' decoder graph --------------------------------------------------------------


@dataclass(frozen=True)
class LayerLinears:
    """The modules one lowered decoder layer runs in place of IPEX's linears."""

    qkv: nn.Module  # q, k and v as one matrix
    o: nn.Module
    gate_up_silu_mul: nn.Module  # silu(gate) * up, from one fused matrix
    down: nn.Module


def lowered_decoder(model: Any, activations: torch.dtype) -> Any:
    """IPEX's reference and lowered decoder (fused RoPE, attention, RMSNorm) of a float
    Llama/Mistral model, at `activations`, with IPEX's own linears still in place and nothing
    traced. The lm_head is dropped: the caller installs its own with `install_linears`.
    Call under `torch.no_grad()`."""
    require_supported_ipex()
    import transformers
    from intel_extension_for_pytorch.transformers import optimize as ipex_llm
    from intel_extension_for_pytorch.transformers.models.cpu.fusions.mha_fusion import _IPEXRMSNormCPU

    model = ipex_llm.model_convert_reference(model)
    # Dropped now so the .to() below does not copy the tied float head.
    model.lm_head = nn.Identity()
    model = model.to(activations)
    for norm in (
        transformers.models.llama.modeling_llama.LlamaRMSNorm,
        transformers.models.mistral.modeling_mistral.MistralRMSNorm,
    ):
        ipex_llm.lowering_class_cpu(model, norm, _IPEXRMSNormCPU, model.config, tpp=False, woq=False)
    # is_quantization=True: no ipex.optimize (it would repack nn.Linear), no TPP, no trace yet.
    return ipex_llm.model_convert_lowering(
        model,
        device="cpu",
        dtype=activations,
        sample_inputs=None,
        deployment_mode=False,
        is_quantization=True,
        woq=False,
    )


def install_linears(
    model: Any, layer_linears: Callable[[int], LayerLinears], lm_head: Callable[[], nn.Module]
) -> None:
    """Put our linears into a `lowered_decoder`: `layer_linears(i)` for decoder layer i, then
    `lm_head()`. Built one layer at a time, so each layer's float linears are freed as it goes."""
    require_supported_ipex()
    for index, layer in enumerate(model.model.layers):
        linears = layer_linears(index)
        concat = layer.self_attn.concat_qkv
        concat.concat_linear = linears.qkv
        for i in range(int(concat.num_concat)):
            if hasattr(concat, f"linear_{i}"):
                delattr(concat, f"linear_{i}")
        layer.mha_linear_add.linear = linears.o
        layer.mlp_linear_add.linear = linears.down
        layer.linear_silu_mul = linears.gate_up_silu_mul
    model.lm_head = lm_head()


def trace_for_generation(model: Any, bf16_autocast: bool) -> Any:
    """Trace and freeze a `lowered_decoder` on IPEX's example inputs and hand the graph to the
    `generate` IPEX installed. Call under `torch.no_grad()`."""
    require_supported_ipex()
    from intel_extension_for_pytorch.transformers import optimize as ipex_llm
    from intel_extension_for_pytorch.transformers.models.reference.models import output_hook

    traced = _trace_and_freeze(model, bf16_autocast)
    model = ipex_llm._set_optimized_model_for_generation(model, optimized_model=traced)
    # IPEX's reference models return tuples; this hook turns them back into transformers outputs.
    model.register_forward_hook(output_hook, with_kwargs=True)
    return model


def _trace_and_freeze(model: Any, bf16_autocast: bool) -> Any:
    """A lowered model traced on IPEX's example inputs and frozen, as IPEX's deployment mode does."""
    from intel_extension_for_pytorch.transformers import optimize as ipex_llm

    sample_inputs = ipex_llm.get_dummy_input(model, return_dict=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
        trace: Any = torch.jit.trace  # untyped in torch
        traced = trace(model, example_kwarg_inputs=sample_inputs, strict=False, check_trace=False)
        return torch.jit.freeze(traced)


# --- int4-woq's IPEX path: IPEX's weight-only linears with weights of our own ----------------------

# Where `ipex.llm.optimize` puts a Llama/Mistral decoder layer's weight-only linears (under
# model.layers.<i>), and which float weights each holds (q, k and v concatenated).
_WOQ_LAYER_SLOTS = {
    "self_attn.concat_qkv.concat_linear": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mha_linear_add.linear": ("self_attn.o_proj",),
    "linear_silu_mul.linear_s": ("mlp.gate_proj",),
    "linear_silu_mul.linear_m": ("mlp.up_proj",),
    "mlp_linear_add.linear": ("mlp.down_proj",),
}


def woq_slots_known(model_config: Any) -> bool:
    """Whether `woq_layer_weights` and `replace_woq_linears` know the layout IPEX lowers this
    model into: a supported architecture without biases on the linears, on the IPEX series this
    module was written against. Other models and versions keep IPEX's own quantized weights."""
    import intel_extension_for_pytorch as ipex

    architecture = (getattr(model_config, "architectures", None) or [""])[0]
    biases = getattr(model_config, "attention_bias", False) or getattr(model_config, "mlp_bias", False)
    return (
        str(ipex.__version__).startswith(SUPPORTED_SERIES)
        and architecture in SUPPORTED_ARCHITECTURES
        and not biases
    )


def woq_layer_weights(model: Any) -> dict[str, torch.Tensor]:
    """The float weights of a Llama/Mistral model by the path of the weight-only linear
    `ipex.llm.optimize` lowers each into (the lm_head not included). Read them before
    `ipex.llm.optimize`, which drops the float weights."""
    require_supported_ipex("int4-woq's IPEX path")
    weights = {}
    for index, layer in enumerate(model.model.layers):
        for slot, sources in _WOQ_LAYER_SLOTS.items():
            parts = [layer.get_submodule(source).weight.detach() for source in sources]
            weights[f"model.layers.{index}.{slot}"] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return weights


def woq_qconfig(bits: int, lowp_mode: str, group_size: int) -> Any:
    """IPEX's weight-only qconfig mapping (group_size -1: one group per output channel)."""
    from intel_extension_for_pytorch.quantization import (
        WoqLowpMode,
        WoqWeightDtype,
        get_weight_only_quant_qconfig_mapping,
    )

    # IPEX's NONE: compute at the activation dtype, which is fp32 for lowp FP32.
    lowp_modes = {"BF16": WoqLowpMode.BF16, "FP32": WoqLowpMode.NONE, "INT8": WoqLowpMode.INT8}
    return get_weight_only_quant_qconfig_mapping(
        weight_dtype=WoqWeightDtype.INT4 if bits == 4 else WoqWeightDtype.INT8,
        lowp_mode=lowp_modes[lowp_mode],
        group_size=group_size,
    )


def _linear_shell(out_features: int, in_features: int, qconfig: Any) -> nn.Linear:
    """A weightless nn.Linear carrying a weight-only qconfig: what IPEX's constructors read."""
    shell = nn.Linear(in_features, out_features, bias=False, device="meta")
    shell.qconfig = qconfig
    return shell


def int4_woq_linear(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    in_features: int,
    group_size: int,
    qconfig: Any,
) -> nn.Module:
    """IPEX's int4 weight-only linear with the given weights: two levels per byte (even input
    channel in the low nibble) [N, ceil(K / 2)], scales and float zero points [N, groups];
    weight = (level - zero_point) * scale. group_size -1: one group per output channel. Its
    lowp mode comes from `qconfig` (an `ipex.quantization` weight-only qconfig)."""
    require_supported_ipex("int4-woq's IPEX path")
    from intel_extension_for_pytorch.nn.modules import WeightOnlyQuantizedLinear
    from intel_extension_for_pytorch.quantization import WoqWeightDtype

    linear: nn.Module = WeightOnlyQuantizedLinear.from_float_and_qweight(
        mod=_linear_shell(scales.shape[0], in_features, qconfig),
        qweight=qweight,
        dtype=WoqWeightDtype.INT4,
        scales=scales,
        zero_points=zero_points,
        group_size=group_size,
    )
    return linear


def int8_woq_linear(qweight: torch.Tensor, scales: torch.Tensor, qconfig: Any) -> nn.Module:
    """IPEX's int8 weight-only linear with the given weights: int8 levels [N, K] and one float
    scale per output channel [N]; weight = level * scale. Its lowp mode comes from `qconfig`."""
    require_supported_ipex("IPEX's weight-only int8 linear")
    from intel_extension_for_pytorch.nn.modules import WeightOnlyQuantizedLinear
    from intel_extension_for_pytorch.quantization import WoqWeightDtype

    out_features, in_features = (int(n) for n in qweight.shape)
    linear: nn.Module = WeightOnlyQuantizedLinear.from_float_and_qweight(
        mod=_linear_shell(out_features, in_features, qconfig),
        qweight=qweight.contiguous(),
        dtype=WoqWeightDtype.INT8,
        scales=scales.float(),
        zero_points=None,
        group_size=-1,
    )
    return linear


def woq_linear_from_float(weight: torch.Tensor, qconfig: Any) -> nn.Module:
    """IPEX's weight-only linear of a float weight [N, K], quantized by IPEX itself as `qconfig`
    says (what `ipex.llm.optimize` does to each linear)."""
    require_supported_ipex("int4-woq's IPEX path")
    from intel_extension_for_pytorch.nn.modules import WeightOnlyQuantizedLinear

    out_features, in_features = weight.shape
    shell = _linear_shell(out_features, in_features, qconfig)
    shell.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
    linear: nn.Module = WeightOnlyQuantizedLinear.from_float(mod=shell)
    return linear


def replace_woq_linears(model: Any, layers: dict[str, nn.Module], lm_head: nn.Module) -> None:
    """Put our weight-only linears into a model `ipex.llm.optimize(deployment_mode=False)` lowered
    (not traced yet): `layers` by the paths of `woq_layer_weights`, and the lm_head. IPEX's fused
    ops (linear+add, silu*mul) read each module's packed weights when they run. Every weight-only
    linear IPEX made must be replaced, or the model would run some of IPEX's own weights."""
    require_supported_ipex("int4-woq's IPEX path")
    from intel_extension_for_pytorch.nn.modules import WeightOnlyQuantizedLinear

    for path, module in {**layers, "lm_head": lm_head}.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if not isinstance(getattr(parent, name, None), WeightOnlyQuantizedLinear):
            raise RuntimeError(f"IPEX's lowered model has no weight-only linear at {path}")
        setattr(parent, name, module)
    ours = {id(module) for module in (*layers.values(), lm_head)}
    left = [
        name
        for name, module in model.named_modules()
        if isinstance(module, WeightOnlyQuantizedLinear) and id(module) not in ours
    ]
    if left:
        raise RuntimeError(f"IPEX weight-only linears not replaced: {', '.join(left[:5])}")


def trace_optimized_for_generation(model: Any, bf16_autocast: bool) -> Any:
    """What `ipex.llm.optimize(deployment_mode=True)` does after lowering, for a model it lowered
    with deployment_mode=False: trace and freeze on IPEX's example inputs, and hand the graph to
    `generate`. Call under `torch.no_grad()` or inference mode."""
    require_supported_ipex("int4-woq's IPEX path")
    from intel_extension_for_pytorch.transformers import optimize as ipex_llm

    # ipex.llm.optimize has registered its output hook already; traced with return_dict on,
    # the graph would return a ModelOutput instead of IPEX's tuple.
    return_dict = model.config.return_dict
    model.config.return_dict = False
    try:
        traced = _trace_and_freeze(model, bf16_autocast)
    finally:
        model.config.return_dict = return_dict
    return ipex_llm._set_optimized_model_for_generation(model, optimized_model=traced)


# --- Chunked prefill ----------------------------------------------------------------------------


# The op IPEX 2.8's decoder graphs (every tier's) call for attention over their KV cache, and
# its arguments: (query, key, value, key_cache, value_cache, beam_idx, seq_info, scale_attn,
# max_positions, head_mask, attention_mask, add_casual_mask) -> (attn_output [batch, heads,
# new, head_dim], attn_weights, key_cache, value_cache, beam_idx).
ATTENTION_OP = "masked_multihead_self_attention"


@contextmanager
def attention_op_replaced(kernel: Callable[..., Any]) -> Iterator[None]:
    """IPEX's attention op runs `kernel` instead, for every caller, until the block ends; then
    IPEX's own kernel is back (the dispatcher keeps it under the replacement)."""
    require_supported_ipex("paged attention")
    import intel_extension_for_pytorch  # noqa: F401  (registers the op being replaced)

    library: Any = torch.library.Library  # untyped in torch
    registration = library("torch_ipex", "IMPL")
    try:
        registration.impl(ATTENTION_OP, kernel, "CPU")
        yield
    finally:
        registration._destroy()  # removes only this registration


class PagedAttentionOps(NamedTuple):
    """IPEX's paged-attention ops, as `intel_extension_for_pytorch.llm.modules.PagedAttention`
    calls them on CPU (called directly: its per-call device dispatch costs more than the op
    itself at a decode step's size).

    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping int32, "auto", 1.0, 1.0);
    single_query_cached_kv_attention(out, query, key_cache, value_cache, head_mapping, scale,
    block_tables, context_lens, block_size, max_context_len, alibi_slopes, window_size, 1.0,
    1.0, softcap)."""

    reshape_and_cache: Callable[..., Any]
    single_query_cached_kv_attention: Callable[..., Any]


def paged_attention_ops() -> PagedAttentionOps:
    require_supported_ipex("paged attention")
    import intel_extension_for_pytorch  # noqa: F401  (registers the ops)

    ops = torch.ops.torch_ipex
    return PagedAttentionOps(ops.reshape_and_cache, ops.single_query_cached_kv_attention)
