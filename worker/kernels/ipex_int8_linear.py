"""An int8 weight-only linear on IPEX's kernel, for a layer that sees many rows at once (a
prompt chunk, a batch of decode rows), with each row's result independent of the others.

PyTorch's `_weight_int8pack_mm` dequantizes the weight again for every 4 rows: on an AMX Xeon a
576 x 1536 matrix took 138 us for 9 rows and 2.55 ms for 257, against 88 us and 0.66 ms with IPEX's
weight-only kernel computing in bfloat16, padded as below (docs/benchmarks/int8-linears-*). That
kernel takes another path below 5 rows, which rounds differently, so every call adds `PADDING`
zero rows: then a row gets the same bits whatever shares its call, as the batch engine's
per-sequence semantics need (a greedy text the same alone and in a batch). One row then costs
more (81 against 40 us eagerly; in the traced graph a one-row decode step up to 0.9 ms of 13).
`rows_independent` checks that on the layer's own weights when it is made; a layer that fails
keeps aten's kernel. IPEX's weight-only kernels are fast only with AMX and AVX512_FP16
(`CpuIsa.ipex_woq_fast`); elsewhere they dequantize every weight at every call.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from tierserve.worker.kernels import ipex_internals

# Zero rows added to every call: with them IPEX's kernel always takes its path for 5 rows or more.
PADDING = 4
# Rows of the independence probe: one alone, a decode batch, a prompt chunk.
_PROBE_ROWS = (1, 9, 300)


@functools.cache
def _bf16_qconfig() -> Any:
    """int8 weights per output channel, bfloat16 compute."""
    return ipex_internals.woq_qconfig(8, "BF16", -1).global_qconfig


class IpexInt8WoqLinear(nn.Module):
    """y = x @ (qweight * scales).T on IPEX's weight-only kernel with bfloat16 inputs, returned at
    `output`."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, output: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self.output = output
        self.linear = ipex_internals.int8_woq_linear(qweight, scales, _bf16_qconfig())
        self.padding: torch.Tensor
        self.register_buffer("padding", torch.zeros(PADDING, self.in_features, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        # Always padded, never by a branch on the row count: the traced graph keeps one path.
        y: torch.Tensor = self.linear(torch.cat([flat, self.padding]))[:-PADDING]
        return y.reshape(*x.shape[:-1], self.out_features).to(self.output)


def rows_independent(linear: Any, seed: int = 0) -> bool:
    """Whether the first row of a random input comes out the same bits alone as in calls of
    `_PROBE_ROWS` rows."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(max(_PROBE_ROWS), int(linear.in_features), generator=generator)
    with torch.inference_mode():
        firsts = [linear(probe[:rows])[0] for rows in _PROBE_ROWS]
    return all(torch.equal(firsts[0], first) for first in firsts[1:])
