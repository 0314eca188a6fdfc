"""Fixtures shared by the continuous-batching tests (test_batching, test_chunked_prefill): tiny
random models of each supported family and batch engines on them (module-scoped: each test
module builds its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import FAMILIES, build_tiny_model_dir
from tierserve.worker.engine import Engine
from tierserve.worker.tiers.base import make_tier


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", architecture=request.param)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def engine(request: pytest.FixtureRequest, llama_dir: Path) -> Engine:
    return Engine(make_tier(request.param).load(llama_dir, llama_dir))
