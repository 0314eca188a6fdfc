"""IPEX's public LLM recipe: `ipex.llm.optimize` on the float model, in deployment mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tierserve.worker.kernels.ipex_internals import graph_mode
from tierserve.worker.tiers.base import LoadedModel, cpu_capability
from tierserve.worker.tiers.loading import load_hf_model


def ipex_optimize(
    model_dir: Path, dtype: torch.dtype, weights_rounded_to: torch.dtype | None = None
) -> LoadedModel:
    """Apply the IPEX LLM recipe at `dtype`, with TorchScript tracing (deployment mode). With
    `weights_rounded_to`, every weight is first rounded to that dtype (and kept at `dtype`)."""
    import intel_extension_for_pytorch as ipex

    model, tokenizer = load_hf_model(model_dir)
    context_tokens = int(model.config.max_position_embeddings)
    if dtype == torch.float32:
        _own_lm_head(model)
    if weights_rounded_to is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.to(weights_rounded_to).to(parameter.dtype))
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


def _own_lm_head(model: Any) -> None:
    """Give an lm_head tied to the input embedding a copy of its own. IPEX prepacks no weight an
    embedding shares, so a tied head ran as aten::mm, which on a Zen 4 core took 21-32 ms for 2 or
    3 rows against 6-8 ms on oneDNN (docs/benchmarks/fp32-kernel-*). Costs the head's size again."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embedding is not None and head.weight is embedding.weight:
        model.config.tie_word_embeddings = False  # so nothing ties them again
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
