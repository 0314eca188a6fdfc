"""Tier bf16: bfloat16 weights and activations.

Two kernel paths, chosen by `kernel_path()`:

- "ipex": `ipex.llm.optimize` at bfloat16 under CPU autocast (TorchScript graph, oneDNN-prepacked
  weights). IPEX prepacks bf16 weights only on CPUs with AVX512 BW/VL/DQ or AVX-NE-CONVERT; taken
  when `kernel = "ipex"`, or `kernel = "auto"` on such a CPU.
- "native": PyTorch's own bf16 kernels on the transformers model (weights stored at bfloat16),
  for CPUs where IPEX cannot prepack bf16 (AVX2-only CPUs). Same numbers, slower kernels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tierserve.worker.tiers.base import LoadedModel, Tier, register_tier
from tierserve.worker.tiers.ipex_common import bf16_autocast, cpu_capability, ipex_optimize, load_hf_model


@register_tier
class Bf16Tier(Tier):
    name = "bf16"
    recipe_fields = ("kernel",)

    def kernel_path(self) -> str:
        kernel = self.recipe.kernel
        if kernel == "ipex" or (kernel == "auto" and self.context.isa.ipex_bf16):
            return "ipex"
        return "native"

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        if self.kernel_path() == "ipex":
            loaded = ipex_optimize(model_dir, torch.bfloat16)
            loaded.run_context = bf16_autocast
            return loaded
        return native_bf16(model_dir)


def native_bf16(model_dir: Path) -> LoadedModel:
    model, tokenizer = load_hf_model(model_dir)
    model = model.to(torch.bfloat16)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        backend=f"torch {torch.__version__}",
        kernel=(
            "transformers eager, bf16 weights (native: IPEX cannot prepack bf16 without AVX512 BW/VL/DQ), "
            f"CPU ISA {cpu_capability()}"
        ),
        dtype=torch.bfloat16,
        context_tokens=int(model.config.max_position_embeddings),
    )
