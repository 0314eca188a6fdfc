"""The unquantized native paths (bf16 and fp32): IPEX's decoder graph with every linear, lm_head
included, on tierserve's dense kernel for the activation dtype (`kernels/linears.dense_linear`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tierserve.worker.kernels import linears, packed_weights
from tierserve.worker.kernels.native_model import build_native_model, native_decoder_refusal
from tierserve.worker.kernels.scheme import NativeScheme
from tierserve.worker.tiers.base import LoadedModel, cpu_capability
from tierserve.worker.tiers.loading import load_hf_model


def dense_scheme(activations: torch.dtype) -> NativeScheme:
    """Every matrix unquantized (16 bits means the activation dtype) at `activations`."""
    return NativeScheme(bits=16, group_size=0, head_bits=16, activations=activations)


def dense_refusal(model_dir: Path, kernel: Any | None, kernel_name: str) -> str | None:
    """Why the native path cannot run the model in `model_dir` here (a phrase that follows "the
    native path"), or None. Decided from the config alone, so a fallback loads the model once."""
    from transformers import AutoConfig

    refusal = native_decoder_refusal(AutoConfig.from_pretrained(model_dir))
    if refusal is None and kernel is None:
        refusal = f"needs {kernel_name}, which is not built"
    return refusal


def load_native_dense(
    model_dir: Path,
    activations: torch.dtype,
    run_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> LoadedModel:
    """The model in `model_dir` lowered into IPEX's decoder with dense linears at `activations`."""
    import intel_extension_for_pytorch as ipex

    model, tokenizer = load_hf_model(model_dir)
    context_tokens = int(model.config.max_position_embeddings)
    scheme = dense_scheme(activations)
    tensors = {
        f"{name}.weight": weight.to(activations) for name, weight in packed_weights.fused_float_weights(model)
    }
    model = build_native_model(model, tensors, scheme)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        backend=f"torch {torch.__version__} native kernels + ipex {ipex.__version__} graph",
        kernel=(
            f"native: {scheme.describe()}; in IPEX's TorchScript decoder graph (RoPE, attention, "
            f"RMSNorm); CPU ISA {cpu_capability()}"
        ),
        dtype=activations,
        context_tokens=context_tokens,
        run_context=run_context,
        rows_independent=not any(isinstance(module, linears.DenseLinear) for module in model.modules()),
    )
