"""A paged KV cache for continuous batching on IPEX's traced decoder graph.

Every tier's decoder graph computes attention with one op (`ipex_internals.ATTENTION_OP`) over the
cache it is handed in `past_key_values`, and only that op reads or writes the cache: the graph
passes the cache tensors through. For the length of each batch forward the op is replaced
(`ipex_internals.attention_op_replaced`) by `_paged_attention`, and the graph is handed, per
layer, the blocks of one shared pool instead of IPEX's own cache. So every tier keeps its traced
graph, its linears and its fused RoPE and RMSNorm, and only attention changes:

- keys and values live in IPEX's paged layout, `[blocks, kv_heads, BLOCK_SIZE, head_dim]`; each
  sequence owns a list of blocks (`PagedRow`) and nothing is copied when a sequence joins or
  leaves the batch, nor padded to the longest;
- a decode step (one new token per row) attends each row over its own length, with tierserve's
  kernel (`decode_attention`, which reads each key once per key/value head) when the pool is
  given it, else IPEX's paged kernel (`single_query_cached_kv_attention`);
- a prompt chunk (one row, several tokens) attends causally over the row's blocks and itself with
  one scaled-dot-product attention in the cache's dtype, wherever the chunk starts.

Why: IPEX's own cache is `[positions, batch, kv_heads, head_dim]`, so one row's positions lie
`batch x kv_heads x head_dim` elements apart, and its kernel reads them one position at a time.
On a Zen 4 that attention took half of an 8-row decode step at 400 cached positions; the paged
layout reads a row's positions in blocks (docs/benchmarks/attention-kernels-*).

The graph is told there is no past, so the mask it builds covers the new tokens only, and it is
not used: each row's length and blocks are in the step's metadata, and each token's position in
`position_ids`. A model with a sliding attention window is not served this way (`attends_in_full`):
the paged kernel has no window.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tierserve.worker.kernels.decode_attention import DTYPES, DecodeKernel, FusedDecode, fused_for
from tierserve.worker.kernels.ipex_internals import (
    PagedAttentionOps,
    attention_op_replaced,
    paged_attention_ops,
)

BLOCK_SIZE = 16

_stepping = threading.Lock()
_current: _Step | None = None


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def attends_in_full(config: Any) -> bool:
    """Whether every position attends to every earlier one (no sliding window), as the paged
    kernel computes."""
    window = getattr(config, "sliding_window", None)
    return not window or not getattr(config, "use_sliding_window", True)


class OutOfBlocks(RuntimeError):
    """The pool has no free block (admission reserves spans, so this means a bookkeeping bug)."""


@dataclass(eq=False)
class PagedRow:
    """One sequence's cache: its blocks in position order and how many positions they hold."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0


@dataclass(frozen=True)
class CacheShape:
    """What the graph's attention caches: per layer, `kv_heads` heads of `head_dim`, in `dtype`."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


class BlockPool:
    """Every layer's key and value blocks, and which are free. Blocks are handed out lowest
    first, so memory the process has touched is reused before new pages are. Decode steps over
    the pool attend with `decode_kernel` where it computes the cache's dtype, else with IPEX's."""

    def __init__(self, shape: CacheShape, num_blocks: int, decode_kernel: DecodeKernel | None = None) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.decode_kernel = decode_kernel if shape.dtype in DTYPES else None
        self.fused_decode = fused_for(self.decode_kernel)
        block = (num_blocks, shape.kv_heads, BLOCK_SIZE, shape.head_dim)
        # Allocated, not written: the OS backs a block's pages when a key is first stored there.
        self.keys = [torch.empty(block, dtype=shape.dtype) for _ in range(shape.layers)]
        self.values = [torch.empty(block, dtype=shape.dtype) for _ in range(shape.layers)]
        self._free = list(range(num_blocks))
        self._lock = threading.Lock()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def block_bytes(self) -> int:
        one = self.shape.kv_heads * BLOCK_SIZE * self.shape.head_dim * self.keys[0].element_size()
        return 2 * self.shape.layers * one

    def grow(self, row: PagedRow, length: int) -> None:
        """Give `row` blocks enough for `length` positions."""
        with self._lock:
            while len(row.blocks) * BLOCK_SIZE < length:
                if not self._free:
                    raise OutOfBlocks(f"the KV cache's {self.num_blocks} blocks are all in use")
                row.blocks.append(heapq.heappop(self._free))

    def release(self, row: PagedRow) -> None:
        with self._lock:
            for block in row.blocks:
                heapq.heappush(self._free, block)
        row.blocks, row.length = [], 0


@dataclass(frozen=True)
class _Chunk:
    """A forward's prompt chunk: the first `tokens` new tokens, one row's, at its positions up to
    `end`."""

    tokens: int
    blocks: torch.Tensor  # the row's blocks holding positions 0..end, int64
    end: int


@dataclass(frozen=True)
class _Step:
    """One forward's new tokens, as the replaced attention op reads them: a prompt chunk's first
    (if any), then one token for each decode row."""

    thread: int
    ops: PagedAttentionOps
    decode_kernel: DecodeKernel | None
    slots: torch.Tensor  # [new tokens] int32, where each new key goes: block x BLOCK_SIZE + offset
    chunk: _Chunk | None
    tables: torch.Tensor  # [decode rows, most blocks] int32, each row's blocks
    lengths: torch.Tensor  # [decode rows] int32, each row's positions after this forward
    longest: int
    # A decode-only step's whole attention op in one call, where tierserve's kernel attends.
    fused: FusedDecode | None = None


def empty_past(num_layers: int, batch: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The past IPEX's own graphs take for a first forward (no cache yet): IPEX's kernel then
    allocates its cache, `[capacity, batch, kv_heads, head_dim]` per layer."""
    return tuple(
        (
            torch.zeros(1, 0, 0, 1, dtype=torch.long),
            torch.zeros([1, 1, 1, 1]),
            torch.zeros([1, 1, 1, 1]),
            torch.zeros(1, batch, dtype=torch.long),
        )
        for _ in range(num_layers)
    )


_shapes: weakref.WeakKeyDictionary[Any, CacheShape] = weakref.WeakKeyDictionary()
_kept_in: weakref.WeakKeyDictionary[Any, torch.dtype] = weakref.WeakKeyDictionary()


def keep_cache_in(model: Any, dtype: torch.dtype) -> None:
    """Keep `model`'s paged cache in `dtype` rather than its attention's precision (a tier's
    choice: int8-sq's bfloat16 halves what a decode step reads). Attention then computes in
    `dtype` too, and hands its output back at the graph's precision."""
    if dtype not in DTYPES:
        raise ValueError(f"a paged cache is kept in one of {DTYPES}, not {dtype}")
    _kept_in[model] = dtype
    _shapes.pop(model, None)


def cache_shape(model: Any) -> CacheShape:
    """The cache the model's graph attends over, from one traced forward of two tokens with IPEX's
    own cache (its dtype is the tier's attention precision, unless `keep_cache_in` said another);
    once per model."""
    shape = _shapes.get(model)
    if shape is None:
        shape = _probed_cache_shape(model)
        shape = _shapes[model] = replace(shape, dtype=_kept_in.get(model, shape.dtype))
    return shape


def _probed_cache_shape(model: Any) -> CacheShape:
    layers = int(model.config.num_hidden_layers)
    ids = torch.tensor([[1, 2]])
    out = model.trace_graph(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=empty_past(layers, 1),
        position_ids=torch.arange(2).unsqueeze(0),
    )
    keys = out[1][0][1]  # [capacity, batch, kv_heads, head_dim]
    return CacheShape(layers, int(keys.shape[2]), int(keys.shape[3]), keys.dtype)


def paged_forward(
    graph: Any,
    pool: BlockPool,
    rows: Sequence[PagedRow],
    ids: torch.Tensor,
    positions: torch.Tensor,
    keep_from: int | None = None,
) -> torch.Tensor:
    """The logits of one forward in which each of `rows` adds the tokens of its row of `ids`
    (decode: one each; a prompt chunk: one row) at `positions`; the rows' caches grow by them.
    `keep_from`: `graph` is a `last_logits.LastPositionGraph`, computing logits from that new
    token on only."""
    new = int(ids.shape[1])
    if new > 1:
        if len(rows) != 1:
            raise ValueError("a forward of several tokens per row takes one row")
        return _forward(graph, pool, rows[0], new, [], ids, positions, keep_from)
    return _forward(graph, pool, None, 0, rows, ids, positions, keep_from)


def packed_forward(
    graph: Any,
    pool: BlockPool,
    chunk_row: PagedRow,
    chunk_ids: torch.Tensor,
    chunk_positions: torch.Tensor,
    rows: Sequence[PagedRow],
    row_ids: torch.Tensor,
    row_positions: torch.Tensor,
    keep_from: int | None = None,
) -> torch.Tensor:
    """One forward of a prompt chunk (`chunk_ids` [1, C] of `chunk_row`) and the next token of each
    decode row (`row_ids` [R]), packed as one sequence of C + R tokens: the linears read their
    weights once for both. Logits [1, tokens kept, vocab]: the chunk's (from `keep_from`, a
    position within the chunk, with a `last_logits.LastPositionGraph`), then each row's."""
    ids = torch.cat([chunk_ids, row_ids.reshape(1, -1)], dim=1)
    positions = torch.cat([chunk_positions, row_positions.reshape(1, -1)], dim=1)
    return _forward(graph, pool, chunk_row, int(chunk_ids.shape[1]), rows, ids, positions, keep_from)


def _forward(
    graph: Any,
    pool: BlockPool,
    chunk_row: PagedRow | None,
    chunk_tokens: int,
    rows: Sequence[PagedRow],
    ids: torch.Tensor,
    positions: torch.Tensor,
    keep_from: int | None,
) -> torch.Tensor:
    global _current
    growing = [*([(chunk_row, chunk_tokens)] if chunk_row is not None else []), *((row, 1) for row in rows)]
    starts = [row.length for row, _ in growing]
    for row, new in growing:
        pool.grow(row, row.length + new)
    step = _step_of(pool, growing, starts, chunk_tokens, rows)
    # The graph is told there is no past, and given a mask of the new tokens only: the mask it
    # builds from them is not read (see the module doc), and some families' traced mask
    # preparation cannot build one for several new tokens over a past (Qwen2's, Mistral's).
    batch = int(ids.shape[0])
    no_past = torch.empty((1, 0, 0, 1), dtype=torch.long)
    no_beams = torch.zeros(1, batch, dtype=torch.long)
    past = tuple((no_past, k, v, no_beams) for k, v in zip(pool.keys, pool.values, strict=True))
    mask = torch.ones(batch, int(ids.shape[1]), dtype=torch.long)
    with _stepping, attention_op_replaced(_paged_attention):
        _current = step
        try:
            trimmed = {} if keep_from is None else {"keep_from": keep_from}
            out = graph(
                input_ids=ids, attention_mask=mask, past_key_values=past, position_ids=positions, **trimmed
            )
        finally:
            _current = None
    for (row, new), start in zip(growing, starts, strict=True):
        row.length = start + new
    logits: torch.Tensor = out[0]
    return logits


def _step_of(
    pool: BlockPool,
    growing: Sequence[tuple[PagedRow, int]],
    starts: list[int],
    chunk_tokens: int,
    rows: Sequence[PagedRow],
) -> _Step:
    slots = [
        row.blocks[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
        for (row, new), start in zip(growing, starts, strict=True)
        for position in range(start, start + new)
    ]
    chunk = None
    if chunk_tokens:
        end = starts[0] + chunk_tokens
        blocks = torch.tensor(growing[0][0].blocks[: blocks_for(end)], dtype=torch.long)
        chunk = _Chunk(chunk_tokens, blocks, end)
    widest = max((len(row.blocks) for row in rows), default=0)
    tables = torch.zeros(len(rows), widest, dtype=torch.int32)
    for index, row in enumerate(rows):
        tables[index, : len(row.blocks)] = torch.tensor(row.blocks, dtype=torch.int32)
    lengths = [start + 1 for start in starts[1 if chunk_tokens else 0 :]]
    return _Step(
        thread=threading.get_ident(),
        ops=_ops(),
        decode_kernel=pool.decode_kernel,
        slots=torch.tensor(slots, dtype=torch.int32),
        chunk=chunk,
        tables=tables,
        lengths=torch.tensor(lengths, dtype=torch.int32),
        longest=max(lengths, default=0),
        fused=pool.fused_decode if chunk is None else None,
    )


def _paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    beam_idx: torch.Tensor,
    seq_info: torch.Tensor,
    scale_attn: float,
    max_positions: int,
    head_mask: Any,
    attention_mask: Any,
    add_casual_mask: Any = None,
) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPEX's attention op over the pool's blocks for `_current`'s tokens (see the module doc).
    query `[batch, new, heads, head_dim]`, key and value `[batch, new, kv_heads, head_dim]`; the
    output is `[batch, heads, new, head_dim]` laid out as `[batch, new, heads, head_dim]`, as
    IPEX's op hands it back (the graphs read it in that layout whatever its strides say)."""
    step = _current
    if step is None or step.thread != threading.get_ident():
        # Another thread's forward while a paged step runs: never attend over the wrong cache.
        raise RuntimeError("IPEX's attention op was called outside the paged step that replaced it")
    if step.fused is not None:
        # A dozen torch calls from Python below cost about 60 us a layer; this is one.
        out = step.fused(
            query, key, value, key_cache, value_cache, step.slots, step.tables, step.lengths, 1.0 / scale_attn
        )
        return out, None, key_cache, value_cache, beam_idx
    batch, new, heads, head_dim = (int(n) for n in query.shape)
    kv_heads, tokens = int(key.shape[2]), batch * new
    step.ops.reshape_and_cache(
        key.reshape(tokens, kv_heads, head_dim).to(key_cache.dtype),
        value.reshape(tokens, kv_heads, head_dim).to(value_cache.dtype),
        key_cache,
        value_cache,
        step.slots,
        "auto",
        1.0,
        1.0,
    )
    out = torch.empty(batch, new, heads, head_dim, dtype=key_cache.dtype)
    flat, queries = out.view(tokens, heads, head_dim), query.reshape(tokens, heads, head_dim)
    chunked = 0
    if step.chunk is not None:
        chunked = step.chunk.tokens
        flat[:chunked] = _chunk_attention(queries[:chunked], key_cache, value_cache, step.chunk, scale_attn)
    if chunked < tokens:
        single = queries[chunked:].to(key_cache.dtype).contiguous()
        _decode_attention(flat[chunked:], single, key_cache, value_cache, step, kv_heads, scale_attn)
    return out.transpose(1, 2).to(query.dtype), None, key_cache, value_cache, beam_idx


def _decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    step: _Step,
    kv_heads: int,
    scale_attn: float,
) -> None:
    """Each decode row's one query `[rows, heads, head_dim]` over its own length, into `out`."""
    if step.decode_kernel is not None:
        step.decode_kernel(out, query, key_cache, value_cache, step.tables, step.lengths, 1.0 / scale_attn)
        return
    step.ops.single_query_cached_kv_attention(
        out,
        query,
        key_cache,
        value_cache,
        _head_mapping(int(query.shape[1]), kv_heads),
        1.0 / scale_attn,
        step.tables,
        step.lengths,
        BLOCK_SIZE,
        step.longest,
        None,  # alibi slopes
        -1,  # no window
        1.0,
        1.0,
        -1.0,  # no softcap
    )


def _chunk_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, chunk: _Chunk, scale_attn: float
) -> torch.Tensor:
    """Causal attention of one row's chunk `[new, heads, head_dim]` over the row's blocks (itself
    included), in the cache's dtype as IPEX's own prefill: `[new, heads, head_dim]`."""
    new, heads = int(query.shape[0]), int(query.shape[1])
    start = chunk.end - new
    kv_heads, head_dim = int(key_cache.shape[1]), int(key_cache.shape[3])

    def gathered(cache: torch.Tensor) -> torch.Tensor:
        # [blocks, kv_heads, BLOCK_SIZE, head_dim] -> [1, heads, end, head_dim]. Four dimensions,
        # each query head its own keys: torch's fused CPU attention then takes it (at 400 tokens
        # on an AMX Xeon 0.9 ms per layer, against 4.6 for three dimensions in float32 and 2.1
        # for IPEX's paged varlen kernel).
        rows = cache.index_select(0, chunk.blocks).transpose(0, 1).reshape(kv_heads, -1, head_dim)
        return rows[:, : chunk.end].repeat_interleave(heads // kv_heads, dim=0).unsqueeze(0)

    q = query.transpose(0, 1).unsqueeze(0).to(key_cache.dtype)
    visible = torch.ones(new, chunk.end, dtype=torch.bool).tril(diagonal=start)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, gathered(key_cache), gathered(value_cache), attn_mask=visible, scale=1.0 / scale_attn
    )
    return out[0].transpose(0, 1)


_resolved: list[PagedAttentionOps] = []


def _ops() -> PagedAttentionOps:
    if not _resolved:
        _resolved.append(paged_attention_ops())
    return _resolved[0]


_head_maps: dict[tuple[int, int], torch.Tensor] = {}


def _head_mapping(heads: int, kv_heads: int) -> torch.Tensor:
    """Each query head's key/value head (grouped-query attention shares them in order)."""
    mapping = _head_maps.get((heads, kv_heads))
    if mapping is None:
        mapping = torch.arange(kv_heads, dtype=torch.int32).repeat_interleave(heads // kv_heads)
        _head_maps[(heads, kv_heads)] = mapping
    return mapping
