"""int8-sq's weight-only down_proj on IPEX's kernel: the right product, each row's bits the same
alone and in a batch (or aten's kernel instead), and the batch's KV cache a tier may keep in
bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import paged_kv
from tierserve.worker.kernels import scheme as scheme_module
from tierserve.worker.kernels.ipex_int8_linear import IpexInt8WoqLinear, rows_independent
from tierserve.worker.kernels.linears import Int8WoqLinear
from tierserve.worker.kernels.quantizers import quantize_int8
from tierserve.worker.kernels.scheme import NativeScheme, down_linear
from tierserve.worker.tiers.base import make_tier


def quantized(out_features: int, in_features: int, seed: int) -> dict[str, torch.Tensor]:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_int8(weight)


def down_scheme(on_ipex: bool) -> NativeScheme:
    return NativeScheme(
        bits=8,
        group_size=0,
        head_bits=8,
        activations=torch.float32,
        dynamic_layers=True,
        int16_sums=False,
        down_weight_only=True,
        down_on_ipex=on_ipex,
    )


@pytest.mark.parametrize("shape", [(48, 64), (576, 1536)], ids=["tiny", "default-model"])
def test_ipex_down_proj_computes_the_product_at_bf16_precision_for_any_row_count(
    shape: tuple[int, int],
) -> None:
    q8 = quantized(*shape, seed=1)
    linear = IpexInt8WoqLinear(q8["qweight"], q8["scales"], torch.float32)
    exact = q8["qweight"].double() * q8["scales"].double()[:, None]
    for rows in (1, 3, 9, 40):
        x = torch.randn(2, rows, shape[1])
        y = linear(x)
        assert y.shape == (2, rows, shape[0]) and y.dtype == torch.float32
        expected = x.to(torch.bfloat16).double() @ exact.T
        assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-2


def test_the_independence_check_catches_a_kernel_whose_rows_depend_on_the_batch() -> None:
    class BatchDependent(torch.nn.Module):
        in_features = 16

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x.shape[0]

    class Independent(BatchDependent):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0

    assert not rows_independent(BatchDependent())
    assert rows_independent(Independent())


def test_a_down_proj_on_ipex_gives_every_row_the_same_bits_alone_and_in_a_batch() -> None:
    """Whichever kernel `down_linear` settles on (IPEX's, padded, or aten's where IPEX's rows
    depend on the batch), a row's result alone equals its result among 9 and among 300 rows."""
    q8 = quantized(576, 1536, seed=2)
    tensors = {"layers.0.down.qweight": q8["qweight"], "layers.0.down.scales": q8["scales"]}
    linear = down_linear(tensors, "layers.0.down", down_scheme(on_ipex=True))
    x = torch.randn(300, 1536)
    together = linear(x)
    for rows in (1, 2, 4, 9):
        assert torch.equal(linear(x[:rows]), together[:rows])


def test_a_down_proj_whose_ipex_rows_depend_on_the_batch_keeps_aten_s_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q8 = quantized(48, 64, seed=3)
    tensors = {"layers.0.down.qweight": q8["qweight"], "layers.0.down.scales": q8["scales"]}
    assert isinstance(down_linear(tensors, "layers.0.down", down_scheme(on_ipex=False)), Int8WoqLinear)
    monkeypatch.setattr(scheme_module, "rows_independent", lambda linear: False)
    assert isinstance(down_linear(tensors, "layers.0.down", down_scheme(on_ipex=True)), Int8WoqLinear)
    monkeypatch.setattr(scheme_module, "rows_independent", lambda linear: True)
    assert isinstance(down_linear(tensors, "layers.0.down", down_scheme(on_ipex=True)), IpexInt8WoqLinear)


@pytest.mark.skipif(
    not CpuIsa.detect().ipex_bf16, reason="a tier keeps its cache in bf16 only where the CPU has bf16 kernels"
)
def test_a_float32_graph_may_keep_its_batch_cache_in_bf16(llama_dir: Path) -> None:
    """The fp32 tier's graph over a bfloat16 paged cache: the cache is bf16, the logits float32 and
    within bf16's rounding of those over a float32 cache (a random model's logits have near ties,
    so its greedy tokens may part here and there; a wrong cache would part everywhere)."""
    loaded = make_tier("fp32").load(llama_dir, llama_dir)
    model = loaded.model
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(24).unsqueeze(0)
    with torch.inference_mode():
        float_cache = paged_kv.cache_shape(model)
        assert float_cache.dtype == torch.float32
        reference = paged_kv.paged_forward(
            model.trace_graph, paged_kv.BlockPool(float_cache, 4), [paged_kv.PagedRow()], ids, positions
        )
        paged_kv.keep_cache_in(model, torch.bfloat16)
        bf16_cache = paged_kv.cache_shape(model)
        assert bf16_cache == float_cache.__class__(
            float_cache.layers, float_cache.kv_heads, float_cache.head_dim, torch.bfloat16
        )
        pool, row = paged_kv.BlockPool(bf16_cache, 4), paged_kv.PagedRow()
        logits = paged_kv.paged_forward(model.trace_graph, pool, [row], ids, positions)
        step = paged_kv.paged_forward(model.trace_graph, pool, [row], ids[:, -1:], torch.tensor([[24]]))
    assert pool.keys[0].dtype == torch.bfloat16 and logits.dtype == torch.float32
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    assert kl.item() < 2e-3  # 0.0003 measured; a cache read at wrong positions is nats away
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.8
    assert torch.isfinite(step).all() and row.length == 25
    with pytest.raises(ValueError, match="kept in one of"):
        paged_kv.keep_cache_in(model, torch.float16)
