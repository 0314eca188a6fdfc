"""tierserve's int8 weight-only kernel (`woq_int8.cpp`) against the float product and aten's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.conftest import library_op_or_skip
from tierserve.worker.kernels.linears import Int8WoqLinear, pack_for_dot_products, tierserve_int8_kernel


@pytest.fixture(scope="module")
def kernel() -> Any:
    return library_op_or_skip(tierserve_int8_kernel(), "avx512_bf16")


def _case(out_features: int, in_features: int, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scales = (torch.rand(out_features, generator=generator) * 0.01 + 1e-3).bfloat16()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    return {"qweight": qweight, "scales": scales, "x": x}


# 960 x 576: a qkv (15 chunks of 64 channels); 80: a last chunk of one block; 48: less than a chunk.
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (80, 64), (48, 34)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 37])
def test_the_kernel_equals_the_float_product_rounded_once(
    kernel: Any, out_features: int, in_features: int, rows: int
) -> None:
    case = _case(out_features, in_features, rows)
    y = kernel(case["x"], pack_for_dot_products(case["qweight"]), case["scales"].float())
    exact = case["x"].double() @ (case["qweight"].double() * case["scales"].double()[:, None]).T
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    # Every product is exact (int8 and bf16 in bf16); only float32 sums and the last rounding to
    # bfloat16 (2^-8 relative) differ from the exact value.
    bound = exact.abs() * 2.0**-8 + 1e-5 * exact.abs().max()
    assert bool(((y.double() - exact).abs() <= bound).all())
    if in_features % 32:  # aten's kernel reads whole vectors of input channels: garbage here
        return
    aten = torch.ops.aten._weight_int8pack_mm(case["x"], case["qweight"], case["scales"])
    torch.testing.assert_close(y, aten, rtol=2.0**-7, atol=1e-3 * float(exact.abs().max()))


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel: Any) -> None:
    case = _case(960, 576, 37, seed=1)
    packed, scales = pack_for_dot_products(case["qweight"]), case["scales"].float()
    together = kernel(case["x"], packed, scales)
    for rows in (1, 2, 3, 5, 8, 16):
        assert torch.equal(kernel(case["x"][:rows], packed, scales), together[:rows])
    alone = torch.cat([kernel(case["x"][i : i + 1], packed, scales) for i in range(37)])
    assert torch.equal(alone, together)


def test_bad_inputs_are_refused_with_a_reason(kernel: Any) -> None:
    case = _case(64, 32, 2)
    packed, scales = pack_for_dot_products(case["qweight"]), case["scales"].float()
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel(case["x"].float(), packed, scales)
    with pytest.raises(RuntimeError, match="columns"):
        kernel(torch.zeros(2, 30, dtype=torch.bfloat16), packed, scales)
    with pytest.raises(RuntimeError, match="scales"):
        kernel(case["x"], packed, scales[:16])
    with pytest.raises(RuntimeError, match="packed"):
        kernel(case["x"], case["qweight"], scales)
    assert kernel(case["x"][:0], packed, scales).shape == (0, 64)


def test_the_linear_takes_the_kernel_where_it_fits_and_aten_elsewhere(kernel: Any) -> None:
    case = _case(96, 64, 5)
    linear = Int8WoqLinear(case["qweight"], case["scales"], torch.bfloat16, torch.float32)
    direct = kernel(case["x"], pack_for_dot_products(case["qweight"]), case["scales"].float())
    y = linear(case["x"].reshape(5, 1, 64))
    assert y.dtype == torch.float32 and y.shape == (5, 1, 96)
    assert torch.equal(y.reshape(5, 96), direct.float())
    assert linear.kernel is kernel
    # 90 output channels: not whole registers of 16; float32 activations: the kernel takes bf16.
    assert Int8WoqLinear(case["qweight"][:90], case["scales"][:90], torch.bfloat16).kernel is None
    assert Int8WoqLinear(case["qweight"], case["scales"], torch.float32).kernel is None
