"""Reading a GPTQ/AWQ-style `low_precision_checkpoint` for IPEX's weight-only recipe, and
saying what IPEX will really run from it. Its layout: tests/gptq_checkpoint.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tierserve.domain.config import ConfigError


def checkpoint_fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of the checkpoint's files: cheap enough for every start (a
    multi-GB checkpoint is not hashed), and it changes when a file is replaced."""
    path = path.expanduser()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]


def read_low_precision_checkpoint(path: Path) -> Any:
    """A state dict, or (state dict, quantization_config) when a config.json says how it was made."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted([*path.glob("*.bin"), *path.glob("*.pt")])
        config_file = path / "config.json"
    else:
        files = [path]
        config_file = path.parent / "config.json"
    if not files:
        raise ConfigError(f"low_precision_checkpoint {path}: no .safetensors, .bin or .pt files in it")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    quant_config = None
    if config_file.is_file():
        quant_config = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    return (state, quant_config) if quant_config else state


def checkpoint_width(checkpoint: Any) -> tuple[str, str]:
    """(quantization method, weight width as IPEX runs it: "INT4", "INT8", "FP8") of a checkpoint
    as `read_low_precision_checkpoint` returns it."""
    quant_config = checkpoint[1] if isinstance(checkpoint, tuple) else {}
    method = str(quant_config.get("quant_method", "gptq"))
    width = {"gptq": "INT4", "awq": "INT4", "fp8": "FP8", "int8": "INT8"}.get(
        method, f"INT{quant_config.get('bits', 8)}"
    )
    return method, width


def describe_low_precision_checkpoint(checkpoint: Any) -> str:
    """What IPEX really runs from a checkpoint (as `read_low_precision_checkpoint` returns it).

    IPEX takes the weight width and group size of every layer the checkpoint holds from the
    checkpoint, not from the qconfig (a GPTQ/AWQ checkpoint runs INT4 even in int8-woq, at its
    own group size), and leaves the layers without scales in it (the lm_head, usually) unquantized.
    Call it before `ipex.llm.optimize`, which transposes the checkpoint's scales in place.
    """
    state, quant_config = checkpoint if isinstance(checkpoint, tuple) else (checkpoint, {})
    method, width = checkpoint_width(checkpoint)
    group = quant_config.get("group_size")
    if group is None and method in ("gptq", "awq"):
        # IPEX's rule: input channels (GPTQ packs 8 per int32 row, AWQ stores them unpacked)
        # over scale rows.
        scales = next((key for key in state if key.endswith(".scales")), None)
        qweight = state.get(scales.removesuffix(".scales") + ".qweight") if scales else None
        if scales and qweight is not None and state[scales].shape[0] > 1:
            rows = qweight.shape[0] * (8 if method == "gptq" else 1)
            group = rows // state[scales].shape[0]
    grouping = "" if group is None else (" per-channel" if int(group) <= 0 else f" group {group}")
    head_quantized = any(key.startswith("lm_head.") and "scale" in key for key in state)
    unquantized = "" if head_quantized else ", lm_head unquantized"
    return f"low_precision_checkpoint {method} {width}{grouping}{unquantized}"
