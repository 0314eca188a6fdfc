"""The pure parts of `tierserve bench tiers`: prompts of exact token counts, speed-ups, dominance,
the memory-bandwidth floor, the llama.cpp peer's model parameters, the report's table and file names,
and the warm-up it shares with the worker. No real model is loaded (only the real tokenizer)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.tiny_model import default_model_dir
from tierserve.benchmarks.tiers import floor
from tierserve.benchmarks.tiers.floor import decode_weight_bytes, floor_ms, percent_of_floor
from tierserve.benchmarks.tiers.llamacpp import (
    LLAMACPP,
    card_from_log_probs,
    compare_tokenizations,
    llama_model_params,
    llama_params_note,
    open_llama,
    tokenization_note,
)
from tierserve.benchmarks.tiers.measure import BASELINE, WARMUP_RUNS, WorkerSpec, exact_token_prompt
from tierserve.benchmarks.tiers.report import (
    PathMeasurement,
    find_dominators,
    four_bit_source_note,
    mark_dominated,
    markdown_table,
    output_paths,
    render_markdown,
    result_row,
    speedup,
)
from tierserve.benchmarks.tiers.run import select_tiers
from tierserve.domain.config import ConfigError, DataConfig
from tierserve.domain.textsets import eval_path, read_paragraphs


def row(tier: str, tpot_ms: float | None, delta: float | None, kernel: str = "k") -> dict[str, Any]:
    return {"tier": tier, "tpot_ms": tpot_ms, "ppl_delta_pct": delta, "kernel": kernel}


def measurement(tier: str, runs_us: list[list[int]], card: dict[str, float] | None = None) -> PathMeasurement:
    return PathMeasurement(
        tier=tier,
        backend="b",
        kernel="k",
        load_s=1.5,
        rss_mb=512.0,
        threads=2,
        cpus=[0, 1],
        runs_us=runs_us,
        ttft_256_us=[90_000, 70_000, 80_000],
        cpu_share=0.97,
        card=card,
    )


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.mark.parametrize("n_tokens", [2, 32, 256])
def test_prompts_encode_to_exactly_the_requested_tokens(tokenizer: Any, n_tokens: int) -> None:
    text = "\n\n".join(read_paragraphs(eval_path(DataConfig())))
    prompt = exact_token_prompt(tokenizer, text, n_tokens)
    assert len(tokenizer(prompt)["input_ids"]) == n_tokens
    assert text.startswith(prompt)
    with pytest.raises(ValueError, match="no room"):
        exact_token_prompt(tokenizer, text, 1)  # SmolLM2's tokenizer adds a BOS token


class WordTokenizer:
    """One token per character, except that "ab" is one token: cutting between a and b re-encodes longer."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids, i = ([0] if add_special_tokens else []), 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return "".join("ab" if t == 1000 else chr(t) for t in ids)


def test_prompt_search_accounts_for_special_tokens_and_merges() -> None:
    tokenizer = WordTokenizer()
    text = "xab" * 20
    for n in range(2, 12):
        prompt = exact_token_prompt(tokenizer, text, n)
        assert len(tokenizer(prompt)["input_ids"]) == n  # one special token plus n - 1 of the text
    with pytest.raises(ValueError, match="too short"):
        exact_token_prompt(tokenizer, "xab", 50)


def test_speedup_is_baseline_tpot_over_path_tpot() -> None:
    assert speedup(54.0, 13.5) == pytest.approx(4.0)
    assert speedup(54.0, 108.0) == pytest.approx(0.5)
    assert speedup(None, 10.0) is None and speedup(54.0, None) is None and speedup(54.0, 0.0) is None


def test_figures_come_from_the_runs_and_the_card() -> None:
    baseline = measurement(BASELINE, [[100_000, 50_000, 54_000, 58_000]] * 2)
    card = {
        "perplexity": 30.0,
        "perplexity_delta_pct": 1.5,
        "kl_divergence": 0.01,
        "top1_agreement": 0.95,
        "eval_tokens": 1020.0,
        "reference_perplexity": 29.55,
    }
    fast = measurement("bf16", [[40_000, 10_000, 12_000, 14_000], [60_000, 13_000, 12_000, 12_000]], card)
    assert baseline.tpot_ms() == pytest.approx(54.0)
    data = result_row(fast, baseline.tpot_ms())
    assert data["tpot_ms"] == pytest.approx(12.0) and data["ttft_ms"] == pytest.approx(50.0)
    assert data["ttft_256_ms"] == pytest.approx(80.0)
    assert data["speedup_vs_hf_fp32"] == pytest.approx(4.5)
    assert data["tokens_per_s"] == pytest.approx(8 / 0.173, abs=0.01)
    assert (data["ppl"], data["ppl_delta_pct"], data["kld"], data["top1_agree"]) == (30.0, 1.5, 0.01, 0.95)
    assert data["runs"] == 2 and data["generated_tokens"] == 4 and data["dominated_by"] is None
    for key in ("tier", "backend", "tpot_ms", "ttft_ms", "ttft_256_ms", "rss_mb", "kernel", "load_s"):
        assert key in data
    json.dumps(data, allow_nan=False)
    assert result_row(measurement("x", [[1000]]), None)["tpot_ms"] is None  # one token: no TPOT


def test_measurements_round_trip_through_the_worker_json() -> None:
    original = measurement("fp32", [[3, 2, 1]], {"perplexity": 2.0})
    reply = {**original.__dict__, "artifact_cached": False, "build_s": 12.5}
    again = PathMeasurement.from_json(json.loads(json.dumps(reply)))
    assert again.runs_us == [[3, 2, 1]] and again.card == {"perplexity": 2.0}
    assert again.artifact_cached is False and again.build_s == 12.5


def test_dominated_means_slower_and_less_accurate_than_another_path() -> None:
    rows = [
        row(BASELINE, 54.0, 0.0),
        row("fp32", 29.0, 0.001),  # faster than the baseline, equally accurate within the tie margin
        row("bf16", 13.0, 0.3),
        row("int8-sq", 11.7, 2.0),
        row("int8-woq", 199.0, 0.4),
        row("int4-woq", 206.0, 15.0),
        row(LLAMACPP, 9.0, None),  # no card: neither dominates nor is dominated
    ]
    dominators = find_dominators(rows)
    assert dominators[BASELINE] == [] and dominators["fp32"] == []
    assert dominators["bf16"] == [] and dominators["int8-sq"] == []
    assert dominators["int8-woq"] == [BASELINE, "fp32", "bf16"]
    assert dominators["int4-woq"] == [BASELINE, "fp32", "bf16", "int8-sq", "int8-woq"]
    assert LLAMACPP not in dominators


def test_a_measured_perplexity_gain_counts_as_no_loss() -> None:
    rows = [row("fp32", 29.0, 0.0), row("bf16", 13.0, -0.01), row("int4-woq", 8.0, -0.2)]
    dominators = find_dominators(rows)
    assert dominators == {"fp32": [], "bf16": [], "int4-woq": []}
    rows.append(row("int8-woq", 12.0, 0.9))
    assert find_dominators(rows)["int8-woq"] == ["int4-woq"]


def test_dominance_notes_explain_the_slow_woq_path() -> None:
    rows = [
        row("fp32", 29.0, 0.0),
        row("int8-woq", 199.0, 0.4, kernel="torch native int8 WOQ"),
        row("x", 40, 1),
    ]
    notes = mark_dominated(rows, woq_fast=False, isa_summary="AVX512_BF16 AVX512")
    assert [r["dominated_by"] for r in rows] == [None, ["fp32"], ["fp32"]]
    woq_note = rows[1]["dominated_note"]
    assert notes == [woq_note, rows[2]["dominated_note"]]
    assert "AMX and AVX512_FP16" in woq_note and "torch native int8 WOQ" in woq_note and "fp32" in woq_note
    assert "AMX" not in rows[2]["dominated_note"]
    mark_dominated(rows, woq_fast=True, isa_summary="AMX AVX512_FP16")
    assert "AMX" not in rows[1]["dominated_note"]


def test_dominance_by_int4_on_a_four_bit_source_model_says_why() -> None:
    assert four_bit_source_note(64) is None  # groups straddle the GGUF blocks: no such claim
    source = four_bit_source_note(32)
    assert source is not None and "Q4_1" in source and "groups of 32" in source
    rows = [row("fp32", 29.0, 0.0), row("bf16", 13.0, 0.12), row("int4-woq", 9.0, 0.05), row("x", 20, 2)]
    mark_dominated(rows, woq_fast=False, isa_summary="AVX512", source_note=source)
    assert rows[1]["dominated_by"] == ["int4-woq"] and "Q4_1" in rows[1]["dominated_note"]
    assert rows[3]["dominated_by"] == ["bf16", "int4-woq"] and "Q4_1" in rows[3]["dominated_note"]
    mark_dominated(rows, woq_fast=False, isa_summary="AVX512")
    assert "Q4_1" not in rows[1]["dominated_note"]


def test_markdown_table_has_one_line_per_path() -> None:
    rows = [
        result_row(measurement(BASELINE, [[100_000, 50_000, 54_000]]), 52.0),
        result_row(measurement("int4-woq", [[100_000, 200_000]]), 52.0),
    ]
    rows[1]["dominated_by"] = ["fp32", "bf16"]
    rows[1]["artifact_cached"] = False
    table = markdown_table(rows).splitlines()
    assert len(table) == 4 and table[0].startswith("| path | TPOT ms")
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| hf-eager-fp32 | 52.00 |" in table[2] and "| 1.00x |" in table[2] and "| n/a |" in table[2]
    assert "| 0.26x |" in table[3] and "(built)" in table[3] and table[3].endswith("| fp32, bf16 |")


def test_llamacpp_card_arithmetic_matches_the_reference_on_identical_scores() -> None:
    torch.manual_seed(0)
    chunks = [[1, 2, 3, 4], [5, 6, 7]]
    reference = [torch.log_softmax(torch.randn(len(c) - 1, 10), dim=-1) for c in chunks]
    card = card_from_log_probs(chunks, reference, reference)
    assert card.eval_tokens == 5 and card.top1_agreement == 1.0
    assert card.kl_divergence == pytest.approx(0.0, abs=1e-9)
    assert card.perplexity_delta_pct == pytest.approx(0.0) and card.perplexity == card.reference_perplexity
    worse = card_from_log_probs(chunks, [torch.log_softmax(r * 0.2, dim=-1) for r in reference], reference)
    assert worse.kl_divergence > 0


def test_tier_selection_skips_unregistered_tiers_with_a_note() -> None:
    chosen, notes = select_tiers(None, ["fp32", "bf16", "int8-sq"])
    assert chosen == ["fp32", "bf16", "int8-sq"]
    assert len(notes) == 2 and "int8-woq" in notes[0] and "int4-woq" in notes[1]
    assert select_tiers("bf16, fp32", ["fp32", "bf16"]) == (["fp32", "bf16"], [])
    with pytest.raises(ConfigError, match="fp64"):
        select_tiers("fp32,fp64", ["fp32"])


def test_outputs_sit_next_to_the_json(tmp_path: Path) -> None:
    meta, md, png = output_paths(tmp_path / "tiers.json")
    assert (meta.name, md.name, png.name) == ("tiers.meta.json", "tiers.md", "tiers.png")
    assert output_paths(tmp_path / "results")[1].name == "results.md"


def test_worker_spec_round_trips(tmp_path: Path) -> None:
    spec = WorkerSpec("fp32", {"workers": []}, "/m", "", [0, 1], 5, 64, "a", "b", [1], [2], [2])
    spec.save(tmp_path / "spec.json")
    assert WorkerSpec.load(tmp_path / "spec.json") == spec


class RecordingEngine:
    """Stands in for the Engine: records what it is asked to generate."""

    context_tokens = 2048

    def __init__(self) -> None:
        self.generated: list[Any] = []

    def prepare(self, params: Any) -> Any:
        return SimpleNamespace(prompt_tokens=len(params.prompt.split()))

    def generate(self, prepared: Any, params: Any, emit: Any) -> None:
        self.generated.append(params)


def test_benchmark_and_worker_share_one_warm_up_without_ipex() -> None:
    from tierserve.worker.warmup import WARMUP_NEW_TOKENS, WARMUP_PROMPT, long_prefill_params, warm_up

    engine: Any = RecordingEngine()
    long_prefill = long_prefill_params(engine)
    assert long_prefill is not None and long_prefill.prompt.startswith(WARMUP_PROMPT + " " + WARMUP_PROMPT)
    warm_up(engine, WARMUP_RUNS, long_prefill)
    assert len(engine.generated) == 3 * WARMUP_RUNS == 6
    greedy, sampled, prefill = engine.generated[:3]
    assert greedy.sampling.temperature == 0 and sampled.sampling.temperature > 0
    assert greedy.prompt == sampled.prompt == WARMUP_PROMPT and greedy.max_new_tokens == WARMUP_NEW_TOKENS
    assert prefill is long_prefill
    # The subprocess entry (llama.cpp's too) and the warm-up import neither IPEX nor torch.
    code = (
        "import sys, tierserve.benchmarks.tiers.run, tierserve.worker.warmup; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'intel_extension_for_pytorch')))"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_a_batching_worker_warms_only_the_greedy_one_request_path_and_samples_on_demand() -> None:
    from tierserve.worker.warmup import long_prefill_params, warm_sampling, warm_up

    engine: Any = RecordingEngine()
    warm_up(engine, 2, long_prefill_params(engine), sampled=False)
    assert [p.sampling.temperature for p in engine.generated] == [0, 0, 0, 0]  # greedy, long prefill x 2
    engine.generated.clear()
    warm_sampling(engine, 2)
    assert len(engine.generated) == 2 and all(p.sampling.temperature > 0 for p in engine.generated)
    assert all(p.sampling.seed == 1 and p.sampling.top_k == 40 for p in engine.generated)


def test_tokenizer_comparison_reports_mismatches_and_special_prefixes() -> None:
    def hf(text: str, special: bool) -> list[int]:
        return ([1] if special else []) + [ord(c) for c in text]

    def gguf(text: str, special: bool) -> list[int]:
        return [ord(c) for c in text.replace("é", "e")]

    same = compare_tokenizations(hf, gguf, ["abc", "de"])
    assert same["matches"] and same["tokens_compared"] == 5 and same["mismatches"] == []
    assert (same["hf_special_prefix"], same["gguf_special_prefix"]) == ([1], [])
    note = tokenization_note(same)
    assert "identical token ids" in note and "prepends [1], the GGUF one []" in note
    differ = compare_tokenizations(hf, gguf, ["abc", "xé"])
    assert not differ["matches"]
    assert differ["mismatches"] == [{"text": 1, "hf_tokens": 2, "gguf_tokens": 2, "first_mismatch": 1}]
    assert "DIFFER" in tokenization_note(differ)


def test_floor_is_bytes_over_bandwidth_and_percent_is_floor_over_tpot() -> None:
    assert floor_ms(538_000_000, 20e9) == pytest.approx(26.9)
    assert percent_of_floor(26.9, 29.0) == pytest.approx(92.76, abs=0.01)
    assert floor_ms(None, 20e9) is None and floor_ms(1000, None) is None
    assert percent_of_floor(None, 29.0) is None and percent_of_floor(26.9, None) is None
    fast = measurement("bf16", [[40_000, 10_000, 12_000, 14_000]])
    fast.weight_bytes = 270_000_000
    data = result_row(fast, 54.0, bandwidth_bytes_per_s=20e9)
    assert (data["weight_mb"], data["floor_ms"], data["floor_pct"]) == (270.0, 13.5, 112.5)
    assert result_row(fast, 54.0)["floor_pct"] is None  # no bandwidth measured: no floor
    json.dumps(data, allow_nan=False)


def test_the_floor_column_and_its_method_are_rendered() -> None:
    measured = measurement("int8-woq", [[50_000, 20_000, 20_000]])
    measured.weight_bytes = 135_000_000
    rows = [result_row(measured, 40.0, 9e9)]
    table = markdown_table(rows).splitlines()
    assert "| % of floor |" in table[0] and "| 20.00 | 75% |" in table[2]
    bandwidth = {"gb_per_s": 9.0, "buffer_mib": 256, "threads": 2, "repeats": 10}
    meta = {
        "machine": {"cpu_model": "cpu", "cpu_isa": "AVX2", "usable_cpus": [0, 1]},
        "settings": {"threads": 2, "runs": 1, "new_tokens": 3},
        "read_bandwidth": bandwidth,
    }
    text = render_markdown(rows, meta)
    assert "9.0 GB/s" in text and "- int8-woq: 135.0 MB per token, floor 15.00 ms" in text
    assert "not measured" in render_markdown(rows, {**meta, "read_bandwidth": None})


def tiny_llama(tied: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def test_decode_bytes_count_what_a_step_streams() -> None:
    # Per layer: q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128; two norms of 64. Final norm 64.
    layers = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64) + 64
    head = 1000 * 64
    tied = tiny_llama(tied=True)
    assert decode_weight_bytes(tied) == 4 * (layers + head)  # the tied embedding is the head: counted once
    untied = tiny_llama(tied=False)
    assert decode_weight_bytes(untied) == 4 * (layers + head)  # the lookup table alone is left out
    assert decode_weight_bytes(tiny_llama(tied=False).to(torch.bfloat16)) == 2 * (layers + head)
    # Weights held only inside a packed object (fbgemm's dynamic int8 linear) count at one byte each.
    weight = torch.quantize_per_channel(
        torch.randn(1000, 64), torch.full((1000,), 0.01), torch.zeros(1000, dtype=torch.long), 0, torch.qint8
    )
    untied.lm_head = torch.nn.Module()
    untied.lm_head.packed = torch.ops.quantized.linear_prepack(weight, None)
    assert decode_weight_bytes(untied) == 4 * layers + head


def test_read_bandwidth_buffer_outgrows_the_l3_cache(tmp_path: Path) -> None:
    for index, (level, size) in enumerate([("1", "48K"), ("2", "1024K"), ("3", "32768K")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(level + "\n")
        (folder / "size").write_text(size + "\n")
    assert floor.l3_cache_bytes(tmp_path) == 32 * 2**20
    assert floor.l3_cache_bytes(tmp_path / "absent") is None
    assert floor.buffer_bytes_for(32 * 2**20) == 256 * 2**20 and floor.buffer_bytes_for(None) == 256 * 2**20
    assert floor.buffer_bytes_for(105 * 2**20) == 8 * 105 * 2**20
    measured = floor.measure_read_bandwidth(threads=1, buffer_bytes=16 * 2**20, repeats=2)
    assert measured.bytes_per_s > 0 and measured.buffer_bytes == 16 * 2**20
    assert measured.to_json()["buffer_mib"] == 16


def test_llama_cpp_weight_repacking_is_off_on_amx_cpus() -> None:
    assert llama_model_params({"avx2", "avx512f", "amx_bf16", "amx_tile", "amx_int8"}) == {
        "use_extra_bufts": False
    }
    assert llama_model_params({"avx2", "amx_tile"}) == {"use_extra_bufts": False}
    assert llama_model_params({"avx2", "avx512f", "avx512_bf16"}) == {}
    note = llama_params_note({"use_extra_bufts": False})
    assert note is not None and "use_extra_bufts = False" in note and "AMX" in note
    assert llama_params_note({}) is None


class FakeModelParams(ctypes.Structure):
    _fields_ = [("vocab_only", ctypes.c_bool), ("use_extra_bufts", ctypes.c_bool)]


def test_llama_model_params_reach_the_model_that_llama_cpp_python_builds() -> None:
    def defaults() -> FakeModelParams:
        return FakeModelParams(vocab_only=False, use_extra_bufts=True)

    low_level = SimpleNamespace(llama_model_default_params=defaults)

    class Llama:  # as llama-cpp-python's: model parameters from the low-level defaults, kwargs dropped
        def __init__(self, **kwargs: Any) -> None:
            self.model_params = low_level.llama_model_default_params()
            self.kwargs = kwargs

    llama_cpp = SimpleNamespace(llama_cpp=low_level, Llama=Llama)
    llm = open_llama(llama_cpp, {"use_extra_bufts": False}, model_path="m.gguf", n_ctx=8)
    assert llm.model_params.use_extra_bufts is False and llm.kwargs == {"model_path": "m.gguf", "n_ctx": 8}
    assert low_level.llama_model_default_params is defaults  # restored
    assert open_llama(llama_cpp, {}).model_params.use_extra_bufts is True
    with pytest.raises(RuntimeError, match="no model parameter use_repack"):
        open_llama(llama_cpp, {"use_repack": False})
    assert low_level.llama_model_default_params is defaults
