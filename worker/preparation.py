"""From config to a ready tier: the prepared model, the tier's cached artifact, its accuracy card."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tierserve.domain.config import BatchingConfig, TierserveConfig
from tierserve.domain.textsets import calibration_path, eval_path, fingerprint, read_paragraphs
from tierserve.ops.modelprep import prepare_model
from tierserve.worker.accuracy import (
    AccuracyCard,
    batched_log_probs,
    eval_chunks,
    measure_card,
    reference_log_probs,
)
from tierserve.worker.artifacts import ArtifactStore, ProgressSink
from tierserve.worker.batching.startup import decode_kernel_for, unbatchable
from tierserve.worker.isa import CpuIsa
from tierserve.worker.kernels import decode_attention
from tierserve.worker.tiers import LoadedModel, TierContext, make_tier

# What a card was scored through (`PreparedTier.scored_through`).
THROUGH_BATCH = "the batch's paged path"
THROUGH_GENERATE = "generate, one request at a time"


@dataclass(frozen=True)
class PreparedTier:
    loaded: LoadedModel
    card: AccuracyCard
    model_dir: Path
    artifact_dir: Path
    scored_through: str = THROUGH_GENERATE


def prepare_tier(
    config: TierserveConfig,
    tier_name: str,
    progress: ProgressSink = lambda stage, done, total: None,
    console: Console | None = None,
    batching: BatchingConfig | None = None,
) -> PreparedTier:
    """Load `tier_name` ready to serve: reuse its cached artifact and card, or build and measure them.
    The card is scored as a worker with `batching` (default: the config's) serves: through the
    batch's paged path where batching is on and the model can batch, else through `generate`."""
    batching = batching or config.batching
    kernel_dir = config.model.resolved_cache_dir() / "kernels"
    from transformers import AutoConfig

    model_dir = prepare_model(config.model, console or Console(stderr=True))
    context = TierContext(
        recipe=config.recipe(tier_name), isa=CpuIsa.detect(), calibration_file=calibration_path(config.data)
    )
    tier = make_tier(tier_name, context)
    tier.check(AutoConfig.from_pretrained(model_dir))  # bad recipe settings fail here, before any work
    eval_texts = read_paragraphs(eval_path(config.data))

    def measure(loaded: LoadedModel, report: Callable[[int, int], None]) -> AccuracyCard:
        chunks = eval_chunks(
            loaded.tokenizer, eval_texts, config.data.eval_tokens, config.data.eval_chunk_tokens
        )
        progress("scoring the fp32 reference", 0, 1)
        reference = reference_log_probs(model_dir, chunks)
        if not _batched(loaded, batching):
            return measure_card(loaded, chunks, reference, report)
        progress("scoring through the batch's paged path", 0, 1)
        scored = batched_log_probs(loaded, chunks, decode_kernel_for(batching, kernel_dir)[0])
        return measure_card(loaded, chunks, reference, report, scored)

    store = ArtifactStore(config.model.resolved_cache_dir() / "artifacts")
    # The card depends on how much of the text is scored, and in what chunks, as well as on the text.
    # And on the path it is scored through: a batch's attention rounds otherwise than IPEX's, and
    # its KV cache may be kept in another dtype (int8-sq's bfloat16).
    scoring = f"batched, {batching.decode_attention} decode attention" if batching.enabled else "generate"
    # And on the kernel library's sources (its name carries their digest): the quantized linears
    # and the decode attention compute there, so a change to them is measured again, though the
    # stored weights stay valid.
    kernels = decode_attention.library_name()
    eval_digest = (
        f"{fingerprint(eval_texts)}:{config.data.eval_tokens}:{config.data.eval_chunk_tokens}:{scoring}:"
        f"{kernels}"
    )
    artifact = store.ensure(tier, model_dir, eval_digest, measure, progress)
    loaded = artifact.loaded
    if loaded is None:
        progress(f"loading {tier_name}", 0, 1)
        loaded = tier.load(model_dir, artifact.path)
    through = THROUGH_BATCH if _batched(loaded, batching) else THROUGH_GENERATE
    return PreparedTier(loaded, artifact.card, model_dir, artifact.path, through)


def _batched(loaded: LoadedModel, batching: BatchingConfig) -> bool:
    return batching.enabled and unbatchable(loaded) is None
