"""tierserve's bfloat16 linear (`bf16_linear.cpp`): the float product rounded once, every row the
same bits whatever rows share the call, and the module's choice of kernel."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.conftest import library_op_or_skip
from tierserve.worker.kernels.linears import (
    Bf16Linear,
    DenseLinear,
    dense_linear,
    pack_for_dot_products,
    tierserve_bf16_kernel,
)


@pytest.fixture(scope="module")
def kernel() -> Any:
    return library_op_or_skip(tierserve_bf16_kernel(), "avx512_bf16")


def _case(out_features: int, in_features: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).bfloat16()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    return weight, x


# 960 x 576: a qkv (15 chunks of 64 channels); 80: a last chunk of one block; 48: less than a chunk.
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (80, 64), (48, 34)])
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 7, 9, 37])
def test_the_kernel_equals_the_float_product_rounded_once(
    kernel: Any, out_features: int, in_features: int, rows: int
) -> None:
    weight, x = _case(out_features, in_features, rows)
    y = kernel(x, pack_for_dot_products(weight))
    exact = x.double() @ weight.double().T
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    # Every bf16 x bf16 product is exact in float32; only the float32 sums and the last rounding
    # to bfloat16 (2^-8 relative) differ from the exact value.
    bound = exact.abs() * 2.0**-8 + 1e-5 * exact.abs().max()
    assert bool(((y.double() - exact).abs() <= bound).all())
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight), rtol=2.0**-7, atol=1e-2)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel: Any) -> None:
    weight, x = _case(960, 576, 37, seed=1)
    x[5] *= 300  # an outlier row: it must not change its neighbours' bits
    packed = pack_for_dot_products(weight)
    together = kernel(x, packed)
    for rows in (1, 2, 3, 5, 6, 7, 8, 16):
        assert torch.equal(kernel(x[:rows], packed), together[:rows])
    alone = torch.cat([kernel(x[i : i + 1], packed) for i in range(37)])
    assert torch.equal(alone, together)


def test_bad_inputs_are_refused_with_a_reason(kernel: Any) -> None:
    weight, x = _case(64, 32, 2)
    packed = pack_for_dot_products(weight)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel(x.float(), packed)
    with pytest.raises(RuntimeError, match="columns"):
        kernel(torch.zeros(2, 30, dtype=torch.bfloat16), packed)
    with pytest.raises(RuntimeError, match="packed"):
        kernel(x, weight)
    with pytest.raises(RuntimeError, match="packed"):
        kernel(x, pack_for_dot_products(weight.float()))
    assert kernel(x[:0], packed).shape == (0, 64)


def test_dense_linear_takes_the_kernel_for_bf16_where_it_fits(kernel: Any) -> None:
    weight, x = _case(96, 64, 5)
    linear = dense_linear(weight, torch.bfloat16)
    assert isinstance(linear, Bf16Linear) and linear.kernel is kernel
    y = linear(x.reshape(5, 1, 64))
    assert y.dtype == torch.bfloat16 and y.shape == (5, 1, 96)
    assert torch.equal(y.reshape(5, 96), kernel(x, pack_for_dot_products(weight)))
    # 90 output channels: not whole registers of 16; float32 activations: the kernel takes bf16.
    assert isinstance(dense_linear(weight[:90], torch.bfloat16), DenseLinear)
    assert not isinstance(dense_linear(weight, torch.float32), Bf16Linear)
    with pytest.raises(ValueError, match="N % 16"):
        Bf16Linear(weight[:90], kernel)
