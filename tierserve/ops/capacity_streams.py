"""How many concurrent streams one worker can serve within the per-token budget: the figures a
continuously batching worker was measured at (TPOT, and TTFT where known, by concurrent streams),
read at any stream count up to the highest measured one.

Between two measured concurrencies the figures are interpolated linearly (a batched decode step
costs reading the weights once plus a share per row, close to a line in the number of rows); below
the lowest measured one the lowest's figures stand (TPOT does not fall as streams are added, so
they are an upper bound); above the highest measured one there is no figure: nothing is
extrapolated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Level:
    """Measured at `streams` concurrent streams on one worker; latencies in milliseconds. `ttft_ms`
    None: not measured at this concurrency (the tier's one-stream TTFT stands in)."""

    streams: int
    tpot_ms: float
    ttft_ms: float | None = None


@dataclass(frozen=True)
class Point:
    """The figures at one stream count, and how they were obtained."""

    streams: int
    tpot_ms: float
    ttft_ms: float | None
    basis: str


def _lerp(a: float, b: float, share: float) -> float:
    return a + (b - a) * share


def _lerp_optional(a: float | None, b: float | None, share: float) -> float | None:
    return None if a is None or b is None else _lerp(a, b, share)


def figures_at(levels: Sequence[Level], streams: int) -> Point | None:
    """The figures at `streams` concurrent streams: measured, interpolated between the measured
    concurrencies around it, or the lowest measured one's below it; None above the highest."""
    ordered = sorted(levels, key=lambda level: level.streams)
    if not ordered or streams > ordered[-1].streams:
        return None
    below = [level for level in ordered if level.streams <= streams]
    above = next(level for level in ordered if level.streams >= streams)
    if not below:
        return Point(streams, above.tpot_ms, above.ttft_ms, f"at most as measured at {above.streams} streams")
    low = below[-1]
    if low.streams == streams:
        return Point(streams, low.tpot_ms, low.ttft_ms, f"measured at {streams} stream{'s' * (streams > 1)}")
    share = (streams - low.streams) / (above.streams - low.streams)
    return Point(
        streams,
        _lerp(low.tpot_ms, above.tpot_ms, share),
        _lerp_optional(low.ttft_ms, above.ttft_ms, share),
        f"interpolated between {low.streams} and {above.streams} streams",
    )


def stream_cap(levels: Sequence[Level], max_batch: int | None) -> int:
    """The most streams a worker may be planned at: its batch limit, and never past the highest
    measured concurrency (0 without figures)."""
    highest = max((level.streams for level in levels), default=0)
    return highest if max_batch is None else min(highest, max(max_batch, 1))


def points_up_to(levels: Sequence[Level], cap: int) -> list[Point]:
    """The figures at every stream count from 2 to `cap` (one stream is the tier's own figure)."""
    return [point for streams in range(2, cap + 1) if (point := figures_at(levels, streams)) is not None]
