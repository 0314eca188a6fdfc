"""Prefill's trimmed graph on tiny random models through the real tier recipes: the copy computes
the lm_head from the given position on, its last logits are the full graph's, a graph it cannot
trim or whose logits it would change is left whole, and the batch engine prefills through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.conftest import alone, batch_engine
from tierserve.domain.requests import GenerationParams, SamplingParams
from tierserve.worker.batching import engine as engine_module
from tierserve.worker.engine import Engine
from tierserve.worker.kernels import last_logits
from tierserve.worker.kernels.last_logits import (
    checked_last_position_graph,
    last_position_graph,
    prefill_graph,
)
from tierserve.worker.kernels.paged_kv import BlockPool, PagedRow, cache_shape, empty_past, paged_forward
from tierserve.worker.tiers.base import make_tier


def probe(model: Any, length: int) -> dict[str, Any]:
    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(length))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "past_key_values": empty_past(int(model.config.num_hidden_layers), 1),
        "position_ids": torch.arange(length).unsqueeze(0),
    }


@pytest.mark.parametrize("tier", ["fp32", "bf16"])
def test_the_trimmed_graph_computes_logits_from_the_given_position_on(family_dir: Path, tier: str) -> None:
    loaded = make_tier(tier).load(family_dir, family_dir)
    model = loaded.model
    with torch.inference_mode(), loaded.run_context():
        trimmed = last_position_graph(model.trace_graph)
        assert trimmed is not None
        inputs = probe(model, 12)
        full = model.trace_graph(**inputs)[0]
        tail = trimmed(**probe(model, 12), keep_from=9)[0]
        every = trimmed(**probe(model, 12), keep_from=0)[0]
    assert tuple(tail.shape) == (1, 3, full.shape[2]) and tuple(every.shape) == tuple(full.shape)
    # The same rows, to the rounding of an lm_head over fewer rows.
    assert torch.allclose(tail.float(), full[:, 9:].float(), atol=0.05)
    assert torch.allclose(every.float(), full.float(), atol=1e-6)
    assert not torch.allclose(tail[:, -1].float(), full[:, -2].float(), atol=0.05)


def test_the_checked_graph_is_kept_only_where_its_last_logits_are_the_full_graphs(llama_dir: Path) -> None:
    model = make_tier("fp32").load(llama_dir, llama_dir).model
    with torch.inference_mode():
        assert checked_last_position_graph(model.trace_graph, probe(model, 10)) is not None

        def shifted(**inputs: Any) -> Any:  # a full graph whose logits the copy would not give
            out = model.trace_graph(**inputs)
            return (out[0] + 1.0, *out[1:])

        shifted.optimized_model = model.trace_graph  # type: ignore[attr-defined]
        assert checked_last_position_graph(shifted, probe(model, 10)) is None
    assert last_position_graph(lambda **_: None) is None  # not TorchScript: nothing to trim


def test_a_graph_without_ipexs_norm_is_left_whole(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tier("fp32").load(llama_dir, llama_dir).model
    monkeypatch.setattr(last_logits, "NORM_OP", "torch_ipex::no_such_norm")
    assert last_position_graph(model.trace_graph) is None


def test_a_chunk_over_a_cache_through_the_trimmed_graph_gives_the_full_graphs_last_logits(
    llama_dir: Path,
) -> None:
    loaded = make_tier("fp32").load(llama_dir, llama_dir)
    model = loaded.model
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(), loaded.run_context():
        trimmed = prefill_graph(model)
        assert trimmed is not None
        pool = BlockPool(cache_shape(model), 8)
        whole, chunked = PagedRow(), PagedRow()
        full = paged_forward(model.trace_graph, pool, [whole], ids, torch.arange(40).unsqueeze(0))
        paged_forward(trimmed, pool, [chunked], ids[:, :24], torch.arange(24).unsqueeze(0), keep_from=23)
        last = paged_forward(
            trimmed, pool, [chunked], ids[:, 24:], torch.arange(24, 40).unsqueeze(0), keep_from=15
        )
    assert tuple(last.shape) == (1, 1, full.shape[2]) and chunked.length == 40
    assert torch.allclose(last[0, 0], full[0, -1], atol=1e-4)


def test_the_batch_engine_prefills_through_the_trimmed_graph(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each prompt's forward asks for its last position's logits only, and the text is the
    one-request path's."""
    kept: list[int | None] = []

    def recorded(graph: Any, pool: Any, rows: Any, ids: torch.Tensor, positions: Any, **trim: Any) -> Any:
        logits = paged_forward(graph, pool, rows, ids, positions, **trim)
        if int(ids.shape[1]) > 1:
            kept.append(trim.get("keep_from"))
            assert int(logits.shape[1]) == 1
        return logits

    monkeypatch.setattr(engine_module, "paged_forward", recorded)
    request = GenerationParams("The sea is calm and the boats", 6, SamplingParams(), (), "test")
    with batch_engine(engine, max_batch=2, prefill_chunk_tokens=None) as batch:
        assert batch.prefills_last_logits_only
        prompt = engine.prepare(request)
        outcome = batch.submit(prompt, request, lambda _: None, lambda: False, 0.0).future.result(timeout=120)
    assert kept == [prompt.prompt_tokens - 1]
    if engine.loaded.model.dtype == torch.float32:
        assert outcome.text == alone(engine, request)
