"""IPEX's private API: used in one module only, and refused on any IPEX but the 2.8 series."""

from __future__ import annotations

import ast
from pathlib import Path

import intel_extension_for_pytorch
import pytest
import torch
from transformers import LlamaConfig

from tierserve.domain.config import TierRecipe
from tierserve.domain.errors import StartupError
from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import ipex_internals
from tierserve.worker.kernels.ipex_internals import UnsupportedIpexVersion, check_ipex_version
from tierserve.worker.tiers import TierContext, make_tier

WORKER = Path(__file__).resolve().parents[2] / "worker"
# What may be imported from IPEX outside ipex_internals: its public recipe.
PUBLIC_IPEX_MODULES = {"intel_extension_for_pytorch", "intel_extension_for_pytorch.quantization"}
ZEN4 = CpuIsa.from_flags({"avx512f", "avx512_bf16", "avx512_vnni", "avx2"})


def smollm_like_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=576, intermediate_size=1536, architectures=["LlamaForCausalLM"])


def test_the_2_8_series_is_accepted() -> None:
    check_ipex_version("2.8.0+cpu")
    check_ipex_version("2.8.10")


@pytest.mark.parametrize("version", ["2.7.0+cpu", "2.9.0+cpu", "3.0.0", "2.80.0"])
def test_any_other_version_is_a_startup_error_that_says_why(version: str) -> None:
    with pytest.raises(UnsupportedIpexVersion) as caught:
        check_ipex_version(version)
    assert isinstance(caught.value, StartupError)
    message = str(caught.value)
    assert message.startswith("tierserve's native kernel path relies on IPEX 2.8 internals (")
    assert "model_convert_lowering" in message
    assert f"found IPEX {version}" in message


def test_the_installed_ipex_is_checked_before_any_private_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intel_extension_for_pytorch, "__version__", "2.9.0+cpu")
    with pytest.raises(UnsupportedIpexVersion, match=r"found IPEX 2\.9\.0"):
        ipex_internals.lowered_decoder(object(), torch.bfloat16)
    with pytest.raises(UnsupportedIpexVersion, match=r"SmoothQuant calibration relies on IPEX 2\.8"):
        ipex_internals.calibration_example(object())
    # The public recipe keeps working; only its graph check is not claimed.
    assert ipex_internals.graph_mode(object()) == "deployment mode (graph not checked on IPEX 2.9.0+cpu)"


@pytest.mark.parametrize(
    ("tier", "recipe"),
    [
        ("int4-woq", TierRecipe(kernel="native")),
        ("int8-woq", TierRecipe(kernel="native")),
        ("int8-sq", TierRecipe(activation_scales="dynamic")),
    ],
)
def test_native_paths_refuse_another_ipex_at_check(
    monkeypatch: pytest.MonkeyPatch, tier: str, recipe: TierRecipe
) -> None:
    monkeypatch.setattr(intel_extension_for_pytorch, "__version__", "2.9.0+cpu")
    with pytest.raises(UnsupportedIpexVersion):
        make_tier(tier, TierContext(recipe=recipe, isa=ZEN4)).check(smollm_like_config())
    # IPEX's public weight-only recipe does not depend on its internals.
    make_tier("int4-woq", TierContext(recipe=TierRecipe(kernel="ipex"), isa=ZEN4)).check(smollm_like_config())


def _ipex_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return {m for m in modules if m.split(".")[0] == "intel_extension_for_pytorch"}


def test_only_ipex_internals_imports_ipex_private_modules() -> None:
    internals = WORKER / "kernels" / "ipex_internals.py"
    assert _ipex_imports(internals) - PUBLIC_IPEX_MODULES  # the check below would see it
    offenders = {
        str(path.relative_to(WORKER)): sorted(_ipex_imports(path) - PUBLIC_IPEX_MODULES)
        for path in WORKER.rglob("*.py")
        if path != internals and _ipex_imports(path) - PUBLIC_IPEX_MODULES
    }
    assert offenders == {}
