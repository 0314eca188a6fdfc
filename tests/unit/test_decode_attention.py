"""tierserve's decode-attention kernel (worker/kernels/decode_attention.cpp) against attention
computed in float64 and against IPEX's paged kernel, on scattered block tables, grouped heads
and rows of different lengths; bad tables are refused with an error, and a kernel that cannot
be built leaves IPEX's in place with the reason."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.unit.conftest import tierserve_kernel
from tierserve.worker.kernels import decode_attention
from tierserve.worker.kernels.ipex_internals import paged_attention_ops

BLOCK = 16


def paged_case(
    lengths: list[int], kv_heads: int, groups: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A cache of scattered blocks (each row's blocks in shuffled order) and one query per row."""
    generator = torch.Generator().manual_seed(seed)
    per_row = [math.ceil(n / BLOCK) for n in lengths]
    total = sum(per_row) + 3  # spare blocks no row owns
    order = torch.randperm(total, generator=generator)
    tables = torch.zeros(len(lengths), max(per_row), dtype=torch.int32)
    taken = 0
    for row, count in enumerate(per_row):
        tables[row, :count] = order[taken : taken + count]
        taken += count
    shape = (total, kv_heads, BLOCK, head_dim)
    return {
        "query": torch.randn(len(lengths), kv_heads * groups, head_dim, generator=generator).to(dtype),
        "keys": torch.randn(shape, generator=generator).to(dtype),
        "values": torch.randn(shape, generator=generator).to(dtype),
        "tables": tables,
        "lengths": torch.tensor(lengths, dtype=torch.int32),
    }


def reference(case: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """Attention in float64, each row over its own positions gathered from its blocks."""
    query, keys, values = (case[name].double() for name in ("query", "keys", "values"))
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    groups = query.shape[1] // kv_heads
    out = []
    for row, length in enumerate(case["lengths"].tolist()):
        blocks = case["tables"][row, : math.ceil(length / BLOCK)].long()

        def gathered(
            cache: torch.Tensor, blocks: torch.Tensor = blocks, length: int = length
        ) -> torch.Tensor:
            rows = cache[blocks].transpose(0, 1).reshape(kv_heads, -1, head_dim)[:, :length]
            return rows.repeat_interleave(groups, dim=0)  # [heads, length, head_dim]

        scores = torch.einsum("hd,hld->hl", query[row], gathered(keys)) * scale
        out.append(torch.einsum("hl,hld->hd", scores.softmax(-1), gathered(values)))
    return torch.stack(out)


def run_tierserve(case: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    out = torch.empty_like(case["query"])
    kernel = tierserve_kernel()
    kernel(out, case["query"], case["keys"], case["values"], case["tables"], case["lengths"], scale)
    return out


def run_ipex(case: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    out = torch.empty_like(case["query"])
    heads, kv_heads = case["query"].shape[1], case["keys"].shape[1]
    mapping = torch.arange(kv_heads, dtype=torch.int32).repeat_interleave(heads // kv_heads)
    longest = int(case["lengths"].max())
    paged_attention_ops().single_query_cached_kv_attention(
        out,
        case["query"],
        case["keys"],
        case["values"],
        mapping,
        scale,
        case["tables"],
        case["lengths"],
        BLOCK,
        longest,
        None,
        -1,
        1.0,
        1.0,
        -1.0,
    )
    return out


# head_dim 64 and 128 take the kernel's unrolled paths, 48 its general one; groups 1 (no
# sharing), 3 (the default model) and 7 (Qwen2-0.5B's 14 heads over 2).
SHAPES = [(3, 3, 64), (2, 7, 128), (4, 1, 48), (1, 4, 64)]
LENGTHS = [1, 15, 16, 17, 400, 33]


@pytest.mark.parametrize(("kv_heads", "groups", "head_dim"), SHAPES)
def test_float32_matches_attention_in_float64(kv_heads: int, groups: int, head_dim: int) -> None:
    case = paged_case(LENGTHS, kv_heads, groups, head_dim, torch.float32)
    scale = head_dim**-0.5
    torch.testing.assert_close(
        run_tierserve(case, scale).double(), reference(case, scale), atol=2e-6, rtol=1e-5
    )


@pytest.mark.parametrize(("kv_heads", "groups", "head_dim"), SHAPES)
def test_bfloat16_is_as_close_to_float64_as_ipexs_kernel(kv_heads: int, groups: int, head_dim: int) -> None:
    """Both accumulate in float32 and round the output to bf16: each is within one bf16 rounding
    of the exact result, and the two differ by at most one unit in the last place."""
    case = paged_case(LENGTHS, kv_heads, groups, head_dim, torch.bfloat16, seed=1)
    scale = head_dim**-0.5
    exact = reference(case, scale)
    ours, ipex = run_tierserve(case, scale), run_ipex(case, scale)
    ulp = exact.abs().clamp(min=2**-10) * 2**-7
    assert ((ours.double() - exact).abs() <= ulp).all()
    assert ((ipex.double() - exact).abs() <= ulp).all()
    assert ((ours.double() - ipex.double()).abs() <= ulp).all()


def test_float32_agrees_with_ipexs_kernel() -> None:
    case = paged_case(LENGTHS, 3, 3, 64, torch.float32, seed=2)
    torch.testing.assert_close(run_tierserve(case, 0.125), run_ipex(case, 0.125), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["tables"].__setitem__((0, 0), 10_000), "names no block"),
        (lambda c: c["tables"].__setitem__((1, 0), -1), "names no block"),
        (lambda c: c["lengths"].__setitem__(0, 10_000), "outside its block table"),
        (lambda c: c["lengths"].__setitem__(0, 0), "outside its block table"),
        (lambda c: c.__setitem__("lengths", c["lengths"].long()), "int32"),
        (lambda c: c.__setitem__("query", c["query"].double()), "dtype"),
        (lambda c: c.__setitem__("query", c["query"][:, :5]), "multiple of kv_heads"),
    ],
)
def test_bad_input_is_refused_with_an_error(change: object, message: str) -> None:
    case = paged_case([20, 3], 3, 3, 64, torch.float32)
    change(case)  # type: ignore[operator]
    out = torch.empty(case["query"].shape, dtype=case["keys"].dtype)
    with pytest.raises(RuntimeError, match=message):
        tierserve_kernel()(
            out, case["query"], case["keys"], case["values"], case["tables"], case["lengths"], 0.125
        )


@pytest.mark.parametrize(
    ("graph_dtype", "cache_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
def test_the_fused_decode_op_equals_ipexs_store_then_the_kernel(
    graph_dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    """`paged_decode` (one call a layer) against what the attention op did in Python: the new keys
    and values stored by IPEX's reshape_and_cache, the query cast to the cache's dtype, the kernel,
    and the output cast back, laid out as [rows, heads, 1, dim]."""
    kernel = tierserve_kernel()
    fused = decode_attention.fused_for(kernel)
    assert fused is not None
    case = paged_case([5, 17, 40], 3, 3, 64, cache_dtype, seed=3)
    rows, heads, dim = case["query"].shape
    # Each row's new position is its last one, in its own last block.
    last = (case["lengths"] - 1).long()
    slots = (case["tables"][torch.arange(rows), last // BLOCK] * BLOCK + last % BLOCK).to(torch.int32)
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(rows, 1, heads, dim, generator=generator).to(graph_dtype)
    key, value = (torch.randn(rows, 1, 3, dim, generator=generator).to(graph_dtype) for _ in range(2))
    caches = {name: (case["keys"].clone(), case["values"].clone()) for name in ("fused", "unfused")}
    out = fused(query, key, value, *caches["fused"], slots, case["tables"], case["lengths"], 0.125)

    keys, values = caches["unfused"]
    paged_attention_ops().reshape_and_cache(
        key.reshape(rows, 3, dim).to(cache_dtype),
        value.reshape(rows, 3, dim).to(cache_dtype),
        keys,
        values,
        slots,
        "auto",
        1.0,
        1.0,
    )
    expected = torch.empty(rows, 1, heads, dim, dtype=cache_dtype)
    kernel(
        expected.view(rows, heads, dim),
        query.reshape(rows, heads, dim).to(cache_dtype).contiguous(),
        keys,
        values,
        case["tables"],
        case["lengths"],
        0.125,
    )
    assert torch.equal(caches["fused"][0], keys) and torch.equal(caches["fused"][1], values)
    assert out.dtype == graph_dtype and out.shape == (rows, heads, 1, dim)
    assert torch.equal(out, expected.transpose(1, 2).to(graph_dtype))
    assert out.transpose(1, 2).is_contiguous()  # the memory layout the graphs read


def test_the_fused_decode_op_refuses_a_slot_outside_the_cache() -> None:
    fused = decode_attention.fused_for(tierserve_kernel())
    assert fused is not None
    case = paged_case([5, 17], 3, 3, 64, torch.float32)
    query = torch.zeros(2, 1, 9, 64)
    key = torch.zeros(2, 1, 3, 64)
    slots = torch.tensor([0, case["keys"].shape[0] * BLOCK], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        fused(query, key, key, case["keys"], case["values"], slots, case["tables"], case["lengths"], 0.125)


def test_another_decode_kernel_is_not_fused() -> None:
    assert decode_attention.fused_for(lambda *args: None) is None
    assert decode_attention.fused_for(None) is None


def test_a_kernel_that_cannot_be_built_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(decode_attention, "SOURCES", (broken,))
    loaded = decode_attention._load(tmp_path / "cache")
    assert loaded.kernel is None and "the build failed" in loaded.reason and "error" in loaded.reason
    assert not list((tmp_path / "cache").glob("*.so")) and not list((tmp_path / "cache").glob("build-*"))


def test_the_built_library_is_named_by_its_source_and_reused(tmp_path: Path) -> None:
    first = decode_attention._digest()
    assert decode_attention._digest() == first and len(first) == 16
    tierserve_kernel()  # built (or found) in the default cache
    libraries = list(decode_attention.default_dir().glob(f"tierserve_decode_attention_{first}.so"))
    assert len(libraries) == 1
