"""int8-sq with dynamic activation scales: SmoothQuant smoothing, then every linear layer as
fbgemm's dynamic int8 linear (weights int8 per output channel, activations quantized per token
at run time), inside IPEX's traced decoder graph (`tierserve.worker.tiers.native_woq`).

The artifact holds the smoothing factors (`tierserve.worker.tiers.smoothing`) and the quantized weights
of the smoothed model; `load` folds the factors into a fresh float model (norm weights, v_proj
and up_proj rows, which stay float or are replaced) and packs the weights for fbgemm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tierserve.domain.config import ConfigError
from tierserve.worker.tiers import native_woq, smoothing
from tierserve.worker.tiers.base import LoadedModel, Progress
from tierserve.worker.tiers.ipex_common import cpu_capability, load_hf_model

log = logging.getLogger(__name__)

# Bumped when the smoothing or the stored layout changes, so cached artifacts rebuild.
FORMAT = f"smoothing 1, weights {native_woq.ARTIFACT_FORMAT}, down_proj weight-only 1"
# fp32 between the int8 matmuls: RMSNorm, RoPE, attention and residuals are a small share of
# the time at this size, and fp32 keeps the sink token's huge residual exact.
ACTIVATIONS = torch.float32


def scheme(reduce_range: bool) -> native_woq.NativeScheme:
    return native_woq.NativeScheme(
        bits=8,
        group_size=0,
        head_bits=8,
        activations=ACTIVATIONS,
        dynamic_layers=True,
        reduce_range=reduce_range,
        down_weight_only=True,
    )


def check(model_config: Any, tier: str) -> None:
    architecture = (getattr(model_config, "architectures", None) or [type(model_config).__name__])[0]
    if architecture not in native_woq.SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{tier}: dynamic activation scales support {', '.join(native_woq.SUPPORTED_ARCHITECTURES)}, "
            f'not {architecture}; set activation_scales = "static"'
        )
    if getattr(model_config, "attention_bias", False) or getattr(model_config, "mlp_bias", False):
        raise ConfigError(f'{tier}: dynamic activation scales need linear layers without bias; use "static"')


def build(
    model_dir: Path,
    artifact_dir: Path,
    texts: Sequence[str],
    max_tokens: int,
    alpha: float,
    reduce_range: bool,
    progress: Progress,
) -> None:
    model, tokenizer = load_hf_model(model_dir)
    check(model.config, "int8-sq")
    limit = min(max_tokens, int(model.config.max_position_embeddings))
    batches = [tokenizer(text, return_tensors="pt")["input_ids"][:, :limit] for text in texts]
    progress(f"calibrating on {len(batches)} texts")
    ranges = smoothing.activation_ranges(model, batches)
    layout = scheme(reduce_range)
    # A weight-only down_proj has no int8 input to smooth.
    factors = smoothing.smoothing_factors(model, ranges, alpha, smooth_down=not layout.down_weight_only)
    smoothing.save_factors(artifact_dir, factors, alpha)
    smoothing.apply_smoothing(model, factors)
    progress(f"quantizing: {layout.describe()}")
    native_woq.save_artifact(artifact_dir, native_woq.quantize_model(model, layout, progress), layout)


def load(model_dir: Path, artifact_dir: Path, alpha: float, reduce_range: bool) -> LoadedModel:
    import intel_extension_for_pytorch as ipex

    factors = smoothing.load_factors(artifact_dir)
    if factors is None:
        raise FileNotFoundError(f"int8-sq artifact has no {smoothing.FACTORS_FILE}: {artifact_dir}")
    model, tokenizer = load_hf_model(model_dir)
    check(model.config, "int8-sq")
    context_tokens = int(model.config.max_position_embeddings)
    smoothing.apply_smoothing(model, factors)
    layout = scheme(reduce_range)
    tensors = native_woq.read_artifact(artifact_dir, layout)
    if tensors is None:
        log.warning("int8-sq: no quantized weights in %s; quantizing now", artifact_dir)
        tensors = native_woq.quantize_model(model, layout, lambda message: None)
    model = native_woq.build_native_model(model, tensors, layout)
    kernel = (
        f"SmoothQuant (alpha={alpha:g}) smoothing folded into the weights, then {layout.describe()}; "
        f"in IPEX's TorchScript decoder graph (RoPE, attention, RMSNorm); CPU ISA {cpu_capability()}"
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        backend=f"torch {torch.__version__} fbgemm + ipex {ipex.__version__} graph",
        kernel=kernel,
        dtype=torch.int8,
        context_tokens=context_tokens,
    )
