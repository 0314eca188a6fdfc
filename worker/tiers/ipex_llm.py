"""Loading a Hugging Face causal LM and optimising it with ipex.llm.optimize."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from tierserve.worker.tiers.base import LoadedModel


def load_hf_model(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if not model.config.architectures:
        # ipex.llm.optimize dispatches on architectures[0].
        model.config.architectures = [type(model).__name__]
    return model, tokenizer


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to here (e.g. AVX512)."""
    return str(torch.backends.cpu.get_cpu_capability())


def graph_mode(optimized: Any) -> str:
    """Whether IPEX's deployment mode really traced the model, in words for the kernel string."""
    traced = getattr(optimized, "trace_graph", None) is not None
    return "TorchScript graph" if traced else "eager (tracing fell back)"


def bf16_autocast() -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def ipex_optimize(model_dir: Path, dtype: torch.dtype) -> LoadedModel:
    """Apply the IPEX LLM recipe at `dtype`, with TorchScript tracing (deployment mode)."""
    import intel_extension_for_pytorch as ipex

    model, tokenizer = load_hf_model(model_dir)
    context_tokens = int(model.config.max_position_embeddings)
    with torch.inference_mode():
        optimized = ipex.llm.optimize(model, dtype=dtype, inplace=True, deployment_mode=True)
    dtype_name = str(dtype).removeprefix("torch.")
    kernel = f"ipex.llm.optimize dtype={dtype_name}, {graph_mode(optimized)}, CPU ISA {cpu_capability()}"
    return LoadedModel(
        model=optimized,
        tokenizer=tokenizer,
        backend=f"ipex {ipex.__version__}",
        kernel=kernel,
        dtype=dtype,
        context_tokens=context_tokens,
    )
