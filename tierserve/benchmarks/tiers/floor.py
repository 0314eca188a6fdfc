"""The memory-bandwidth floor of a decode step: how fast a path could at best produce a token on this
machine if every step had to read all of its weights from memory once.

Decoding one token at batch size one multiplies a single activation vector by every weight matrix,
so it reads each weight once and does little arithmetic per byte: memory bandwidth, not compute,
bounds it. The floor is

    floor_ms = bytes of weights read per token / measured read bandwidth

and a path's "% of floor" is floor_ms / tpot_ms x 100: 100% would be decoding at the speed of
memory; the gap is time spent elsewhere (kernels that do not stream at full bandwidth, dequantizing,
attention, Python and framework overhead between kernels).

- Read bandwidth: the best of several timed sums of a float32 buffer many times the size of the L3
  cache (so it streams from memory), with torch using as many threads as the paths do.
- Bytes per token (torch paths): the loaded model's parameters, buffers and packed weights (the
  storage its kernels read, e.g. int4 nibbles with their group scales), each storage counted once.
  Tables read one row per token are left out: the input embedding (unless it is tied to the output
  head, which reads all of it) and rotary position caches. The KV cache is not counted either (at
  the benchmark's lengths a small fraction of the weights), so the floor is a lower bound.
- Bytes per token (llama.cpp): the GGUF file's size (its tied Q8_0 embedding is the output head too).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CPU_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
# The buffer is this many times the L3 cache, and never smaller than MIN_BUFFER_BYTES.
L3_MULTIPLE = 8
MIN_BUFFER_BYTES = 256 * 2**20
BANDWIDTH_REPEATS = 10
# Owners of position tables, read one row per token (IPEX's _IPEXROPE, transformers' rotary_emb).
POSITION_TABLE = re.compile(r"rope|rotary|embed_positions", re.IGNORECASE)
# Zero-argument getters of packed-weight objects (IPEX op contexts, fbgemm packed params).
PACKED_GETTERS = ("get_weight", "get_scales", "get_zero_points", "get_bias", "unpack")


@dataclass(frozen=True)
class ReadBandwidth:
    bytes_per_s: float
    buffer_bytes: int
    threads: int
    repeats: int

    def to_json(self) -> dict[str, Any]:
        return {
            "gb_per_s": round(self.bytes_per_s / 1e9, 2),
            "buffer_mib": self.buffer_bytes // 2**20,
            "threads": self.threads,
            "repeats": self.repeats,
        }


def l3_cache_bytes(cache_dir: Path = CPU_CACHE) -> int | None:
    """The L3 cache size of CPU 0 from sysfs (e.g. "32768K"), or None where sysfs does not say."""
    for index in sorted(cache_dir.glob("index*")):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


def buffer_bytes_for(l3_bytes: int | None) -> int:
    return max(MIN_BUFFER_BYTES, L3_MULTIPLE * (l3_bytes or 0))


def measure_read_bandwidth(
    threads: int, buffer_bytes: int | None = None, repeats: int = BANDWIDTH_REPEATS
) -> ReadBandwidth:
    """Bytes per second torch reads with `threads` threads: the best of `repeats` timed sums."""
    import torch

    buffer_bytes = buffer_bytes or buffer_bytes_for(l3_cache_bytes())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(buffer_bytes // 4, dtype=torch.float32)
        buffer.sum()  # the thread pool's start-up stays out of the timings
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - started)
        return ReadBandwidth(buffer.numel() * 4 / best, buffer.numel() * 4, threads, repeats)
    finally:
        torch.set_num_threads(previous)


def floor_ms(weight_bytes: int | None, bandwidth_bytes_per_s: float | None) -> float | None:
    if not weight_bytes or not bandwidth_bytes_per_s:
        return None
    return weight_bytes / bandwidth_bytes_per_s * 1e3


def percent_of_floor(floor: float | None, tpot_ms: float | None) -> float | None:
    """floor_ms / tpot_ms x 100: how close decoding comes to the speed of memory."""
    if floor is None or not tpot_ms:
        return None
    return floor / tpot_ms * 100.0


# --- bytes of weights a decode step reads --------------------------------------------------------------


def _nbytes(tensor: torch.Tensor) -> tuple[tuple[int, int], int]:
    """(identity of its storage, bytes): views of one storage count once."""
    try:
        storage = tensor.untyped_storage()
        return (storage.data_ptr(), storage.nbytes()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # opaque layouts (quantized, mkldnn) have no storage
        return (id(tensor), 0), tensor.numel() * tensor.element_size()


def _packed_tensors(packed: Any) -> list[torch.Tensor]:
    import torch

    found: list[torch.Tensor] = []
    for getter in PACKED_GETTERS:
        if not packed._has_method(getter):
            continue
        values = getattr(packed, getter)()
        for value in values if isinstance(values, tuple | list) else [values]:
            if isinstance(value, torch.Tensor):
                found.append(value)
    return found


def _module_tensors(module: Any) -> list[torch.Tensor]:
    """The module's own parameters and buffers, and what its packed-weight objects hold."""
    import torch

    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    for value in vars(module).values():
        if isinstance(value, torch.ScriptObject):
            tensors += _packed_tensors(value)
    return tensors


def decode_weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads from a loaded torch model (see the module notes)."""
    from torch import nn

    # Every tensor is held until the end: those unpacked from packed weights are fresh copies, and a
    # freed copy's address could be reused by the next one and pass for the same storage.
    owned = [
        (tensor, isinstance(module, nn.Embedding) or bool(POSITION_TABLE.search(name)))
        for name, module in model.named_modules()
        for tensor in _module_tensors(module)
    ]
    sizes: dict[tuple[int, int], int] = {}
    streamed: set[tuple[int, int]] = set()  # storages some module other than a lookup table reads
    for tensor, lookup in owned:
        key, size = _nbytes(tensor)
        sizes[key] = size
        if not lookup:
            streamed.add(key)
    return sum(size for key, size in sizes.items() if key in streamed)
