"""A copy of a tier's traced decoder graph that computes the lm_head for a prompt's last position
only: what a prefill needs to sample the first token.

IPEX's graphs compute logits at every position they are handed; for a prompt chunk that is one
`[chunk, hidden] x [hidden, vocab]` product of which one row is read. For the default model
(vocabulary 49,152, hidden 576) that is a fifth of each prompt token's multiply-adds: a 150-token
bf16 prefill on an AMX Xeon took 59.2 ms with every position's logits and 51.4 ms with the last
one's (`docs/benchmarks/prefill-last-logits-*`).

The copy slices the hidden states the final norm hands the lm_head, `[batch, positions, hidden]`,
from a start position given as one more input, so everything after the norm (the lm_head and any
cast) runs on the positions kept. Everything after the final norm works position by position,
so the rows kept are the rows the full graph computes. Where a graph does not look as expected
(its last norm is not IPEX's, or the probe's last logits differ by more than rounding), no copy
is made and prefill keeps the full graph. The lm_head of one row may round differently from that
of many (fp32 3.7e-5, the weight-only tiers one bf16 unit at 33), so the probe allows what
`chunked_prefill.chunking_tolerance` allows two correct prefills; logits at the wrong position
differ by whole units.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from tierserve.worker.kernels.chunked_prefill import chunking_tolerance
from tierserve.worker.kernels.paged_kv import empty_past

log = logging.getLogger(__name__)

# The op IPEX's lowered decoders (every tier's, native paths included) normalise with; the last
# call in a graph is the final norm, whose output only the lm_head reads.
NORM_OP = "torch_ipex::rmsnorm"
_END = 2**63 - 1


class LastPositionGraph:
    """Calls the trimmed copy as the full graph is called, plus `keep_from`: the first position
    whose logits are computed (0: all of them)."""

    def __init__(self, module: Any, function: Any) -> None:
        self._module = module
        self._function = function

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: Any,
        position_ids: torch.Tensor,
        keep_from: int = 0,
    ) -> Any:
        return self._function(
            self._module, input_ids, attention_mask, past_key_values, position_ids, keep_from
        )


def script_module(graph: Any) -> Any | None:
    """The TorchScript module behind a model's `trace_graph` (IPEX wraps the ones it loads), or None."""
    inner = getattr(graph, "optimized_model", graph)
    return inner if isinstance(inner, torch.jit.ScriptModule) else None


def last_position_graph(graph: Any) -> LastPositionGraph | None:
    """The trimmed copy of `graph` (a model's `trace_graph`), or None where the graph is not a
    TorchScript module ending in IPEX's norm and the lm_head."""
    module = script_module(graph)
    if module is None:
        return None
    copy = module.graph.copy()
    norms = [node for node in copy.nodes() if node.kind() == NORM_OP]
    if not norms:
        return None
    final_norm = norms[-1].output()
    readers = [use.user for use in final_norm.uses()]
    keep_from = copy.addInput("keep_from")
    keep_from.setType(torch._C.IntType.get())
    with copy.insert_point_guard(norms[-1]):
        dim = copy.insertConstant(1)
        trimmed = copy.insert("aten::slice", [final_norm, dim, keep_from, copy.insertConstant(_END), dim])
    trimmed.node().moveAfter(norms[-1])  # inserted before the norm, it must read the norm's output
    for reader in readers:
        for index, value in enumerate(reader.inputs()):
            if value is final_norm:
                reader.replaceInput(index, trimmed)
    copy.lint()
    function = torch._C._create_function_from_graph("forward_from_position", copy)
    return LastPositionGraph(module._c, function)


_graphs: weakref.WeakKeyDictionary[Any, LastPositionGraph | None] = weakref.WeakKeyDictionary()
_PROBE_TOKENS = 24


def prefill_graph(model: Any) -> LastPositionGraph | None:
    """The checked trimmed copy of `model`'s `trace_graph` (once per model), or None where prefill
    keeps the full graph. Call in the model's run context, under inference mode."""
    if model not in _graphs:
        _graphs[model] = checked_last_position_graph(model.trace_graph, _probe(model))
    return _graphs[model]


def _probe(model: Any) -> dict[str, Any]:
    """A prompt of a few tokens as the full graph takes it, with IPEX's own (empty) cache."""
    ids = torch.arange(100, 100 + _PROBE_TOKENS).unsqueeze(0)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "past_key_values": empty_past(int(model.config.num_hidden_layers), 1),
        "position_ids": torch.arange(_PROBE_TOKENS).unsqueeze(0),
    }


def checked_last_position_graph(graph: Any, probe: dict[str, Any]) -> LastPositionGraph | None:
    """`last_position_graph`, kept only if on `probe` (the full graph's keyword arguments for a
    prompt of several tokens) its last position's logits are the full graph's, to rounding."""
    try:
        trimmed = last_position_graph(graph)
        if trimmed is None:
            return None
        full = graph(**probe)[0]
        last = trimmed(**probe, keep_from=int(full.shape[1]) - 1)[0]
    except Exception:  # a graph this copy does not understand: prefill keeps the full graph
        log.warning("prefill computes every position's logits: the graph could not be trimmed", exc_info=True)
        return None
    expected = full[:, -1:]
    if tuple(last.shape) != tuple(expected.shape):
        log.warning("prefill computes every position's logits: the trimmed graph's are %s", tuple(last.shape))
        return None
    difference = float((last.float() - expected.float()).abs().max())
    if not difference <= chunking_tolerance(expected):  # NaN fails too
        log.warning(
            "prefill computes every position's logits: the trimmed graph's last differ by %.3g", difference
        )
        return None
    return trimmed
