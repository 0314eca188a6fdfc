"""IPEX's own KV-cache layout for a batch, for comparison with the paged cache the batch engine
keeps (`tierserve.worker.kernels.paged_kv`): `[positions, batch, kv_heads, head_dim]` per layer,
one shared length, rows right-aligned behind left padding. The batch engine used this until the
paged cache replaced it; `batched_step.py` steps it side by side with the paged one.

A joining sequence is copied in at the right offset (the batch moves right first if the newcomer
is longer); a leaving one is dropped from the batch dimension; padding every row shares is
trimmed. `beam_idx` is `[capacity + 2, batch]`: the identity, then the prompt length and the
batch size. Tied to IPEX 2.8's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Spare positions allocated past the current length, so most steps do not regrow the cache.
_HEADROOM = 64


def layer_caches(past: Sequence[Sequence[torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key cache, value cache) per layer from a graph's returned past."""
    return [(layer[1], layer[2]) for layer in past]


@dataclass
class BatchKvCache:
    """The rows of a running batch: per layer key and value caches, the shared length, and each
    row's left padding."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    padding: list[int]

    @classmethod
    def of_sequence(cls, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> BatchKvCache:
        """A batch of one: a sequence prefilled alone to `length` positions."""
        return cls(layers=[(k[:length], v[:length]) for k, v in layers], length=length, padding=[0])

    @property
    def batch(self) -> int:
        return len(self.padding)

    @property
    def capacity(self) -> int:
        return int(self.layers[0][0].shape[0])

    def bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def join(self, other: BatchKvCache) -> None:
        """Append `other`'s rows (e.g. a sequence prefilled alone) after this batch's rows."""
        length = max(self.length, other.length)
        mine = self._aligned(self.layers, self.length, length)
        theirs = self._aligned(other.layers, other.length, length)
        self.layers = [
            (torch.cat([k, k2], dim=1), torch.cat([v, v2], dim=1))
            for (k, v), (k2, v2) in zip(mine, theirs, strict=True)
        ]
        self.padding = [p + length - self.length for p in self.padding] + [
            p + length - other.length for p in other.padding
        ]
        self.length = length

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order), then trim the padding they all share."""
        index = torch.tensor(list(rows), dtype=torch.long)
        self.layers = [(k.index_select(1, index), v.index_select(1, index)) for k, v in self.layers]
        self.padding = [self.padding[r] for r in rows]
        shared = min(self.padding, default=0)
        if shared:
            self.layers = self._aligned(
                [(k[shared : self.length], v[shared : self.length]) for k, v in self.layers],
                self.length - shared,
                self.length - shared,
            )
            self.length -= shared
            self.padding = [p - shared for p in self.padding]

    def past_key_values(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        """The past for the graph's next forward over this batch."""
        if self.capacity <= self.length:
            self.layers = self._aligned(self.layers, self.length, self.length)
        beam_idx = (
            torch.arange(self.batch, dtype=torch.long).expand(self.capacity + 2, self.batch).contiguous()
        )
        beam_idx[-2:] = 0
        beam_idx[-2, 0] = self.length
        beam_idx[-1, 0] = self.batch
        # Only seq_info's shape is read (the offset): an empty tensor of that shape costs nothing.
        seq_info = torch.empty((1, 0, self.length, 1), dtype=torch.long)
        return tuple((seq_info, k, v, beam_idx) for k, v in self.layers)

    def advance(self, past: Sequence[Sequence[torch.Tensor]], new_positions: int) -> None:
        """Take the graph's returned caches after a forward that added `new_positions`."""
        self.layers = layer_caches(past)
        self.length += new_positions

    def attention_mask(self, new_positions: int = 1) -> torch.Tensor:
        """The 2-D mask for a forward adding `new_positions`: zeros over each row's padding."""
        mask = torch.ones(self.batch, self.length + new_positions, dtype=torch.long)
        for row, pad in enumerate(self.padding):
            mask[row, :pad] = 0
        return mask

    @staticmethod
    def _aligned(
        layers: list[tuple[torch.Tensor, torch.Tensor]], length: int, new_length: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of `layers` with their `length` positions moved to end at `new_length`, in
        caches with room to grow."""
        shift = new_length - length
        out = []
        for k, v in layers:
            shape: Any = (new_length + _HEADROOM, *k.shape[1:])
            k2, v2 = k.new_zeros(shape), v.new_zeros(shape)
            k2[shift:new_length] = k[:length]
            v2[shift:new_length] = v[:length]
            out.append((k2, v2))
        return out
