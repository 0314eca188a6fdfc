"""A tiny random Llama model with the default model's real tokenizer, for fast engine tests.

The weights are random (seeded), so generated text is gibberish; what matters is that
it loads through the same tier recipes (IPEX dispatches on `architectures`) and that
token ids and text go through the real tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tierserve.domain.config import ModelConfig
from tierserve.ops.modelprep import prepare_model

TINY_CONTEXT_TOKENS = 128
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def default_model_dir() -> Path:
    """The prepared default model folder (converted once, then cached)."""
    return prepare_model(ModelConfig())


def copy_tokenizer(source: Path, target: Path) -> None:
    copied = 0
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied += 1
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {source}")


# Families of decoder models the batched engine is checked on, by `architectures` name.
FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
    "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
    "MistralForCausalLM": (MistralConfig, MistralForCausalLM),
}


def build_tiny_model_dir(
    path: Path, tokenizer_dir: Path | None = None, architecture: str = "LlamaForCausalLM"
) -> Path:
    """Write a tiny random model of `architecture` (Llama by default) plus the default model's
    tokenizer into `path`."""
    from transformers import AutoTokenizer

    source = tokenizer_dir or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    config_class, model_class = FAMILIES[architecture]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Wider than the 0.02 default, so greedy text varies instead of repeating one token.
        initializer_range=0.3,
        architectures=[architecture],
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    copy_tokenizer(source, path)
    return path
