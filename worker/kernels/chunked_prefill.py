"""Continuing a prompt's prefill over the KV cache of its earlier chunks, on IPEX 2.8's
optimized decoder (chunked prefill).

The first chunk of a prompt has no cache and goes through the traced graph (`trace_graph`) like
any prefill. Later chunks cannot: the graph was traced with a causal 4-D mask built for a query
without past, and IPEX's attention, given a multi-token query over an existing cache, applies
only that mask's first row to every query, so every query but the first sees the wrong
positions. The eager optimized model (the same object, called directly) does it right when it
gets a 4-D mask that only marks padding (zeros here: one row, no padding): IPEX's fused
attention kernel (`masked_multihead_self_attention`) applies causality over past and new
positions itself. What stands in the way is the decoder's mask preparation, which would add a
second causal mask built without the past (Llama: IPEX's `_prepare_decoder_attention_mask`)
or invert the mask (other families: transformers' `_prepare_4d_causal_attention_mask`). So for
the length of one forward the decoder gets a `_prepare_decoder_attention_mask` that returns the
given mask unchanged, and its own comes back after. A prompt longer than a model's sliding
attention window (Mistral's) is not chunked (`chunkable`): this mask cannot carry the window.

That stand-in is installed only inside `continue_prefill`, and a lock keeps two chunks from
overlapping on one process. The traced graph never calls the eager decoder's mask preparation.
In a worker nothing else runs an eager forward while batching is on (warm-up and the accuracy
card finish before the batch engine starts, and requests then go only through it); should another
thread's forward still consult the stand-in (IPEX's Mistral and Qwen2 forwards consult it for
2-D masks too), it gets the decoder's own preparation, or an error where the decoder has none:
never a silently wrong mask. Checked against a whole-prompt prefill by the
unit tests and, on each worker's own model, at start (`worker/batching/startup.py`), so an IPEX
version or tier where this does not hold falls back to whole-prompt prefill with a notice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tierserve.worker.kernels.iakv_cache import BatchKvCache, empty_past, layer_caches

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
    with _mask_taken_as_given(model.get_decoder()):
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
    with _patching:
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


def chunking_error(model: Any, ids: torch.Tensor, split: int) -> float:
    """Largest difference between the last position's logits after a prefill of the one-row `ids`
    in one traced forward and after one in two chunks (the first `split` tokens through the graph,
    the rest through `continue_prefill`): about 1e-4 where the eager path is exact."""
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
    return float((whole[0, -1].float() - chunked[0, -1].float()).abs().max())
