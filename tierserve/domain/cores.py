"""Parsing and printing CPU lists in the kernel's "0-3,8,10-11" notation."""

from collections.abc import Iterable


def parse_cpu_list(text: str) -> list[int]:
    """Parse "0-3,8" into [0, 1, 2, 3, 8]; raises ValueError with the bad part named."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise ValueError(f"bad CPU list item {part!r}: expected N or N-M") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}: expected 0 <= N <= M")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Print [0, 1, 2, 3, 8] as "0-3,8"."""
    ordered = sorted(set(cpus))
    ranges: list[str] = []
    start = prev = None
    for cpu in ordered:
        if start is None:
            start = prev = cpu
        elif prev is not None and cpu == prev + 1:
            prev = cpu
        else:
            ranges.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = cpu
    if start is not None:
        ranges.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(ranges)
