"""fbgemm's dynamic int8 linears on CPUs without VNNI, where fbgemm sums pairs of u8 x s8
products in int16: 7-bit weights for the layers (clipped to the least error), 8-bit weights
run as two halves, and the stored layout that records which."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_model import build_tiny_model_dir
from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import packed_weights
from tierserve.worker.kernels.linears import DynamicInt8Linear
from tierserve.worker.kernels.quantizers import INT7_LEVELS, quantize_int8
from tierserve.worker.tiers.int8_sq_dynamic import scheme
from tierserve.worker.tiers.loading import load_hf_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


def test_eight_bit_weights_run_in_halves_and_stay_exact_where_int16_sums_would_saturate() -> None:
    # Every weight at +127 and every activation at the top of the u8 range: one pair of
    # products is 2 x 255 x 127 = 64770, twice what an int16 holds.
    in_features = 64
    qweight = torch.full((8, in_features), 127, dtype=torch.int8)
    qweight[1::2] = -127
    scales = torch.full((8,), 0.01)
    x = torch.full((1, in_features), 3.0)
    expected = x @ (qweight.float() * scales[:, None]).T
    linear = DynamicInt8Linear(qweight, scales, int16_sums=True)
    assert linear.split
    assert torch.allclose(linear(x), expected, rtol=1e-3)
    # Several rows take the per-token path; the halves are added back the same way.
    rows = torch.cat([x, 2 * x, x / 4])
    assert torch.allclose(linear(rows), rows @ (qweight.float() * scales[:, None]).T, rtol=1e-3)


@pytest.mark.parametrize(
    ("levels", "int16_sums", "split"), [(127, True, True), (63, True, False), (127, False, False)]
)
def test_only_weights_beyond_sixty_four_levels_are_split_and_only_without_vnni(
    levels: int, int16_sums: bool, split: bool
) -> None:
    torch.manual_seed(1)
    q = quantize_int8(torch.randn(32, 64), levels)
    linear = DynamicInt8Linear(q["qweight"], q["scales"], int16_sums)
    assert linear.split is split
    if not int16_sums and not CpuIsa.detect().avx512_vnni:
        pytest.skip("8-bit weights unsplit are exact only with VNNI, which this CPU lacks")
    x = torch.randn(3, 64)
    expected = x @ (q["qweight"].float() * q["scales"][:, None]).T
    assert (linear(x) - expected).norm() / expected.norm() < 0.02


def test_without_vnni_unsplit_eight_bit_weights_saturate() -> None:
    """Why the halves exist: without VNNI fbgemm's int16 sums can overflow (they did on the Zen 3
    of 2026-12-02); the halves are exact either way. Which kernel the quantized engine ("x86")
    picks depends on the CPU: on an EPYC family 25 model 1 (2026-12-03) the same case summed
    exactly, so there the halves are only a safeguard."""
    if CpuIsa.detect().avx512_vnni:
        pytest.skip("with VNNI fbgemm sums in int32 and nothing saturates")
    qweight, scales = torch.full((4, 64), 127, dtype=torch.int8), torch.full((4,), 0.01)
    x = torch.full((1, 64), 3.0)  # every activation at 255 in u8: every pair sum is 64770
    expected = x @ (qweight.float() * scales[:, None]).T

    def error(linear: DynamicInt8Linear) -> float:
        return float((linear(x) - expected).norm() / expected.norm())

    assert error(DynamicInt8Linear(qweight, scales, int16_sums=True)) < 1e-3
    unsplit = error(DynamicInt8Linear(qweight, scales, int16_sums=False))
    if unsplit < 1e-3:
        pytest.skip(f"this CPU's quantized kernel summed without saturating (error {unsplit:.1e})")
    assert unsplit > 0.3


def test_seven_bit_weights_keep_their_range_and_clipping_never_adds_error() -> None:
    torch.manual_seed(4)
    # Long rows with Laplace tails: max|w| lies far out, and 63 levels up to it are coarse.
    weight = torch.distributions.Laplace(0.0, 0.02).sample((64, 4096))
    plain = quantize_int8(weight, INT7_LEVELS)
    clipped = quantize_int8(weight, INT7_LEVELS, clip=True)
    assert int(clipped["qweight"].abs().max()) <= INT7_LEVELS

    def row_errors(q: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((q["qweight"].float() * q["scales"][:, None] - weight) ** 2).sum(dim=1)

    assert bool((row_errors(clipped) <= row_errors(plain) + 1e-12).all())
    assert row_errors(clipped).sum() < 0.95 * row_errors(plain).sum()


def test_int8_sq_without_vnni_stores_seven_bit_layers_and_an_eight_bit_head_and_down_proj(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    without_vnni = scheme(CpuIsa.from_flags({"avx2"}))
    with_vnni = scheme(CpuIsa.from_flags({"avx2", "avx512f", "avx512_vnni"}))
    assert [without_vnni.int8_levels(n) for n in ("layers.0.qkv", "layers.0.down", "lm_head")] == [
        63,
        127,
        127,
    ]
    assert {with_vnni.int8_levels(n) for n in ("layers.0.qkv", "layers.0.down", "lm_head")} == {127}
    assert "7-bit" in without_vnni.describe() and "7-bit" not in with_vnni.describe()
    model = load_hf_model(tiny_model_dir)[0]
    tensors = packed_weights.quantize_model(model, without_vnni, lambda message: None)
    assert int(tensors["layers.0.gate_up.qweight"].abs().max()) <= 63
    assert int(tensors["layers.0.down.qweight"].abs().max()) == 127
    assert int(tensors["lm_head.qweight"].abs().max()) == 127
    # An artifact stored for one layout is not read as the other.
    packed_weights.save_artifact(tmp_path, tensors, without_vnni)
    assert packed_weights.read_artifact(tmp_path, without_vnni) is not None
    assert packed_weights.read_artifact(tmp_path, with_vnni) is None
