"""tierserve's dynamic int8 kernel (`dynamic_int8.cpp`) against the float product and fbgemm's path."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.conftest import library_op_or_skip
from tierserve.worker.kernels import linears
from tierserve.worker.kernels.linears import DynamicInt8Linear, pack_for_vnni, tierserve_dynamic_int8_kernel


@pytest.fixture(scope="module")
def kernel() -> Any:
    return library_op_or_skip(tierserve_dynamic_int8_kernel(), "avx512_vnni")


def _weights(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    return qweight, torch.rand(out_features, generator=generator) * 0.01 + 1e-3


def _inputs(rows: int, in_features: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed)) * 2.0
    x[:, 3] += 30.0  # an outlier channel, as real activations have
    return x


def _fbgemm(
    qweight: torch.Tensor, scales: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> DynamicInt8Linear:
    with monkeypatch.context() as patch:
        patch.setattr(linears, "tierserve_dynamic_int8_kernel", lambda: None)
        linear = DynamicInt8Linear(qweight, scales, int16_sums=False)
    assert linear.kernel is None
    return linear


@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (80, 64), (48, 36)])
@pytest.mark.parametrize("rows", [1, 4, 9, 37])
def test_the_kernel_makes_fbgemms_numbers(
    kernel: Any, monkeypatch: pytest.MonkeyPatch, out_features: int, in_features: int, rows: int
) -> None:
    qweight, scales = _weights(out_features, in_features)
    x = _inputs(rows, in_features)
    ours = DynamicInt8Linear(qweight, scales, int16_sums=False)
    assert ours.kernel is kernel
    y = ours(x)
    reference = _fbgemm(qweight, scales, monkeypatch)(x)
    exact = x.double() @ (qweight.double() * scales.double()[:, None]).T
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    # The same 256 levels over each row's range: both err alike against the exact product, and
    # differ from each other by at most a level's rounding here and there.
    ours_error = float((y.double() - exact).abs().mean())
    fbgemm_error = float((reference.double() - exact).abs().mean())
    assert ours_error <= 1.1 * fbgemm_error + 1e-6
    level = float((x.amax(dim=1) - x.amin(dim=1)).max()) / 255
    assert float((y - reference).abs().max()) <= 4 * level * float(qweight.abs().max() * scales.max())


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel: Any) -> None:
    qweight, scales = _weights(960, 576, seed=2)
    linear = DynamicInt8Linear(qweight, scales, int16_sums=False)
    x = _inputs(37, 576, seed=3)
    x[5] *= 1000.0  # an attention-sink row: its range is its own
    together = linear(x)
    for rows in (1, 2, 3, 5, 8, 16):
        assert torch.equal(linear(x[:rows]), together[:rows])
    assert torch.equal(torch.cat([linear(x[i : i + 1]) for i in range(37)]), together)


def test_a_constant_row_comes_out_as_its_value_times_the_weights(kernel: Any) -> None:
    qweight, scales = _weights(64, 32, seed=4)
    linear = DynamicInt8Linear(qweight, scales, int16_sums=False)
    y = linear(torch.full((2, 32), 0.5))
    torch.testing.assert_close(y, 0.5 * (qweight.float() * scales[:, None]).sum(dim=1).expand(2, 64))


def test_bad_inputs_are_refused_with_a_reason(kernel: Any) -> None:
    qweight, scales = _weights(64, 32)
    packed, sums = pack_for_vnni(qweight), qweight.int().sum(dim=1).int()
    weight_sums = (qweight.float() * scales[:, None]).sum(dim=1)
    x = _inputs(2, 32)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(x.bfloat16(), packed, sums, scales, weight_sums)
    with pytest.raises(RuntimeError, match="columns"):
        kernel(torch.zeros(2, 28), packed, sums, scales, weight_sums)
    with pytest.raises(RuntimeError, match="channels"):
        kernel(x, packed, sums[:16], scales, weight_sums)
    with pytest.raises(RuntimeError, match="int32"):
        kernel(x, packed, sums.float(), scales, weight_sums)
    with pytest.raises(RuntimeError, match="packed"):
        kernel(x, qweight, sums, scales, weight_sums)
    assert kernel(x[:0], packed, sums, scales, weight_sums).shape == (0, 64)


def test_the_linear_keeps_fbgemm_where_the_kernel_does_not_fit(kernel: Any) -> None:
    qweight, scales = _weights(96, 64)
    assert DynamicInt8Linear(qweight[:90], scales[:90], int16_sums=False).kernel is None  # not 16s
    assert DynamicInt8Linear(qweight[:, :62], scales, int16_sums=False).kernel is None  # not 4s
    assert DynamicInt8Linear(qweight, scales, int16_sums=True).kernel is None  # no VNNI: fbgemm's halves
