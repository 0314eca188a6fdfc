"""int8-sq with dynamic activation scales: SmoothQuant smoothing, then fbgemm's dynamic int8
linears (weights int8 per output channel, activations quantized per token at run time) inside
IPEX's traced decoder graph (`tierserve.worker.kernels.native_model`).

`build` calibrates on the texts (per-channel activation maxima), folds the factors exactly
into the float model (`tierserve.worker.kernels.smoothing`: RMSNorm weights, v_proj and
up_proj rows) and stores them with the int8 weights of the smoothed model; `load` folds the
stored factors into a fresh float model and packs the weights for fbgemm.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tierserve.domain.config import ConfigError
from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import packed_weights, smoothing
from tierserve.worker.kernels.ipex_internals import SUPPORTED_ARCHITECTURES, require_supported_ipex
from tierserve.worker.kernels.native_model import build_native_model
from tierserve.worker.kernels.scheme import NativeScheme
from tierserve.worker.tiers.base import KernelPath, LoadedModel, Progress, cpu_capability
from tierserve.worker.tiers.loading import load_hf_model

if TYPE_CHECKING:
    from tierserve.worker.tiers.int8_sq import Int8SqTier

log = logging.getLogger(__name__)

# Bumped when the smoothing or the stored layout changes, so cached artifacts rebuild.
FORMAT = f"smoothing 1, weights {packed_weights.ARTIFACT_FORMAT}, down_proj weight-only 1"
# fp32 between the int8 matmuls: RMSNorm, RoPE, attention and residuals are a small share of
# the time at this size, and fp32 keeps the sink token's huge residual exact.
ACTIVATIONS = torch.float32


def scheme(isa: CpuIsa) -> NativeScheme:
    """The layout on `isa`. Without VNNI fbgemm sums u8 x s8 products in int16: 7-bit weights
    there. With AMX and AVX512_FP16 down_proj runs on IPEX's weight-only kernel, and with bf16
    kernels the batch's KV cache is kept in bfloat16 (attention's reads halved)."""
    return NativeScheme(
        bits=8,
        group_size=0,
        head_bits=8,
        activations=ACTIVATIONS,
        dynamic_layers=True,
        int16_sums=not isa.avx512_vnni,
        down_weight_only=True,
        down_on_ipex=isa.ipex_woq_fast,
        kv_cache_bf16=isa.ipex_bf16,
    )


class DynamicSmoothQuant(KernelPath):
    name: ClassVar[str] = "native"

    def __init__(self, tier: Int8SqTier) -> None:
        self.tier = tier

    def key(self) -> dict[str, Any]:
        # The layout differs with the CPU (7-bit weights without VNNI), and so does the card.
        return {"dynamic_format": FORMAT, "layout": self.layout().describe()}

    def check(self, model_config: Any) -> None:
        if model_config is not None:
            _check_architecture(model_config, self.tier.name)
        require_supported_ipex()

    def layout(self) -> NativeScheme:
        return scheme(self.tier.context.isa)

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
        tier = self.tier
        model, tokenizer = load_hf_model(model_dir)
        _check_architecture(model.config, tier.name)
        limit = tier.calibration_max_tokens(model.config)
        batches = [
            tokenizer(text, return_tensors="pt")["input_ids"][:, :limit] for text in tier.calibration_texts()
        ]
        progress(f"calibrating on {len(batches)} texts")
        ranges = smoothing.activation_ranges(model, batches)
        layout = self.layout()
        # A weight-only down_proj has no int8 input to smooth.
        factors = smoothing.smoothing_factors(
            model, ranges, tier.recipe.alpha, smooth_down=not layout.down_weight_only
        )
        smoothing.save_factors(artifact_dir, factors, tier.recipe.alpha)
        smoothing.apply_smoothing(model, factors)
        progress(f"quantizing: {layout.describe()}")
        packed_weights.save_artifact(
            artifact_dir, packed_weights.quantize_model(model, layout, progress), layout
        )

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        import intel_extension_for_pytorch as ipex

        tier = self.tier
        factors = smoothing.load_factors(artifact_dir)
        if factors is None:
            raise FileNotFoundError(f"int8-sq artifact has no {smoothing.FACTORS_FILE}: {artifact_dir}")
        model, tokenizer = load_hf_model(model_dir)
        _check_architecture(model.config, tier.name)
        context_tokens = int(model.config.max_position_embeddings)
        smoothing.apply_smoothing(model, factors)
        layout = self.layout()
        tensors = packed_weights.read_artifact(artifact_dir, layout)
        if tensors is None:
            log.warning("int8-sq: no quantized weights in %s; quantizing now", artifact_dir)
            tensors = packed_weights.quantize_model(model, layout, lambda message: None)
        model = build_native_model(model, tensors, layout)
        kernel = (
            f"SmoothQuant (alpha={tier.recipe.alpha:g}) smoothing folded into the weights, then "
            f"{layout.describe()}; in IPEX's TorchScript decoder graph (RoPE, attention, RMSNorm); "
            f"CPU ISA {cpu_capability()}"
        )
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            backend=f"torch {torch.__version__} fbgemm + ipex {ipex.__version__} graph",
            kernel=kernel,
            dtype=torch.int8,
            context_tokens=context_tokens,
        )


def _check_architecture(model_config: Any, tier: str) -> None:
    architecture = (getattr(model_config, "architectures", None) or [type(model_config).__name__])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{tier}: dynamic activation scales support {', '.join(SUPPORTED_ARCHITECTURES)}, "
            f'not {architecture}; set activation_scales = "static"'
        )
    if getattr(model_config, "attention_bias", False) or getattr(model_config, "mlp_bias", False):
        raise ConfigError(f'{tier}: dynamic activation scales need linear layers without bias; use "static"')
