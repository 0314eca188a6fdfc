"""Loading the float Hugging Face model every tier starts from: one way, everywhere (no IPEX).

Also meant for the accuracy reference and the benchmarks' transformers baseline, so that
they score and time exactly the model the tiers start from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_float_model(model_dir: Path) -> Any:
    """The causal LM in `model_dir` at float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if not model.config.architectures:
        # ipex.llm.optimize dispatches on architectures[0].
        model.config.architectures = [type(model).__name__]
    return model


def load_hf_model(model_dir: Path) -> tuple[Any, Any]:
    """(float32 model in eval mode, tokenizer) from `model_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return load_float_model(model_dir), tokenizer
