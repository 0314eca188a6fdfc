"""Decode attention over a batch's KV cache, by cache layout and kernel: what a batched decode step
of the default model's shape (3 KV heads, 9 query heads, head_dim 64) pays per layer.

    .venv/bin/python tools/profiling/attention_kernels.py --out attention.json

Compares, at each batch size, one layer's attention of one new token per row over `--length`
cached positions:

- `ipex-layout block 1`: IPEX's paged kernel (`PagedAttention.single_query_cached_kv_attention`)
  reading the cache in the layout IPEX's decoder graph keeps (`[positions, batch, kv_heads,
  head_dim]`), viewed as blocks of one position: a row's positions are `batch x kv_heads x
  head_dim` elements apart. This is the layout the batch engine held before the paged cache
  (`tools/profiling/ipex_layout.py`).
- `paged block 16`: the same kernel over IPEX's paged layout (`[blocks, kv_heads, 16, head_dim]`):
  each row's positions contiguous in blocks of 16.
- `tierserve paged 16`: tierserve's own kernel (`worker/kernels/decode_attention.cpp`) over the
  same paged layout: one task per row and key/value head, each key read once for the group.
- `torch rows-first`: torch matmuls over `[batch, kv_heads, positions, head_dim]`.

"warm" repeats the call on the same cache (it stays in the CPU's caches); "cold" first reads a
buffer larger than the last-level cache, as a real decode step does when it streams the weights
between two layers' attention. A diagnostic for issue 15, not a benchmark of record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from tierserve.worker.kernels import decode_attention

warnings.filterwarnings("ignore")

KV_HEADS, GROUPS, HEAD_DIM, BLOCK = 3, 3, 64, 16
HEADS = KV_HEADS * GROUPS


def timed(call: Callable[[], object], flush: torch.Tensor | None, repeats: int) -> float:
    """Median microseconds of `call`, after reading `flush` each time when given."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.sum()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def kernels(batch: int, length: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    from intel_extension_for_pytorch.llm.modules import PagedAttention

    loaded = decode_attention.load(decode_attention.default_dir())
    if loaded.kernel is None:
        raise SystemExit(f"tierserve's decode-attention kernel did not build: {loaded.reason}")
    ours = loaded.kernel

    query = torch.randn(batch, HEADS, HEAD_DIM).to(dtype)
    out = torch.empty_like(query)
    heads = torch.arange(KV_HEADS, dtype=torch.int32).repeat_interleave(GROUPS)
    lengths = torch.full((batch,), length, dtype=torch.int32)
    scale = HEAD_DIM**-0.5

    capacity = length + 64
    flat_keys = torch.randn(capacity, batch, KV_HEADS, HEAD_DIM).to(dtype)
    flat_values = torch.randn_like(flat_keys)
    positions = torch.arange(length).view(1, -1) * batch + torch.arange(batch).view(-1, 1)
    flat_tables = positions.to(torch.int32)

    def ipex_layout() -> None:
        PagedAttention.single_query_cached_kv_attention(
            out,
            query,
            flat_keys.view(capacity * batch, KV_HEADS, 1, HEAD_DIM),
            flat_values.view(capacity * batch, KV_HEADS, 1, HEAD_DIM),
            heads,
            scale,
            flat_tables,
            lengths,
            1,
            length,
            None,
        )

    per_row = -(-length // BLOCK)
    block_keys = torch.randn(batch * per_row, KV_HEADS, BLOCK, HEAD_DIM).to(dtype)
    block_values = torch.randn_like(block_keys)
    tables = torch.arange(batch * per_row, dtype=torch.int32).view(batch, per_row)

    def paged() -> None:
        PagedAttention.single_query_cached_kv_attention(
            out, query, block_keys, block_values, heads, scale, tables, lengths, BLOCK, length, None
        )

    def tierserve() -> None:
        ours(out, query, block_keys, block_values, tables, lengths, scale)

    rows_keys = torch.randn(batch, KV_HEADS, length, HEAD_DIM).to(dtype)
    rows_values = torch.randn_like(rows_keys)
    grouped = query.view(batch, KV_HEADS, GROUPS, HEAD_DIM)

    def rows_first() -> torch.Tensor:
        scores = torch.matmul(grouped, rows_keys.transpose(-1, -2)).float() * scale
        return torch.matmul(scores.softmax(-1).to(dtype), rows_values)

    return {
        "ipex-layout block 1": ipex_layout,
        f"paged block {BLOCK}": paged,
        f"tierserve paged {BLOCK}": tierserve,
        "torch rows-first": rows_first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=400, help="cached positions per row")
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    flush = torch.ones(64 * 2**20 // 4)  # 64 MiB: past this machine's last-level cache
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name, call in kernels(batch, args.length, dtype).items():
            row = {
                "batch": batch,
                "kernel": name,
                "warm_us": round(timed(call, None, args.repeats)),
                "cold_us": round(timed(call, flush, args.repeats)),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"length": args.length, "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
