"""Whether a prompt prefilled in chunks gives what one forward gives: the start-up check of
chunked prefill (`worker/batching/startup.py`).

Both go through the tier's traced graph with paged attention (`kernels.paged_kv`): a chunk attends
causally over the blocks of the chunks before it. The check compares the last position's logits
after a prefill in one forward and after one in two chunks, within what the logits' precision
allows (`chunking_tolerance`), and measures the KL divergence between their distributions: a
quantized tier rounds an activation to another int8 level where a chunk's attention differs from
one forward's by 1e-7, which moves a logit by most of a unit (int8-sq on an AMX Xeon: 0.94 at
0.011 nats, 0.65 at 0.007), so there the start-up check holds chunks to the divergence instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from tierserve.worker.kernels.paged_kv import BlockPool, PagedRow, blocks_for, cache_shape, paged_forward

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
    """How far a chunked prefill's last logits are from those of one forward, how far two
    correct prefills in the logits' precision may be, and the KL divergence (nats) of the chunked
    prefill's next-token distribution from the one forward's."""

    difference: float
    tolerance: float
    kl: float = 0.0

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
    `ids` in one forward and after one in two chunks (the first `split` tokens, then the rest
    over their cache), and what that precision allows."""
    length = int(ids.shape[1])
    pool = BlockPool(cache_shape(model), 2 * blocks_for(length))
    graph = model.trace_graph

    def prefill(row: PagedRow, start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end).unsqueeze(0)
        return paged_forward(graph, pool, [row], ids[:, start:end], positions)

    whole = prefill(PagedRow(), 0, length)[0, -1]
    chunked_row = PagedRow()
    prefill(chunked_row, 0, split)
    chunked = prefill(chunked_row, split, length)[0, -1]
    difference = float((whole.float() - chunked.float()).abs().max())
    whole_log, chunked_log = whole.float().log_softmax(-1), chunked.float().log_softmax(-1)
    kl = float((whole_log.exp() * (whole_log - chunked_log)).sum())
    return ChunkingError(difference, chunking_tolerance(whole), kl)
