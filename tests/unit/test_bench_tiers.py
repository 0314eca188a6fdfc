"""The pure parts of `tierserve bench tiers`: prompts of exact token counts, speed-ups, dominance,
the report's table and file names. No model is loaded (only the real tokenizer)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_model import default_model_dir
from tierserve.benchmarks import tiers
from tierserve.benchmarks.tiers import (
    BASELINE,
    LLAMACPP,
    PathMeasurement,
    WorkerSpec,
    card_from_log_probs,
    compare_tokenizations,
    exact_token_prompt,
    find_dominators,
    four_bit_source_note,
    mark_dominated,
    markdown_table,
    output_paths,
    result_row,
    select_tiers,
    speedup,
    tokenization_note,
)
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


def test_warm_up_is_the_workers() -> None:
    """The benchmark copies worker.server's warm-up (importing that module would import IPEX)."""
    source = Path(__file__).resolve().parents[2] / "worker" / "server.py"
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(source.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("WARMUP_PROMPT", "WARMUP_NEW_TOKENS")
    }
    assert constants == {"WARMUP_PROMPT": tiers.WARMUP_PROMPT, "WARMUP_NEW_TOKENS": tiers.WARMUP_NEW_TOKENS}


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
