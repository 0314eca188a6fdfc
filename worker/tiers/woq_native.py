"""The weight-only tiers on the native path: PyTorch's weight-only kernels in IPEX's decoder graph."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tierserve.domain.config import ConfigError
from tierserve.worker.kernels import packed_weights
from tierserve.worker.kernels.ipex_internals import require_supported_ipex
from tierserve.worker.kernels.linears import INT4_GROUP_SIZES, int4_kernel_name, int8_kernel_name
from tierserve.worker.kernels.native_model import build_native_model, native_decoder_refusal
from tierserve.worker.tiers.base import KernelPath, LoadedModel, Progress, bf16_autocast, cpu_capability
from tierserve.worker.tiers.loading import load_hf_model

if TYPE_CHECKING:
    from tierserve.worker.tiers.woq import WoqTier

log = logging.getLogger(__name__)


class NativeWoq(KernelPath):
    name: ClassVar[str] = "native"

    def __init__(self, tier: WoqTier) -> None:
        self.tier = tier

    def key(self) -> dict[str, Any]:
        tier = self.tier
        return (
            {
                # The packed layout and the lm_head width, so a change to either rebuilds the artifact.
                "native_format": f"{packed_weights.ARTIFACT_FORMAT} lm_head {tier.native_head_bits} bits",
                # The card depends on how the head runs, though its stored weights do not.
                "native_head": tier.native_scheme_head(),
                "native_dynamic_layers": tier.recipe.lowp_mode == "INT8",
                # Which kernel the int8 weight-only layers take here (the head's, at least): the card
                # is scored through it.
                "native_int8_kernel": int8_kernel_name(tier.native_activations()),
            }
            | self._int4_kernel_key()
            | self._int16_sums_key()
        )

    def _int4_kernel_key(self) -> dict[str, str]:
        """Which kernel the int4 layers take here; only 4-bit tiers, so that the others' artifacts
        stay valid."""
        if self.tier.bits != 4:
            return {}
        return {"native_int4_kernel": int4_kernel_name(self.tier.native_activations())}

    def _int16_sums_key(self) -> dict[str, str]:
        """Without VNNI, dynamic int8 layers store 7-bit weights and the head runs in two halves."""
        tier = self.tier
        dynamic = tier.recipe.lowp_mode == "INT8" or tier.native_scheme_head() == "dynamic-int8"
        if not dynamic or tier.context.isa.avx512_vnni:
            return {}
        return {"native_int16_sums": "7-bit dynamic weights, head in two halves"}

    def check(self, model_config: Any) -> None:
        tier = self.tier
        if tier.bits == 4:
            group = tier.group_size(model_config)
            sizes = ", ".join(map(str, INT4_GROUP_SIZES))
            if group == 0:
                raise ConfigError(
                    f'{tier.name}: group_size 0 (per output channel) needs kernel = "ipex"; the native '
                    f"int4 kernel takes group_size {sizes}"
                )
            if group not in INT4_GROUP_SIZES:
                raise ConfigError(
                    f"{tier.name}: group_size {group} is not supported by the native int4 kernel "
                    f"(aten._weight_int4pack_mm_for_cpu takes {sizes})"
                )
        refusal = native_decoder_refusal(model_config)
        if refusal is not None:
            raise ConfigError(f'{tier.name}: the native WOQ kernel path {refusal}; set kernel = "ipex"')
        if tier.recipe.lowp_mode == "INT8" and tier.bits == 4:
            raise ConfigError(
                f"{tier.name}: lowp_mode INT8 (dynamically quantized activations) with int4 weights needs "
                'kernel = "ipex"; the native int4 kernel takes BF16 or FP32 activations'
            )
        if tier.recipe.low_precision_checkpoint:
            raise ConfigError(f'{tier.name}: low_precision_checkpoint is read only with kernel = "ipex"')
        require_supported_ipex()

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
        progress("loading the float model")
        model, _ = load_hf_model(model_dir)
        self.tier.check(model.config)
        scheme = self.tier.native_scheme(model.config)
        progress(f"quantizing: {scheme.describe()}")
        tensors = packed_weights.quantize_model(model, scheme, progress)
        packed_weights.save_artifact(artifact_dir, tensors, scheme)

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        import intel_extension_for_pytorch as ipex

        tier = self.tier
        model, tokenizer = load_hf_model(model_dir)
        tier.check(model.config)
        context_tokens = int(model.config.max_position_embeddings)
        scheme = tier.native_scheme(model.config)
        tensors = packed_weights.read_artifact(artifact_dir, scheme)
        if tensors is None:
            log.warning("%s: no packed weights in %s; quantizing now", tier.name, artifact_dir)
            tensors = packed_weights.quantize_model(model, scheme, lambda message: None)
        model = build_native_model(model, tensors, scheme)
        kernel = (
            f"native: {scheme.describe()}; in IPEX's TorchScript decoder graph (RoPE, attention, RMSNorm); "
            f"CPU ISA {cpu_capability()}"
        )
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            backend=f"torch {torch.__version__} native kernels + ipex {ipex.__version__} graph",
            kernel=kernel,
            dtype=scheme.activations,
            context_tokens=context_tokens,
            run_context=bf16_autocast if scheme.activations == torch.bfloat16 else contextlib.nullcontext,
        )
