"""The chaos benchmark's text check: a greedy stream that completed while workers were being killed,
resumed on another worker or not, must read exactly as an uninterrupted run of the same request.

The load pins every request to one tier, so a stream only ever moves between workers of that tier
(the same model, weights and kernels), and greedy decoding makes one text right. The references are
that text: each request shape (prompt, max_new_tokens) sent once, alone, before the first kill, pinned
to the same tier. A stream differs when it does not equal its reference character for character, or
when a worker of another tier finished it. A resumed stream is the one this mostly tells about: the
next worker re-reads the text streamed so far as its `response_prefix` (with the streamed tokens'
ids) and must continue it as the first worker would have; a difference in a stream that was never
resumed says the worker's text depends on what else it was serving (its batch).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from tierserve_client.options import CHANNEL_OPTIONS
from tierserve_client.v1 import generate_pb2, router_pb2_grpc

# How much of each text a reported difference shows, either side of where the two part.
EXCERPT_CHARS = 80


@dataclass(frozen=True)
class RequestShape:
    """What makes two greedy requests of the load the same request."""

    prompt: str
    max_new_tokens: int


@dataclass(frozen=True)
class FinishedStream:
    """A stream the load read to its summary: its request, its text and how it was served."""

    shape: RequestShape
    text: str
    worker_id: str
    tier: str
    failovers: int = 0
    # Tokens already streamed when the last failover resumed it (0: sent again before any token).
    resumed_after_tokens: int = 0
    failed_workers: tuple[str, ...] = ()

    @property
    def resumed(self) -> bool:
        return self.failovers > 0 and self.resumed_after_tokens > 0

    @classmethod
    def from_summary(cls, shape: RequestShape, summary: generate_pb2.Summary) -> FinishedStream:
        return cls(
            shape,
            summary.text,
            summary.worker_id,
            summary.tier,
            summary.failovers,
            summary.resumed_after_tokens,
            tuple(summary.failed_workers),
        )


def request_for(shape: RequestShape, tier: str) -> generate_pb2.GenerateRequest:
    """The greedy request of this shape, pinned to `tier`."""
    return generate_pb2.GenerateRequest(prompt=shape.prompt, max_new_tokens=shape.max_new_tokens, tier=tier)


def run_references(
    address: str, tier: str, shapes: Iterable[RequestShape], timeout_s: float
) -> dict[RequestShape, str]:
    """Each shape's text from one uninterrupted run, one request at a time, pinned to `tier`."""
    references = {}
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for shape in shapes:
            summary = list(stub.Generate(request_for(shape, tier), timeout=timeout_s))[-1].summary
            if summary.failovers or summary.tier != tier:
                raise RuntimeError(
                    f"the reference run of {shape} was not uninterrupted on {tier}: "
                    f"{summary.failovers} failovers, served by {summary.worker_id} ({summary.tier})"
                )
            references[shape] = summary.text
    return references


def first_difference(a: str, b: str) -> int:
    """The index of the first character where `a` and `b` differ (the shorter's length if one is a
    prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@dataclass
class TextCheck:
    """How the finished streams compared with their references."""

    tier: str
    compared: int = 0
    resumed_compared: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def resumed_mismatches(self) -> int:
        return sum(m["resumed"] for m in self.mismatches)

    def to_json(self, examples: int = 5) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "compared": self.compared,
            "resumed_compared": self.resumed_compared,
            "mismatches": len(self.mismatches),
            "resumed_mismatches": self.resumed_mismatches,
            "mismatch_examples": self.mismatches[:examples],
        }


def compare_texts(
    streams: Iterable[FinishedStream], references: Mapping[RequestShape, str], tier: str
) -> TextCheck:
    """Every finished stream against the reference of its shape; each difference described."""
    check = TextCheck(tier)
    for stream in streams:
        expected = references[stream.shape]
        check.compared += 1
        check.resumed_compared += stream.resumed
        if stream.text == expected and stream.tier == tier:
            continue
        at = first_difference(stream.text, expected)
        start = max(0, at - EXCERPT_CHARS)
        check.mismatches.append(
            {
                "prompt": stream.shape.prompt,
                "max_new_tokens": stream.shape.max_new_tokens,
                "worker": stream.worker_id,
                "tier": stream.tier,
                "resumed": stream.resumed,
                "resumed_after_tokens": stream.resumed_after_tokens,
                "failed_workers": list(stream.failed_workers),
                "first_difference_at": at,
                "expected": expected[start : at + EXCERPT_CHARS],
                "got": stream.text[start : at + EXCERPT_CHARS],
            }
        )
    return check


def request_shapes(prompts: Iterable[str], lengths: Iterable[int]) -> list[RequestShape]:
    return [RequestShape(p, n) for p, n in itertools.product(prompts, lengths)]
