"""tierserve's float32 linear (`fp32_linear.cpp`): the float product, every row the same bits
whatever rows share the call, and the module's choice of kernel."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.conftest import library_op_or_skip
from tierserve.worker.kernels.linears import (
    DenseLinear,
    Fp32Linear,
    dense_kernel_name,
    dense_linear,
    pack_for_fp32_lanes,
    tierserve_fp32_kernel,
)


@pytest.fixture(scope="module")
def kernel() -> Any:
    return library_op_or_skip(tierserve_fp32_kernel(), "avx512")


def _case(out_features: int, in_features: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    x = torch.randn(rows, in_features, generator=generator)
    return weight, x


# 960 x 576: a qkv (15 chunks of 64 channels); 80: a last chunk of one block; 48 x 33: less than a
# chunk, an odd number of input channels. Rows: every tile height (1-6) and several tiles.
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (80, 64), (48, 33)])
@pytest.mark.parametrize("rows", [1, 4, 6, 7, 13, 37])
def test_the_kernel_equals_the_float_product(
    kernel: Any, out_features: int, in_features: int, rows: int
) -> None:
    weight, x = _case(out_features, in_features, rows)
    y = kernel(x, pack_for_fp32_lanes(weight))
    exact = x.double() @ weight.double().T
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    # K float32 multiply-adds, each rounded once: within K units of 2^-24 of the sum of |products|.
    bound = (x.double().abs() @ weight.double().abs().T) * in_features * 2.0**-24
    assert bool(((y.double() - exact).abs() <= bound).all())


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel: Any) -> None:
    weight, x = _case(960, 576, 37, seed=1)
    x[5] *= 300  # an outlier row: it must not change its neighbours' bits
    packed = pack_for_fp32_lanes(weight)
    together = kernel(x, packed)
    for rows in (1, 2, 3, 5, 6, 7, 8, 16):
        assert torch.equal(kernel(x[:rows], packed), together[:rows])
    alone = torch.cat([kernel(x[i : i + 1], packed) for i in range(37)])
    assert torch.equal(alone, together)


def test_bad_inputs_are_refused_with_a_reason(kernel: Any) -> None:
    weight, x = _case(64, 32, 2)
    packed = pack_for_fp32_lanes(weight)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(x.bfloat16(), packed)
    with pytest.raises(RuntimeError, match="columns"):
        kernel(torch.zeros(2, 30), packed)
    with pytest.raises(RuntimeError, match="packed"):
        kernel(x, weight)
    with pytest.raises(RuntimeError, match="packed"):
        kernel(x, pack_for_fp32_lanes(weight).bfloat16())
    assert kernel(x[:0], packed).shape == (0, 64)


def test_dense_linear_takes_the_kernel_for_fp32_where_it_fits(kernel: Any) -> None:
    weight, x = _case(96, 64, 5)
    linear = dense_linear(weight, torch.float32)
    assert isinstance(linear, Fp32Linear) and linear.kernel is kernel
    assert dense_kernel_name(torch.float32).startswith("tierserve fp32_linear")
    y = linear(x.reshape(5, 1, 64))
    assert y.dtype == torch.float32 and y.shape == (5, 1, 96)
    assert torch.equal(y.reshape(5, 96), kernel(x, pack_for_fp32_lanes(weight)))
    # 90 output channels: not whole registers of 16.
    assert isinstance(dense_linear(weight[:90], torch.float32), DenseLinear)
    with pytest.raises(ValueError, match="N % 16"):
        Fp32Linear(weight[:90], kernel)
