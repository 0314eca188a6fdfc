"""Whether this worker's model can be batched, checked on the model itself before it serves: a
greedy text made in a batch must match the text made alone, or the worker serves one request at
a time and says why in Describe (never silently wrong).

Tiers computed in float32 (fp32, and bf16 where the CPU lacks bf16 kernels) must match exactly,
against the one-request path (IPEX's own attention). Where bf16 computes in bf16 the two attention
kernels round differently and the default model's bf16 logits have exact ties: on a Xeon with AMX
"The three primary colours are" gave two tokens the same bf16 log-probability on the one-request
path, and the paged path took the other one (fp32's top token, by 0.04 nats), so bf16 there is
checked as the quantized tiers are. A quantized tier's greedy text is chaotic in its attention's
rounding: the batch's paged attention and IPEX's
kernel differ by about 1e-7 per layer in float32, one activation then rounds to another int8 or
int4 level, and on the default model int8-sq's text parted from the one-request path's after 1
token and int4-woq's at once (a Zen 4). So a quantized tier's batch is compared with the same
engine serving each prompt alone, and the notice says how far that agreed with the one-request
path. Quantized kernels need not give a row the same bits inside a
batch as alone (int4-woq's batched greedy texts parted from those alone on half the prompts of
`bench throughput` on a Zen 3), so a greedy text may part from the text alone where two tokens are
nearly tied; for them the first tokens must match (a broken cache parts at once) and the
agreement is reported. For all of them the batch's paged path is also held to the one-request path
by log-probabilities: teacher-forced on each check prompt and its greedy text alone, their mean KL
divergence per token must stay within `PAGED_MAX_KL` (rounding is thousandths of a nat; attention
over the wrong positions is nats). (int8-sq's dynamic linears quantize each row on its own range, so its rows
are independent of their neighbours: `kernels.linears.DynamicInt8Linear`.)

Where texts are held exactly to the one-request path, a prompt's forwards run alone, since a linear
may round a row differently in a product of hundreds of rows; elsewhere, and where every linear
keeps rows independent (`LoadedModel.rows_independent`: fp32's native path), they are packed with
the running rows' next tokens (`BatchLimits.packed_prefill`).

Chunked prefill is checked on the longer prompt split into two chunks (the second attends over the
first's paged cache). On fp32 and bf16 strictly: its greedy tokens must all equal those made alone,
and its last logits those of a prefill in one forward to within what their precision allows
(`chunked_prefill.chunking_tolerance`: 0.01 in float32, a few units in the last place in bf16). A
quantized tier is held as its batch is: its first greedy tokens must equal those alone, and its
next-token distribution must be within `PAGED_MAX_KL` of one forward's (int8-sq's logits moved by
0.94 at 0.011 nats, by int8 rounding, and the strict check had turned its chunking off). Where it
fails, the worker still batches but prefills each prompt in one forward, and says so in
Describe.

A model with a sliding attention window (Mistral's) is served one request at a time: the paged
attention kernel attends to every earlier position."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from tierserve.domain.config import BatchingConfig
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.accuracy import batched_log_probs, mean_kl_divergence, tier_log_probs
from tierserve.worker.batching.engine import BatchEngine, BatchLimits
from tierserve.worker.engine import Engine, TokenEvent
from tierserve.worker.kernels import decode_attention
from tierserve.worker.kernels.chunked_prefill import ChunkingError, chunking_error
from tierserve.worker.kernels.decode_attention import DecodeKernel
from tierserve.worker.kernels.paged_kv import attends_in_full
from tierserve.worker.tiers.base import LoadedModel

log = logging.getLogger(__name__)

# Different lengths, so the check covers left padding and a row joining a running batch.
_CHECK_PROMPTS = (
    "The three primary colours are",
    "Write one sentence about the sea, the wind and the boats that sail between the islands:",
)
_CHECK_TOKENS = 12
# Leading tokens a quantized tier's batched text must share with its text alone.
_QUANTIZED_PREFIX_TOKENS = 4
EXACT_TIERS = ("fp32", "bf16")
# Mean KL divergence per token (nats) the batch's paged path may be from the one-request path,
# teacher-forced, where their greedy texts are not held equal: bf16 computed in bf16 on a Xeon
# with AMX measured about 0.002 from fp32 either way; a cache read at the wrong positions is
# nats away.
PAGED_MAX_KL = 0.05


def start_batching(
    engine: Engine,
    config: BatchingConfig,
    tier: str = "fp32",
    in_own_thread: bool = True,
    kernel_dir: Path | None = None,
) -> tuple[BatchEngine | None, str]:
    """A batch engine for `engine` (of `tier`), or None and the reason requests go one at a time;
    the message says how far batched greedy tokens agreed with those made alone. The checks step
    in the calling thread; the engine then steps in its own thread, or (`in_own_thread` False)
    wherever the caller runs `BatchEngine.run` (a worker: on its model thread). tierserve's
    decode-attention kernel is built into (or loaded from) `kernel_dir`, by default the
    default model cache's `kernels/`."""
    if not config.enabled:
        return None, "continuous batching is off ([batching] enabled = false): one request at a time"
    why_not = unbatchable(engine.loaded)
    if why_not is not None:
        return None, f"continuous batching unavailable: {why_not}; one request at a time"
    exact = tier in EXACT_TIERS and engine.loaded.model.dtype == torch.float32
    limits = BatchLimits(
        max_batch=config.max_batch,
        kv_cache_tokens=config.kv_cache_tokens,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
        # Rows held to the exact text alone decode in a forward of their own (see BatchLimits),
        # unless every linear keeps rows independent.
        packed_prefill=not exact or engine.loaded.rows_independent,
    )
    decode_kernel, decode_note = decode_kernel_for(config, kernel_dir)
    needed = _CHECK_TOKENS if exact else _QUANTIZED_PREFIX_TOKENS
    params = [GenerationParams(p, _CHECK_TOKENS, SamplingParams(), (), "batch-check") for p in _CHECK_PROMPTS]
    try:
        alone = [_alone(engine, p) for p in params]
        # Texts computed in bf16 or quantized part from IPEX's own attention at the first
        # near-tie (see the module doc), so their batches are held to the batch's attention with
        # one request, and that attention to the one-request path's log-probabilities.
        reference = alone if exact else _each_alone_in(engine, limits, params, decode_kernel)
        divergence = None if exact else _paged_divergence(engine, params, alone, decode_kernel)
    except Exception as error:  # the reference itself failed: nothing to compare a batch with
        log.exception("self-check: generating alone failed")
        return None, (
            f"continuous batching unavailable: the self-check's generation alone failed "
            f"({type(error).__name__}: {error}); one request at a time"
        )
    if divergence is not None and divergence > PAGED_MAX_KL:
        return None, (
            f"continuous batching unavailable: teacher-forced on the self-check's texts, the batch's "
            f"paged attention is {divergence:.3g} nats per token (KL divergence) from the one-request "
            f"path (allowed: {PAGED_MAX_KL}); one request at a time"
        )
    chunk_problem, chunk_agreed, chunk_total = (
        _checked(
            "chunked prefill",
            lambda: _compare_chunked(
                engine, limits, params[-1], reference[-1], tier not in EXACT_TIERS, decode_kernel
            ),
        )
        if config.prefill_chunk_tokens is not None
        else ("", 0, 0)
    )
    if chunk_problem:
        limits = replace(limits, prefill_chunk_tokens=None)
    batch = BatchEngine(engine, limits, in_own_thread=False, decode_kernel=decode_kernel)
    problem, agreed, total = _checked("batched", lambda: _compare(engine, batch, params, reference, needed))
    if problem:
        batch.stop()
        return None, f"continuous batching unavailable: {problem}; one request at a time"
    prefill = (
        f"chunked prefill unavailable: {chunk_problem}; each prompt is prefilled in one forward, "
        "holding the running streams meanwhile"
        if chunk_problem
        else "each prompt prefilled in one forward ([batching] prefill_chunk_tokens unset)"
        if config.prefill_chunk_tokens is None
        else f"prompts prefilled {config.prefill_chunk_tokens} tokens per step (self-check: "
        f"{chunk_agreed} of {chunk_total} greedy tokens after a prefill in 2 chunks equal to those alone)"
    )
    packing = (
        "a prompt's forwards packed with the running rows' next tokens"
        if limits.packed_prefill
        else "a prompt's forwards run alone, the rows' decode step after each (exact text alone)"
    )
    logits = (
        "logits at a prompt's last position only"
        if batch.prefills_last_logits_only
        else "logits at every position"
    )
    paged = (
        ""
        if divergence is None
        else f"; alone through the batch's paged attention, {_agreement(alone, reference)} of them "
        f"equal to the one-request path's, {divergence:.2g} nats per token from its log-probabilities "
        "teacher-forced"
    )
    if in_own_thread:
        batch.start_thread()
    return batch, (
        f"continuous batching: up to {config.max_batch} streams, KV cache {config.kv_cache_tokens} tokens "
        f"(self-check: {agreed} of {total} greedy tokens made in a batch equal to those made alone{paged}); "
        f"{prefill}; {packing}; {logits}; {decode_note}"
    )


def serves_less_than_configured(batch: BatchEngine | None, config: BatchingConfig) -> bool:
    """Whether the batching note belongs in `Describe`'s notices: the worker serves one request at a
    time, or without the chunked prefill or the decode kernel its config asks for."""
    if batch is None:
        return True
    chunking_lost = config.prefill_chunk_tokens is not None and not batch.chunked_prefill
    kernel_lost = config.decode_attention == "tierserve" and not batch.attends_with_tierserve_kernel
    return chunking_lost or kernel_lost


def unbatchable(loaded: LoadedModel) -> str | None:
    """Why `loaded` cannot be served through the batch's paged path, or None if it can."""
    if getattr(loaded.model, "trace_graph", None) is None:
        return "the model has no IPEX decoder graph"
    if not attends_in_full(loaded.model.config):
        return "the model attends through a sliding window, which the batch's paged attention does not apply"
    return None


def decode_kernel_for(config: BatchingConfig, kernel_dir: Path | None) -> tuple[DecodeKernel | None, str]:
    """The decode steps' attention kernel as configured, and what the notice says of it."""
    if config.decode_attention == "ipex":
        return None, 'decode attention: IPEX\'s paged kernel ([batching] decode_attention = "ipex")'
    loaded = decode_attention.load(kernel_dir or decode_attention.default_dir())
    if loaded.kernel is None:
        return (
            None,
            f"decode attention: IPEX's paged kernel (tierserve's could not be built: {loaded.reason})",
        )
    return loaded.kernel, f"decode attention: tierserve's kernel, {loaded.reason}"


Check = tuple[str, int, int]


def _checked(what: str, check: Callable[[], Check]) -> Check:
    """`check`'s result, or its failure as the problem: any failure means do not use that path."""
    try:
        return check()
    except Exception as error:
        log.exception("%s self-check failed", what)
        return f"the {what} forward failed ({type(error).__name__}: {error})", 0, 0


def _compare(
    engine: Engine, batch: BatchEngine, params: list[GenerationParams], alone: list[list[int]], needed: int
) -> Check:
    """(a problem if a batched greedy text parts from the text alone too early, tokens that
    agree, tokens compared)."""
    together = _made_by(engine, batch, params)
    agreed = total = 0
    for request, one, many in zip(params, alone, together, strict=True):
        problem, common = _parting(engine, "in a batch", request.prompt, one, many, needed)
        agreed, total = agreed + common, total + max(len(one), len(many))
        if problem:
            return problem, agreed, total
    return "", agreed, total


def _compare_chunked(
    engine: Engine,
    limits: BatchLimits,
    params: GenerationParams,
    alone: list[int],
    quantized: bool,
    decode_kernel: DecodeKernel | None,
) -> Check:
    """The same for one prompt prefilled in two chunks, the second over the first's cache: its
    last logits held to a prefill in one forward within their precision (fp32, bf16), or by KL
    divergence where the tier is quantized (see `chunked_prefill`); its greedy tokens must equal
    those alone, all of them (fp32, bf16) or the first few (quantized, as a batch's)."""
    prompt = engine.prepare(params)
    chunk = math.ceil(prompt.prompt_tokens / 2)
    with torch.inference_mode(), engine.loaded.run_context():
        error = chunking_error(engine.loaded.model, prompt.input_ids, chunk)
    problem = _chunking_problem(error, quantized)
    if problem:
        return problem, 0, len(alone)
    with BatchEngine(
        engine,
        replace(limits, max_batch=1, prefill_chunk_tokens=chunk),
        in_own_thread=False,
        decode_kernel=decode_kernel,
    ) as batch:
        [chunked] = _made_by(engine, batch, [params])
    needed = _QUANTIZED_PREFIX_TOKENS if quantized else _CHECK_TOKENS
    problem, common = _parting(engine, "after a chunked prefill", params.prompt, alone, chunked, needed)
    return problem, common, max(len(alone), len(chunked))


def _chunking_problem(error: ChunkingError, quantized: bool) -> str:
    """Why a chunked prefill's last logits are too far from one forward's, or "" if they are not."""
    if quantized:
        if error.kl <= PAGED_MAX_KL:  # NaN fails too
            return ""
        return (
            f"its next-token distribution is {error.kl:.3g} nats (KL divergence) from a prefill in one "
            f"forward's (allowed: {PAGED_MAX_KL})"
        )
    if error.acceptable:
        return ""
    return (
        f"its logits differ from a prefill in one forward by up to {error.difference:.3g} "
        f"(allowed: {error.tolerance:.3g})"
    )


def _made_by(engine: Engine, batch: BatchEngine, params: list[GenerationParams]) -> list[list[int]]:
    """The greedy tokens `batch` makes for each of `params`, all submitted at once."""
    made: list[list[int]] = [[] for _ in params]
    tickets = [
        batch.submit(engine.prepare(p), p, _appender(ids), lambda: False, time.perf_counter())
        for p, ids in zip(params, made, strict=True)
    ]
    batch.run_until_idle()
    for ticket in tickets:
        ticket.future.result(timeout=0)
    return made


def _parting(
    engine: Engine, how: str, prompt: str, one: list[int], many: list[int], needed: int
) -> tuple[str, int]:
    """(a problem if tokens made `how` part from those made alone too early, tokens in common)."""
    common = _common_prefix(one, many)
    exact_needed = needed >= _CHECK_TOKENS and one != many
    if exact_needed or common < min(needed, len(one), len(many)):
        return (
            f"greedy tokens made {how} part from those made alone after {common} for {prompt!r} "
            f"({engine.tokenizer.decode(one)!r} vs {engine.tokenizer.decode(many)!r})"
        ), common
    return "", common


Emit = Callable[[TokenEvent], None]


def _appender(ids: list[int]) -> Emit:
    def emit(event: TokenEvent) -> None:
        ids.append(event.token_id)

    return emit


def _each_alone_in(
    engine: Engine, limits: BatchLimits, params: list[GenerationParams], decode_kernel: DecodeKernel | None
) -> list[list[int]]:
    """The greedy tokens a batch engine makes for each of `params` on its own, one after another,
    each prompt prefilled in one forward."""
    with BatchEngine(
        engine,
        replace(limits, max_batch=1, prefill_chunk_tokens=None),
        in_own_thread=False,
        decode_kernel=decode_kernel,
    ) as single:
        return [_made_by(engine, single, [p])[0] for p in params]


def _paged_divergence(
    engine: Engine, params: list[GenerationParams], alone: list[list[int]], decode_kernel: DecodeKernel | None
) -> float:
    """The largest mean KL divergence, over the check's prompts, of the batch's paged path (all
    prompts one batch, teacher-forced one token per step) from the one-request path (`generate`
    teacher-forced) on each prompt followed by its greedy text alone."""
    chunks = [
        [int(i) for i in engine.prepare(p).input_ids[0].tolist()] + tokens
        for p, tokens in zip(params, alone, strict=True)
    ]
    paged = batched_log_probs(engine.loaded, chunks, decode_kernel)
    return max(
        mean_kl_divergence(tier_log_probs(engine.loaded, chunk), batched)
        for chunk, batched in zip(chunks, paged, strict=True)
    )


def _agreement(one: list[list[int]], other: list[list[int]]) -> str:
    """ "a of b": leading greedy tokens two ways of generating share, over every prompt."""
    common = sum(_common_prefix(a, b) for a, b in zip(one, other, strict=True))
    return f"{common} of {sum(max(len(a), len(b)) for a, b in zip(one, other, strict=True))}"


def _alone(engine: Engine, params: GenerationParams) -> list[int]:
    ids: list[int] = []
    engine.generate(engine.prepare(params), params, emit=_appender(ids))
    return ids


def _common_prefix(one: list[int], other: list[int]) -> int:
    for index, (a, b) in enumerate(zip(one, other, strict=False)):
        if a != b:
            return index
    return min(len(one), len(other))
