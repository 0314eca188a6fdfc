"""Continuing a prompt's prefill over the KV cache of its earlier chunks, on IPEX 2.8's
optimized decoder (chunked prefill).

The first chunk of a prompt has no cache and goes through the traced graph (`trace_graph`) like
any prefill. Later chunks cannot: the graph was traced with a causal 4-D mask built for a query
without past, and IPEX's attention, given a multi-token query over an existing cache, applies
only that mask's first row to every query, so every query but the first sees the wrong
positions. They go through the eager optimized model (the same object, called directly), with
two stand-ins for the length of one forward:

- the decoder's mask preparation returns the given mask unchanged (a 4-D mask of zeros: one
  row, no padding), where it would add a second causal mask built without the past (Llama:
  IPEX's `_prepare_decoder_attention_mask`) or invert the mask (other families: transformers'
  `_prepare_4d_causal_attention_mask`);
- IPEX's attention over its cache (`_IPEXScaleDotProductCPU`) becomes `_chunk_attention`: one
  causal attention of the chunk over the cache and itself. IPEX's kernel does this right but is
  built for one new token per row, and scales with chunk x past far worse than a matrix product.

A prompt longer than a model's sliding attention window (Mistral's) is not chunked
(`chunkable`): the chunk's mask carries no window.

The stand-ins are installed only inside `continue_prefill`, and a lock keeps two chunks from
overlapping on one process. The traced graph never calls the eager decoder's mask preparation.
In a worker nothing else runs an eager forward while batching is on (warm-up and the accuracy
card finish before the batch engine starts, and requests then go only through it); should another
thread's forward still consult a stand-in (IPEX's Mistral and Qwen2 forwards consult it for
2-D masks too), it gets the decoder's own preparation, or an error where the decoder has none:
never a silently wrong mask. Checked against a whole-prompt prefill by the
unit tests and, on each worker's own model, at start (`worker/batching/startup.py`), so an IPEX
version or tier where this does not hold falls back to whole-prompt prefill with a notice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from tierserve.worker.kernels.iakv_cache import BatchKvCache, empty_past, layer_caches
from tierserve.worker.kernels.ipex_internals import indirect_kv_attention_class

_HOOK = "_prepare_decoder_attention_mask"
_MISSING = object()
_patching = threading.Lock()


def chunkable(model: Any, prompt_tokens: int) -> bool:
    """Whether a prompt this long may be prefilled in chunks: not past a sliding attention window
    (the zero mask carries no window, and the kernel would apply only one row of a mask that did)."""
    window = _sliding_window(model.config)
    return window is None or prompt_tokens <= window


def continue_prefill(model: Any, ids: torch.Tensor, past: Any, start: int) -> tuple[torch.Tensor, Any]:
    """(logits, past) of the one-row chunk `ids` at positions `start`.., appended to `past`: an
    IPEX indirect-access cache of that row's first `start` positions (`BatchKvCache`'s)."""
    new = int(ids.shape[1])
    dtype = model.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    mask = torch.zeros(1, 1, new, start + new, dtype=dtype)
    positions = torch.arange(start, start + new).unsqueeze(0)
    with _patching, _mask_taken_as_given(model.get_decoder()), _attention_over_past():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=past,
            position_ids=positions,
            return_dict=False,
        )
    return out[0], out[1]


def _sliding_window(config: Any) -> int | None:
    """The attention window of a model that uses one (Mistral's; Qwen2's when turned on)."""
    window = getattr(config, "sliding_window", None)
    return int(window) if window and getattr(config, "use_sliding_window", True) else None


@contextmanager
def _mask_taken_as_given(decoder: Any) -> Iterator[None]:
    own = vars(decoder).get(_HOOK, _MISSING)
    original = getattr(decoder, _HOOK, None)  # the instance's, or the class's bound method
    chunking_thread = threading.get_ident()

    def as_given(
        mask: torch.Tensor, input_shape: Any, inputs_embeds: Any, past_length: Any, **options: Any
    ) -> torch.Tensor:
        # `options`: e.g. Mistral's sliding_window (`chunkable` keeps prompts within it).
        if threading.get_ident() == chunking_thread:
            return mask
        if original is None:
            raise RuntimeError("the decoder's mask preparation is replaced while a chunk is prefilled")
        prepared: torch.Tensor = original(mask, input_shape, inputs_embeds, past_length, **options)
        return prepared

    setattr(decoder, _HOOK, as_given)
    try:
        yield
    finally:
        if own is _MISSING:
            delattr(decoder, _HOOK)
        else:
            setattr(decoder, _HOOK, own)


@contextmanager
def _attention_over_past() -> Iterator[None]:
    """IPEX's attention module computes a chunk over the cache with `_chunk_attention`, in the
    chunking thread only (every other caller gets IPEX's own)."""
    attention = indirect_kv_attention_class()
    original = attention.forward
    chunking_thread = threading.get_ident()

    def forward(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale_attn: float,
        layer_past: Any = None,
        *rest: Any,
        **options: Any,
    ) -> Any:
        if threading.get_ident() == chunking_thread and layer_past is not None and _offset(layer_past) > 0:
            return _chunk_attention(query, key, value, scale_attn, layer_past)
        return original(module, query, key, value, scale_attn, layer_past, *rest, **options)

    attention.forward = forward
    try:
        yield
    finally:
        attention.forward = original


def _offset(layer_past: Any) -> int:
    return int(layer_past[0].size(-2))


def _chunk_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale_attn: float, layer_past: Any
) -> tuple[torch.Tensor, None, tuple[torch.Tensor, ...]]:
    """Causal attention of a one-row chunk over its cache, in IPEX's shapes: query
    `[1, new, heads, head_dim]`, key and value `[1, new, kv_heads, head_dim]`, the cache
    `[capacity, 1, kv_heads, head_dim]`; the scores are divided by `scale_attn`, as IPEX's are.

    IPEX's own kernel (`masked_multihead_self_attention`) is built for one new token per row: given
    a chunk it took 7 s for 256 tokens over 1,792 cached ones on the default model (one traced
    forward of all 2,048 takes 6 s). Here the chunk's keys and values are appended to the cache and
    one scaled-dot-product attention with an offset causal mask covers the chunk, in fp32 as IPEX
    accumulates. The padding mask is not needed: a prefilling row has no padding."""
    start = _offset(layer_past)
    new = int(query.shape[1])
    end = start + new
    cache_keys, cache_values = layer_past[1], layer_past[2]
    keys = torch.cat([cache_keys[:start], key.transpose(0, 1).to(cache_keys.dtype)])
    values = torch.cat([cache_values[:start], value.transpose(0, 1).to(cache_values.dtype)])
    groups = int(query.shape[2]) // int(key.shape[2])
    # [heads, positions, head_dim]; grouped-query models share each key and value head.
    q = query[0].transpose(0, 1).float()
    k = keys[:, 0].transpose(0, 1).float().repeat_interleave(groups, dim=0)
    v = values[:, 0].transpose(0, 1).float().repeat_interleave(groups, dim=0)
    visible = torch.ones(new, end, dtype=torch.bool).tril(diagonal=start)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=1.0 / scale_attn)
    # Only the first tensor's shape is read (the offset), as in `BatchKvCache.past_key_values`.
    present = (
        torch.empty((1, 0, end, 1), dtype=torch.long),
        keys,
        values,
        torch.zeros(end + 2, 1, dtype=torch.long),
    )
    return out.unsqueeze(0).to(query.dtype), None, present


# Two correct prefills of the same prompt, in float32, give last logits this close (measured:
# about 1e-5 on the tiny models, 5e-5 on the default model).
FLOAT32_CHUNKING_TOLERANCE = 0.01
# In a lower precision, every layer rounds its output, so two correct prefills that split the work
# differently part by rounding noise: on a Zen 4 (AVX512_BF16), the default model's chunked and
# one-forward bf16 logits were 0.25 to 0.375 apart (up to 3 units in the last place, 0.125, at
# its largest logit, 29) while each was within 0.28 of float32's. A broken chunk (wrong mask rows,
# a stale cache) moves logits by whole units.
_ROUNDING_UNITS = 4


class ChunkingError(NamedTuple):
    """How far a chunked prefill's last logits are from those of one forward, and how far two
    correct prefills in the logits' precision may be."""

    difference: float
    tolerance: float

    @property
    def acceptable(self) -> bool:
        return self.difference <= self.tolerance  # NaN fails too


def chunking_tolerance(logits: torch.Tensor) -> float:
    """The largest difference two correct prefills may show in `logits`' precision."""
    if logits.dtype == torch.float32:
        return FLOAT32_CHUNKING_TOLERANCE
    # eps x |x| bounds a unit in the last place at |x|.
    unit = torch.finfo(logits.dtype).eps * float(logits.float().abs().max())
    return max(FLOAT32_CHUNKING_TOLERANCE, _ROUNDING_UNITS * unit)


def chunking_error(model: Any, ids: torch.Tensor, split: int) -> ChunkingError:
    """The largest difference between the last position's logits after a prefill of the one-row
    `ids` in one traced forward and after one in two chunks (the first `split` tokens through the
    graph, the rest through `continue_prefill`), and what that precision allows."""
    layers = int(model.config.num_hidden_layers)

    def traced(part: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = model.trace_graph(
            input_ids=part,
            attention_mask=torch.ones_like(part),
            past_key_values=empty_past(layers, 1),
            position_ids=torch.arange(int(part.shape[1])).unsqueeze(0),
        )
        return out[0], out[1]

    whole, _ = traced(ids)
    _, past = traced(ids[:, :split])
    cache = BatchKvCache.of_sequence(layer_caches(past), split)
    chunked, _ = continue_prefill(model, ids[:, split:], cache.past_key_values(), split)
    last = whole[0, -1]
    difference = float((last.float() - chunked[0, -1].float()).abs().max())
    return ChunkingError(difference, chunking_tolerance(last))
