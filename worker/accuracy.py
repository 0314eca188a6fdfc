"""Accuracy cards: how far a tier's next-token distribution is from full precision.

The reference is the model in plain fp32 (transformers, no optimisation), scored on
the evaluation texts in one forward pass per chunk. A tier is scored through the same
decode path it serves with: `generate` with a logits processor that records each
step's distribution and then forces the evaluation text's next token (teacher
forcing), so the card describes exactly what clients get.

`batched_log_probs` scores the same way through the batch engine's path instead: every chunk a row
of one batch over the paged KV cache (`kernels.paged_kv`), teacher-forced one token per step, as a
batching worker decodes. `measure_card` takes either.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tierserve_client.v1 import worker_pb2
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from tierserve.worker.kernels.decode_attention import DecodeKernel
from tierserve.worker.kernels.paged_kv import BlockPool, PagedRow, blocks_for, cache_shape, paged_forward
from tierserve.worker.tiers.base import LoadedModel
from tierserve.worker.tiers.loading import load_float_model


@dataclass(frozen=True)
class AccuracyCard:
    perplexity: float
    perplexity_delta_pct: float
    kl_divergence: float
    top1_agreement: float
    eval_tokens: int
    reference_perplexity: float

    def to_proto(self) -> worker_pb2.AccuracyCard:
        return worker_pb2.AccuracyCard(
            perplexity=self.perplexity,
            perplexity_delta_pct=self.perplexity_delta_pct,
            kl_divergence=self.kl_divergence,
            top1_agreement=self.top1_agreement,
            eval_tokens=self.eval_tokens,
            measured=True,
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> AccuracyCard:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def eval_chunks(
    tokenizer: Any, paragraphs: Sequence[str], eval_tokens: int, chunk_tokens: int
) -> list[list[int]]:
    """The evaluation text as independent chunks of token ids, eval_tokens in all (or fewer if short)."""
    ids: list[int] = tokenizer("\n\n".join(paragraphs))["input_ids"][:eval_tokens]
    chunks = [ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


def reference_log_probs(model_dir: Path, chunks: list[list[int]]) -> list[torch.Tensor]:
    """Next-token log-probabilities of plain fp32 at every position but the last, per chunk."""
    model = load_float_model(model_dir)
    with torch.inference_mode():
        return [
            torch.log_softmax(model(torch.tensor([chunk])).logits[0, :-1].float(), dim=-1) for chunk in chunks
        ]


class _TeacherForcing(LogitsProcessor):  # type: ignore[misc]
    """Records each step's log-probabilities, then makes the next evaluation token the only choice."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets
        self.log_probs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = len(self.log_probs)
        self.log_probs.append(torch.log_softmax(scores[0].float(), dim=-1))
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.targets[min(step, len(self.targets) - 1)]] = 0.0
        return forced


def tier_log_probs(loaded: LoadedModel, chunk: list[int]) -> torch.Tensor:
    """The tier's next-token log-probabilities at every position but the last, through `generate`."""
    forcing = _TeacherForcing(chunk[1:])
    steps = len(chunk) - 1
    config = GenerationConfig(
        max_new_tokens=steps, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode(), loaded.run_context():
        loaded.model.generate(
            input_ids=torch.tensor([chunk[:1]]),
            attention_mask=torch.ones(1, 1, dtype=torch.long),
            generation_config=config,
            logits_processor=LogitsProcessorList([forcing]),
        )
    if len(forcing.log_probs) != steps:
        raise RuntimeError(f"teacher forcing scored {len(forcing.log_probs)} of {steps} steps")
    return torch.stack(forcing.log_probs)


def batched_log_probs(
    loaded: LoadedModel, chunks: list[list[int]], decode_kernel: DecodeKernel | None = None
) -> list[torch.Tensor]:
    """Each chunk's next-token log-probabilities at every position but the last, every chunk a
    row of one batch decoding over the paged KV cache, teacher-forced one token per step (rows
    leave as their chunks end); attending with `decode_kernel` (None: IPEX's paged kernel)."""
    model = loaded.model
    rows = [PagedRow() for _ in chunks]
    scored: list[list[torch.Tensor]] = [[] for _ in chunks]
    with torch.inference_mode(), loaded.run_context():
        pool = BlockPool(cache_shape(model), sum(blocks_for(len(c)) for c in chunks), decode_kernel)
        for step in range(max(len(c) for c in chunks) - 1):
            active = [i for i, chunk in enumerate(chunks) if step < len(chunk) - 1]
            ids = torch.tensor([[chunks[i][step]] for i in active])
            positions = torch.full((len(active), 1), step, dtype=torch.long)
            logits = paged_forward(model.trace_graph, pool, [rows[i] for i in active], ids, positions)
            for row, i in enumerate(active):
                scored[i].append(torch.log_softmax(logits[row, -1].float(), dim=-1))
    return [torch.stack(steps) for steps in scored]


def measure_card(
    loaded: LoadedModel,
    chunks: list[list[int]],
    reference: list[torch.Tensor],
    progress: Callable[[int, int], None] = lambda done, total: None,
    scored: list[torch.Tensor] | None = None,
) -> AccuracyCard:
    """The card of `loaded` on `chunks` against the fp32 `reference`: scored through `generate`
    chunk by chunk, or from log-probabilities already `scored` (e.g. `batched_log_probs`)."""
    total = sum(len(c) - 1 for c in chunks)
    nll = ref_nll = kl = agree = 0.0
    done = 0
    for index, (chunk, ref) in enumerate(zip(chunks, reference, strict=True)):
        mine = tier_log_probs(loaded, chunk) if scored is None else scored[index]
        targets = torch.tensor(chunk[1:])
        nll -= mine.gather(1, targets[:, None]).sum().item()
        ref_nll -= ref.gather(1, targets[:, None]).sum().item()
        kl += kl_divergence_per_position(ref, mine).sum().item()
        agree += (ref.argmax(-1) == mine.argmax(-1)).sum().item()
        done += len(chunk) - 1
        progress(done, total)
    perplexity, reference_perplexity = math.exp(nll / total), math.exp(ref_nll / total)
    return AccuracyCard(
        perplexity=perplexity,
        # Rounded to what the measurement resolves: fp32 against itself differs by float noise
        # (~1e-5 %), and a zero-tolerance request must still find it within tolerance.
        perplexity_delta_pct=round(100.0 * (perplexity - reference_perplexity) / reference_perplexity, 4),
        kl_divergence=max(0.0, kl / total),  # float error can make a true zero slightly negative
        top1_agreement=agree / total,
        eval_tokens=total,
        reference_perplexity=reference_perplexity,
    )


def kl_divergence_per_position(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) in nats at each position of `[positions, vocabulary]` log-probs."""
    return torch.sum(reference.exp() * (reference - other), dim=-1)


def mean_kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference || other) in nats, averaged over positions."""
    # Float error can make a true zero slightly negative.
    return max(0.0, float(kl_divergence_per_position(reference, other).mean()))
