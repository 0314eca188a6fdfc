"""tierserve's int4 weight-only kernel (`woq_int4.cpp`) against the float product and aten's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.conftest import library_op_or_skip
from tierserve.worker.kernels.linears import (
    Int4WoqLinear,
    pack_int4_for_dot_products,
    pack_int4_scales_for_blocks,
    tierserve_int4_kernel,
    unpack_nibbles,
)
from tierserve.worker.kernels.quantizers import pack_int4


@pytest.fixture(scope="module")
def kernel() -> Any:
    return library_op_or_skip(tierserve_int4_kernel(), "avx512_bf16")


def _case(out_features: int, in_features: int, rows: int, group: int, seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, generator=generator)
    groups = in_features // group
    scales = (torch.rand(groups, out_features, generator=generator) * 0.01 + 1e-3).bfloat16().float()
    zeros = (torch.randn(groups, out_features, generator=generator) * 0.05).bfloat16().float()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    nibbles = pack_int4(levels.to(torch.uint8))
    return {"levels": levels, "nibbles": nibbles, "scales": scales, "zeros": zeros, "x": x, "group": group}


def _scales_and_zeros(case: dict[str, Any]) -> torch.Tensor:
    return pack_int4_scales_for_blocks(torch.stack([case["scales"], case["zeros"]], dim=-1).bfloat16())


def _call(kernel: Any, case: dict[str, Any], rows: slice = slice(None)) -> torch.Tensor:
    packed = pack_int4_for_dot_products(case["nibbles"])
    return kernel(case["x"][rows], packed, _scales_and_zeros(case), case["group"])  # type: ignore[no-any-return]


def _dequantized(case: dict[str, Any]) -> torch.Tensor:
    group = case["group"]
    scale = case["scales"].double().T.repeat_interleave(group, 1)
    zero = case["zeros"].double().T.repeat_interleave(group, 1)
    return (case["levels"].double() - 8) * scale + zero  # type: ignore[no-any-return]


def test_the_packing_keeps_every_level() -> None:
    case = _case(48, 64, 1, 32)
    assert torch.equal(unpack_nibbles(case["nibbles"]), case["levels"])
    packed = pack_int4_for_dot_products(case["nibbles"])
    assert packed.shape == (3, 16, 32) and packed.dtype == torch.uint8
    # Block 1, quad 5 (input channels 20-23), output channel 16 + 7, input 20 + 1 and 22 + 1.
    byte = int(packed[1, 5, 2 * 7 + 1])
    assert byte & 0x0F == int(case["levels"][16 + 7, 21]) and byte >> 4 == int(case["levels"][16 + 7, 23])


# 960 x 576: a qkv; 576 x 1536: a down_proj; 48 x 64: less than a tile's 32 channels.
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (48, 64)])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_the_kernel_equals_the_float_product_up_to_float32_sums(
    kernel: Any, out_features: int, in_features: int, group: int, rows: int
) -> None:
    case = _case(out_features, in_features, rows, group)
    y = _call(kernel, case)
    exact = case["x"].double() @ _dequantized(case).T
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    # Level times activation is exact in float32; the float32 sums and the last rounding to
    # bfloat16 (2^-8 relative) are what differ from the exact value.
    bound = exact.abs() * 2.0**-8 + 1e-4 * exact.abs().max()
    assert bool(((y.double() - exact).abs() <= bound).all())
    scales_and_zeros = torch.stack([case["scales"], case["zeros"]], dim=-1).bfloat16()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(case["levels"], 1)
    aten = torch.ops.aten._weight_int4pack_mm_for_cpu(case["x"], packed, group, scales_and_zeros)
    torch.testing.assert_close(y, aten, rtol=2.0**-6, atol=2e-3 * float(exact.abs().max()))


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel: Any) -> None:
    case = _case(960, 576, 37, 32, seed=1)
    case["x"][5] *= 1000  # an attention-sink-like row must not change the others' bits
    together = _call(kernel, case)
    for rows in (1, 2, 3, 5, 8, 16):
        assert torch.equal(_call(kernel, case, slice(0, rows)), together[:rows])
    alone = torch.cat([_call(kernel, case, slice(i, i + 1)) for i in range(37)])
    assert torch.equal(alone, together)


def test_bad_inputs_are_refused_with_a_reason(kernel: Any) -> None:
    case = _case(64, 64, 2, 32)
    packed, scales_and_zeros = pack_int4_for_dot_products(case["nibbles"]), _scales_and_zeros(case)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel(case["x"].float(), packed, scales_and_zeros, 32)
    with pytest.raises(RuntimeError, match="columns"):
        kernel(torch.zeros(2, 30, dtype=torch.bfloat16), packed, scales_and_zeros, 32)
    for group in (48, 2):
        with pytest.raises(RuntimeError, match="group size"):
            kernel(case["x"], packed, scales_and_zeros, group)
    with pytest.raises(RuntimeError, match="scales and zeros"):
        kernel(case["x"], packed, scales_and_zeros[:, :1], 32)
    with pytest.raises(RuntimeError, match="scales and zeros"):
        kernel(case["x"], packed, scales_and_zeros.float(), 32)
    with pytest.raises(RuntimeError, match="packed"):
        kernel(case["x"], case["nibbles"], scales_and_zeros, 32)
    assert kernel(case["x"][:0], packed, scales_and_zeros, 32).shape == (0, 64)


def test_the_linear_takes_the_kernel_where_it_fits_and_aten_elsewhere(kernel: Any) -> None:
    case = _case(96, 64, 5, 32)
    scales_and_zeros = torch.stack([case["scales"], case["zeros"]], dim=-1)
    linear = Int4WoqLinear(case["nibbles"], scales_and_zeros, 32, torch.bfloat16)
    y = linear(case["x"].reshape(5, 1, 64))
    assert y.shape == (5, 1, 96) and linear.kernel is kernel
    assert torch.equal(y.reshape(5, 96), _call(kernel, case))
    # float32 activations: the kernel takes bf16 only, aten's serves them.
    fallback = Int4WoqLinear(case["nibbles"], scales_and_zeros, 32, torch.float32)
    assert fallback.kernel is None
    expected = y.reshape(5, 96)
    torch.testing.assert_close(fallback(case["x"].float()).bfloat16(), expected, rtol=2.0**-6, atol=0.05)
