"""What `tierserve bench soak` sends: a varied request mix, bearer tokens for its clients, and callers
without a valid token.

The mix: prompts are windows of the evaluation text, of any length up to MAX_PROMPT_WORDS words from
any offset; a share are chat messages (a system and a user turn), a share are sampled (temperature,
top-p, a seed) rather than greedy, a share carry stop strings; max_new_tokens is drawn from 1 to the
largest. The prompt lengths are bounded, so the shapes a worker sees (prompt length, batch size) are
bounded too, and most of them are met during the warm-up; the first requests (`primed`, one per place
the pool admits) are all of the largest shape, so that buffers and allocator arenas reach their
high-water mark before the first sample that is judged.

Tokens: the soak writes a tokens file (SOAK_TOKENS: two without a limit of their own, one capped at
CAPPED_STREAMS streams at once) and hands them to its clients in turn, so every call goes through the
router's bearer-token check and the capped client also meets its per-client limit (RESOURCE_EXHAUSTED
with a retry hint, like an overloaded pool's). One more client keeps calling without a token and with
an unknown one: those must be refused (UNAUTHENTICATED, PERMISSION_DENIED) every time, and the
refusals must leak nothing either.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve_client.v1 import generate_pb2

from tierserve.benchmarks.streamcall import GenerateStub, timed_generate

Metadata = tuple[tuple[str, str], ...]
MAX_PROMPT_WORDS = 48
CHAT_SHARE = 0.25
SAMPLED_SHARE = 0.25
STOP_SHARE = 0.15
SYSTEM_PROMPT = "You are a concise assistant. Answer in one sentence."
CAPPED_STREAMS = 2
# (name, max streams at once; 0: no limit of its own) of each token the soak's clients use in turn.
SOAK_TOKENS = (("soak-a", 0), ("soak-b", 0), ("soak-capped", CAPPED_STREAMS))
# The token-less client waits this long between its calls.
PROBE_PAUSE_S = 0.05
PROBE_TIMEOUT_S = 10.0
# What a call without a token, and one with a token the router does not know, must end with.
PROBE_EXPECTED = {"no token": "UNAUTHENTICATED", "unknown token": "PERMISSION_DENIED"}


@dataclass
class RequestMix:
    """Makes the soak's requests (call it) and counts what it made."""

    words: Sequence[str]
    new_tokens: int
    rng: random.Random
    # How many of the first requests are of the largest shape (the longest prompt, every token).
    primed: int = 0
    made: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    prompt_words: set[int] = field(default_factory=set)

    def __call__(self) -> generate_pb2.GenerateRequest:
        rng = self.rng
        longest = min(MAX_PROMPT_WORDS, len(self.words))
        largest = self.made < self.primed
        self.made += 1
        length = longest if largest else rng.randint(1, longest)
        start = rng.randrange(len(self.words) - length + 1)
        text = " ".join(self.words[start : start + length])
        self.prompt_words.add(length)
        tokens = self.new_tokens if largest else rng.randint(1, self.new_tokens)
        request = generate_pb2.GenerateRequest(max_new_tokens=tokens)
        if rng.random() < CHAT_SHARE:
            request.messages.add(role="system", content=SYSTEM_PROMPT)
            request.messages.add(role="user", content=text)
            self.kinds["chat"] += 1
        else:
            request.prompt = text
            self.kinds["prompt"] += 1
        if rng.random() < SAMPLED_SHARE:
            request.temperature, request.top_p, request.seed = 0.8, 0.95, rng.getrandbits(63) or 1
            self.kinds["sampled"] += 1
        if rng.random() < STOP_SHARE:
            request.stop.extend([".", "\n"])
            self.kinds["stop strings"] += 1
        return request

    def to_json(self) -> dict[str, Any]:
        return {
            "primed": min(self.primed, self.made),
            "kinds": dict(self.kinds),
            "prompt_words": {
                "min": min(self.prompt_words, default=0),
                "max": max(self.prompt_words, default=0),
                "distinct": len(self.prompt_words),
            },
        }


@dataclass(frozen=True)
class SoakTokens:
    """The bearer tokens of the soak's clients, written to a tokens file the router reads."""

    path: Path
    tokens: tuple[tuple[str, str, int], ...]  # (token, name, max streams; 0: none)

    @classmethod
    def write(cls, directory: Path) -> SoakTokens:
        directory.mkdir(parents=True, exist_ok=True)
        tokens = tuple((secrets.token_urlsafe(24), name, limit) for name, limit in SOAK_TOKENS)
        path = directory / "soak-tokens.txt"
        lines = [f"{token} {name}" + (f" {limit}" if limit else "") for token, name, limit in tokens]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        path.chmod(0o600)
        return cls(path, tokens)

    def for_client(self, index: int) -> tuple[str, Metadata]:
        """Client `index`'s token name and the metadata that carries it."""
        token, name, _ = self.tokens[index % len(self.tokens)]
        return name, (("authorization", f"Bearer {token}"),)

    def to_json(self, clients: int) -> dict[str, Any]:
        counts = Counter(self.for_client(i)[0] for i in range(clients))
        return {
            name: {"clients": counts[name], "max_streams": limit or None} for _, name, limit in self.tokens
        }


@dataclass
class ProbeTally:
    """How the calls without a valid token ended, by kind."""

    codes: dict[str, Counter[str]] = field(
        default_factory=lambda: {kind: Counter() for kind in PROBE_EXPECTED}
    )

    @property
    def sent(self) -> int:
        return sum(sum(c.values()) for c in self.codes.values())

    def problems(self) -> list[str]:
        problems = []
        for kind, expected in PROBE_EXPECTED.items():
            if not self.codes[kind]:
                problems.append(f"no call with {kind} was made")
            if wrong := {code: n for code, n in self.codes[kind].items() if code != expected}:
                problems.append(f"calls with {kind} must end {expected}, got {wrong}")
        return problems

    def to_json(self) -> dict[str, Any]:
        return {kind: dict(codes) for kind, codes in self.codes.items()}


async def probe_client(stub: GenerateStub, until: float, tally: ProbeTally) -> None:
    """Call without a token and with an unknown one, in turn, until `until`."""
    unknown: Metadata = (("authorization", f"Bearer {secrets.token_urlsafe(24)}"),)
    request = generate_pb2.GenerateRequest(prompt="Let me in", max_new_tokens=1)
    calls = 0
    while time.monotonic() < until:
        kind = "no token" if calls % 2 == 0 else "unknown token"
        result = await timed_generate(stub, request, PROBE_TIMEOUT_S, () if kind == "no token" else unknown)
        tally.codes[kind][result.status] += 1
        calls += 1
        await asyncio.sleep(PROBE_PAUSE_S)
