"""Tiers int8-woq and int4-woq: weight-only quantization (activations stay bf16 or fp32).

Two kernel paths, chosen by `kernel_path()`:

- "ipex": `ipex.llm.optimize` with `get_weight_only_quant_qconfig_mapping` (and the
  recipe's `low_precision_checkpoint`, if any). Fast only on CPUs with AMX and
  AVX512_FP16; elsewhere IPEX dequantizes every weight at every step (~15x slower than
  IPEX bf16 on this project's development machine). Taken when `kernel = "ipex"`, or
  `kernel = "auto"` on a CPU where `CpuIsa.ipex_woq_fast`. IPEX quantizes at load time;
  `build` only records the settings.
- "native": PyTorch's own weight-only kernels inside IPEX's traced decoder graph (see
  `tierserve.worker.tiers.native_woq`). `build` quantizes once and writes the packed weights;
  `load` only reads and repacks them.

Recipe fields:

- `group_size` (int4 only): input channels per quantization group, default 32 (the smallest
  the native kernel accepts). 32 because it is the most accurate and was not measurably
  slower than 64 here (on a heavily shared machine, so within noise): the default model's
  weights are dequantized GGUF Q4_1 (blocks of 32 along the input, min/max), so group 32
  recovers them almost exactly (perplexity +0.3% vs fp32) while group 64 costs +50%. A size
  that does not divide the hidden and intermediate sizes is refused. 0 means one group per
  output channel (IPEX only).
  int8-woq is always per output channel (one scale per row) on both paths and ignores it.
- `lowp_mode`: IPEX's lowest compute precision. AUTO means BF16. On the native path
  AUTO/BF16 run bf16 activations, FP32 runs fp32 activations (much slower kernels); AUTO
  also runs the lm_head as fbgemm's dynamic int8 linear (activations quantized per token at
  run time; same stored weights; about 1.7-2 ms per token faster here, perplexity within
  measurement noise of the weight-only head), BF16 keeps it weight-only. INT8
  quantizes every layer's activations per token at run time: on the IPEX path IPEX's
  own mode; on the native path int8-woq runs every layer as fbgemm's dynamic int8 linear.
  Measured side by side on the default model (2 threads, AVX512-VNNI, no AMX): 8.3 ms per
  token against 11.9 for BF16 activations, perplexity +0.63% against +0.86%, but KL 0.021
  against 0.008 and top-1 agreement 90.8% against 92.9%, and greedy text that drifts (no
  "Paris" after "The capital of France is"), so BF16 stays the default. int4-woq has no
  native int8-activation kernel and refuses INT8 on the native path.
- `low_precision_checkpoint`: a GPTQ/AWQ-style checkpoint (a .safetensors/.pt/.bin file,
  or a folder of them with a config.json carrying `quantization_config`) handed to IPEX;
  IPEX path only. The layers it holds run at its own width and group size, whatever the tier
  and `group_size` say (a GPTQ/AWQ checkpoint is INT4, also in int8-woq); layers it lacks (the
  lm_head, in GPTQ/AWQ files) stay unquantized. The kernel string reports both. Its layout:
  tests/gptq_checkpoint.py.
- `kernel`: auto | ipex | native.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from tierserve.domain.config import ConfigError
from tierserve.worker.tiers import native_woq
from tierserve.worker.tiers.base import LoadedModel, Progress, Tier, register_tier
from tierserve.worker.tiers.ipex_common import bf16_autocast, cpu_capability, graph_mode, load_hf_model

log = logging.getLogger(__name__)

IPEX_SETTINGS_FILE = "woq-ipex.json"


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


class _WoqTier(Tier):
    """Shared by int8-woq and int4-woq; subclasses set the weight width."""

    bits: ClassVar[Literal[4, 8]]
    # The lm_head (tied to the embeddings here, 49152 x 576: a fifth of all weights) on the
    # native path.
    native_head_bits: ClassVar[native_woq.Bits]

    # --- recipe -----------------------------------------------------------------------------

    def kernel_path(self) -> str:
        kernel = self.recipe.kernel
        if kernel == "ipex" or (kernel == "auto" and self.context.isa.ipex_woq_fast):
            return "ipex"
        return "native"

    def recipe_key(self) -> dict[str, Any]:
        key = super().recipe_key()
        if self.kernel_path() == "native":
            # The packed layout and the lm_head width, so a change to either rebuilds the artifact.
            key["native_format"] = f"{native_woq.ARTIFACT_FORMAT} lm_head {self.native_head_bits} bits"
            # The card depends on how the head runs, though its stored weights do not.
            key["native_head"] = self.native_scheme_head()
            key["native_dynamic_layers"] = self.recipe.lowp_mode == "INT8"
        if self.recipe.low_precision_checkpoint:
            # Its path alone would keep a card measured on an older file at the same path.
            key["checkpoint_files"] = checkpoint_fingerprint(Path(self.recipe.low_precision_checkpoint))
        return key

    def group_size(self, model_config: Any) -> int:
        """Input channels per quantization group; 0 means one group per output channel."""
        if self.bits == 8:
            return 0
        return self.recipe.group_size

    def check(self, model_config: Any) -> None:
        path = self.kernel_path()
        if self.bits == 4:
            self._check_group_size(model_config, path)
        if path == "native":
            self._check_native(model_config)
        elif self.recipe.low_precision_checkpoint:
            checkpoint = Path(self.recipe.low_precision_checkpoint).expanduser()
            if not checkpoint.exists():
                raise ConfigError(f"{self.name}: low_precision_checkpoint {checkpoint} does not exist")

    def _check_group_size(self, model_config: Any, path: str) -> None:
        group = self.group_size(model_config)
        sizes = _grouped_sizes(model_config)
        if group == 0:
            if path == "native":
                raise ConfigError(
                    f'{self.name}: group_size 0 (per output channel) needs kernel = "ipex"; the native '
                    f"int4 kernel takes group_size {', '.join(map(str, native_woq.INT4_GROUP_SIZES))}"
                )
            return
        fitting = [g for g in (256, 128, 64, 32, 16) if all(s % g == 0 for s in sizes)]
        if any(s % group for s in sizes):
            raise ConfigError(
                f"{self.name}: group_size {group} does not divide the model's hidden size {sizes[0]} "
                f"and intermediate size {sizes[1]}; choose one that divides both"
                + (f" (e.g. {', '.join(map(str, fitting))})" if fitting else "")
            )
        if path == "native" and group not in native_woq.INT4_GROUP_SIZES:
            raise ConfigError(
                f"{self.name}: group_size {group} is not supported by the native int4 kernel "
                f"(aten._weight_int4pack_mm_for_cpu takes {', '.join(map(str, native_woq.INT4_GROUP_SIZES))})"
            )
        if path == "ipex" and group & (group - 1):
            raise ConfigError(f"{self.name}: IPEX needs group_size to be a power of two, got {group}")

    def _check_native(self, model_config: Any) -> None:
        architecture = (getattr(model_config, "architectures", None) or [type(model_config).__name__])[0]
        if architecture not in native_woq.SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{self.name}: the native WOQ kernel path supports "
                f'{", ".join(native_woq.SUPPORTED_ARCHITECTURES)}, not {architecture}; set kernel = "ipex"'
            )
        if getattr(model_config, "attention_bias", False) or getattr(model_config, "mlp_bias", False):
            raise ConfigError(f"{self.name}: the native WOQ kernel path needs linear layers without bias")
        if self.recipe.lowp_mode == "INT8" and self.bits == 4:
            raise ConfigError(
                f"{self.name}: lowp_mode INT8 (dynamically quantized activations) with int4 weights needs "
                'kernel = "ipex"; the native int4 kernel takes BF16 or FP32 activations'
            )
        if self.recipe.low_precision_checkpoint:
            raise ConfigError(f'{self.name}: low_precision_checkpoint is read only with kernel = "ipex"')

    def native_scheme_head(self) -> str:
        """How the native path runs the lm_head. AUTO: int8 dynamic (the fastest measured);
        an explicit BF16 or FP32 lowp_mode keeps float activations everywhere."""
        return "dynamic-int8" if self.recipe.lowp_mode in ("AUTO", "INT8") else "weight-only"

    def native_scheme(self, model_config: Any) -> native_woq.NativeScheme:
        return native_woq.NativeScheme(
            bits=self.bits,
            group_size=self.group_size(model_config),
            head_bits=self.native_head_bits,
            activations=torch.float32 if self.recipe.lowp_mode == "FP32" else torch.bfloat16,
            head_dynamic=self.native_scheme_head() == "dynamic-int8",
            dynamic_layers=self.recipe.lowp_mode == "INT8",
            reduce_range=not self.context.isa.avx512_vnni,
        )

    # --- build and load -----------------------------------------------------------------------

    def build(self, model_dir: Path, artifact_dir: Path, progress: Progress) -> None:
        if self.kernel_path() == "ipex":
            # IPEX quantizes while optimizing, at load; record what it will be asked for.
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(model_dir)
            self.check(model_config)
            (artifact_dir / IPEX_SETTINGS_FILE).write_text(
                json.dumps(self._ipex_settings(model_config), indent=2) + "\n", encoding="utf-8"
            )
            return
        progress("loading the float model")
        model, _ = load_hf_model(model_dir)
        self.check(model.config)
        scheme = self.native_scheme(model.config)
        progress(f"quantizing: {scheme.describe()}")
        tensors = native_woq.quantize_model(model, scheme, progress)
        native_woq.save_artifact(artifact_dir, tensors, scheme)

    def load(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        if self.kernel_path() == "ipex":
            return self._load_ipex(model_dir)
        return self._load_native(model_dir, artifact_dir)

    def _load_native(self, model_dir: Path, artifact_dir: Path) -> LoadedModel:
        model, tokenizer = load_hf_model(model_dir)
        self.check(model.config)
        context_tokens = int(model.config.max_position_embeddings)
        scheme = self.native_scheme(model.config)
        tensors = native_woq.read_artifact(artifact_dir, scheme)
        if tensors is None:
            log.warning("%s: no packed weights in %s; quantizing now", self.name, artifact_dir)
            tensors = native_woq.quantize_model(model, scheme, lambda message: None)
        model = native_woq.build_native_model(model, tensors, scheme)
        import intel_extension_for_pytorch as ipex

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

    def _ipex_settings(self, model_config: Any) -> dict[str, Any]:
        group = self.group_size(model_config)
        lowp = "BF16" if self.recipe.lowp_mode == "AUTO" else self.recipe.lowp_mode
        return {
            "weight_dtype": f"INT{self.bits}",
            "group_size": group if group else -1,
            "lowp_mode": lowp,
            "dtype": "float32" if lowp == "FP32" else "bfloat16",
            "low_precision_checkpoint": self.recipe.low_precision_checkpoint,
        }

    def _load_ipex(self, model_dir: Path) -> LoadedModel:
        import intel_extension_for_pytorch as ipex
        from intel_extension_for_pytorch.quantization import (
            WoqLowpMode,
            WoqWeightDtype,
            get_weight_only_quant_qconfig_mapping,
        )

        model, tokenizer = load_hf_model(model_dir)
        self.check(model.config)
        context_tokens = int(model.config.max_position_embeddings)
        settings = self._ipex_settings(model.config)
        # IPEX's NONE: compute at the activation dtype, which is fp32 for lowp FP32.
        lowp_modes = {"BF16": WoqLowpMode.BF16, "FP32": WoqLowpMode.NONE, "INT8": WoqLowpMode.INT8}
        qconfig = get_weight_only_quant_qconfig_mapping(
            weight_dtype=WoqWeightDtype.INT4 if self.bits == 4 else WoqWeightDtype.INT8,
            lowp_mode=lowp_modes[settings["lowp_mode"]],
            group_size=settings["group_size"],
        )
        dtype = torch.float32 if settings["dtype"] == "float32" else torch.bfloat16
        group = settings["group_size"]
        weights = f"INT{self.bits} {'per-channel' if group == -1 else f'group {group}'}"
        extra: dict[str, Any] = {}
        if self.recipe.low_precision_checkpoint:
            checkpoint = Path(self.recipe.low_precision_checkpoint).expanduser()
            extra["low_precision_checkpoint"] = read_low_precision_checkpoint(checkpoint)
            method, width = checkpoint_width(extra["low_precision_checkpoint"])
            if width != f"INT{self.bits}":
                # IPEX would run the checkpoint's width whatever the tier says: refuse the mismatch.
                raise ConfigError(
                    f"{self.name}: low_precision_checkpoint {checkpoint} holds {method} {width} weights; "
                    f"serve it as {'int4-woq' if width == 'INT4' else 'a tier of that width'}"
                )
            weights = describe_low_precision_checkpoint(extra["low_precision_checkpoint"])
        with torch.inference_mode():
            optimized = ipex.llm.optimize(
                model, dtype=dtype, inplace=True, quantization_config=qconfig, deployment_mode=True, **extra
            )
        speed = (
            "AMX fast kernels"
            if self.context.isa.ipex_woq_fast
            else "reference kernels: every weight dequantized at every step (no AMX+AVX512_FP16)"
        )
        kernel = (
            f"ipex WOQ {weights} lowp {settings['lowp_mode']}, {settings['dtype']} activations, "
            f"{graph_mode(optimized)}; {speed}; "
            f"CPU ISA {cpu_capability()}"
        )
        return LoadedModel(
            model=optimized,
            tokenizer=tokenizer,
            backend=f"ipex {ipex.__version__}",
            kernel=kernel,
            dtype=dtype,
            context_tokens=context_tokens,
            run_context=bf16_autocast if dtype == torch.bfloat16 else contextlib.nullcontext,
        )


def _grouped_sizes(model_config: Any) -> tuple[int, int]:
    """The input widths every quantized matrix has: hidden size (q/k/v, gate/up, o, lm_head) and
    intermediate size (down)."""
    return int(model_config.hidden_size), int(model_config.intermediate_size)


@register_tier
class Int8WoqTier(_WoqTier):
    name = "int8-woq"
    bits = 8
    native_head_bits = 8
    recipe_fields = ("lowp_mode", "low_precision_checkpoint", "kernel")


@register_tier
class Int4WoqTier(_WoqTier):
    name = "int4-woq"
    bits = 4
    native_head_bits = 8
    recipe_fields = ("group_size", "lowp_mode", "low_precision_checkpoint", "kernel")
