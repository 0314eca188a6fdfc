"""Tier bf16: IPEX's recipe where oneDNN can prepack bf16 weights, PyTorch eager elsewhere."""

from __future__ import annotations

import pytest

from tierserve.domain.config import TierRecipe
from tierserve.worker.isa import CpuIsa
from tierserve.worker.tiers import TierContext, make_tier

ZEN4 = CpuIsa.from_flags({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2"})
AVX2_ONLY = CpuIsa.from_flags({"avx2"})


def kernel_path(recipe: TierRecipe, isa: CpuIsa) -> str:
    return make_tier("bf16", TierContext(recipe=recipe, isa=isa)).kernel_path()


def test_auto_takes_ipex_only_where_onednn_prepacks_bf16() -> None:
    assert kernel_path(TierRecipe(), ZEN4) == "ipex"
    assert kernel_path(TierRecipe(), AVX2_ONLY) == "native"
    assert kernel_path(TierRecipe(), CpuIsa.from_flags({"avx_ne_convert", "avx2"})) == "ipex"


@pytest.mark.parametrize("isa", [ZEN4, AVX2_ONLY])
def test_recipe_kernel_forces_either_path(isa: CpuIsa) -> None:
    assert kernel_path(TierRecipe(kernel="ipex"), isa) == "ipex"
    assert kernel_path(TierRecipe(kernel="native"), isa) == "native"


def test_kernel_path_keys_the_artifact() -> None:
    ipex = make_tier("bf16", TierContext(recipe=TierRecipe(), isa=ZEN4)).recipe_key()
    native = make_tier("bf16", TierContext(recipe=TierRecipe(), isa=AVX2_ONLY)).recipe_key()
    assert (ipex["kernel_path"], native["kernel_path"]) == ("ipex", "native")
    assert ipex == {"tier": "bf16", "kernel_path": "ipex", "kernel": "auto"}
