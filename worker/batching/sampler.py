"""The next token of one sequence from its logits, with its own sampling settings and random
generator, so a seeded request draws the same tokens whatever shares its batch."""

from __future__ import annotations

import torch

from tierserve.domain.errors import InvalidRequest
from tierserve.domain.requests import SamplingParams


def seeded_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def next_token(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy, or temperature, then top-k, then top-p (nucleus) sampling, in that order (as
    transformers' `generate` applies them). `logits` is the [vocab] row of one sequence."""
    if sampling.greedy or generator is None:
        return int(logits.argmax())
    scores = logits.float() / sampling.temperature
    if 0 < sampling.top_k < scores.numel():
        kth_best = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if 0.0 < sampling.top_p < 1.0:
        ordered, order = scores.sort(descending=True)
        probs = ordered.softmax(-1)
        # Drop a token once the ones before it already hold top_p of the mass (the best one stays).
        outside = probs.cumsum(-1) - probs > sampling.top_p
        scores = scores.scatter(0, order, ordered.masked_fill(outside, float("-inf")))
    probs = scores.softmax(-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        # Extreme settings (e.g. a subnormal temperature) overflow the scores: the request's
        # values are at fault, not the worker.
        raise InvalidRequest(
            "temperature", f"{sampling.temperature:g} gives no valid distribution to sample from"
        )
    return int(torch.multinomial(probs, 1, generator=generator))
