"""`tierserve bench prefill-stall`'s pure parts: its options, its pool, and its figures from token
arrival times."""

from __future__ import annotations

import pytest

from tierserve.benchmarks.prefill_stall import (
    Stream,
    _figures,
    parse_chunks,
    render_markdown,
    stall_pool_config,
)
from tierserve.domain.config import ConfigError


def test_chunk_settings_are_sizes_or_off() -> None:
    assert parse_chunks("256, off,128,256") == [256, None, 128]
    for bad in ("8", "lots", ""):
        with pytest.raises(ConfigError, match="--chunks"):
            parse_chunks(bad)


def test_the_pool_serves_the_tier_with_the_chunk_setting() -> None:
    chunked = stall_pool_config(None, "bf16", [0, 1], 128, 384)
    assert [w.tier for w in chunked.workers] == ["bf16"]
    assert chunked.batching.enabled and chunked.batching.prefill_chunk_tokens == 128
    assert stall_pool_config(None, "bf16", [0], None, 384).batching.prefill_chunk_tokens is None
    with pytest.raises(ConfigError, match="unknown tier"):
        stall_pool_config(None, "fp8", [0], 128, 384)


def test_the_stall_is_the_worst_gap_between_the_long_prompts_arrival_and_first_token() -> None:
    alone = Stream(sent_s=0.0, token_times_s=[2.0, 2.1], text="same")
    long = Stream(sent_s=10.0, token_times_s=[12.0, 12.1], prompt_tokens=2000, text="same")
    # 0.1 s gaps (and one of 0.2) before the arrival; during the prefill one stream waits 1.6 s.
    first = Stream(token_times_s=[9.7, 9.8, 9.9, 10.8, 10.9, 12.5])
    second = Stream(token_times_s=[9.6, 9.7, 9.8, 10.0, 10.5, 11.0, 11.5, 11.9])  # ends first
    figures = _figures(alone, long, [first, second])
    assert figures["gap_before_p50_ms"] == pytest.approx(100.0)
    assert figures["worst_gap_during_prefill_ms"] == pytest.approx(1600.0)  # 10.9 -> 12.5 overlaps
    assert figures["stream_tokens_during_prefill"] == 2 + 4
    assert figures["long_ttft_ms"] == pytest.approx(2000.0)
    assert figures["long_ttft_alone_ms"] == pytest.approx(2000.0)
    assert figures["streams_ended_before_first_token"] == 1
    assert figures["long_text_same_as_alone"] and figures["errors"] == []
    report = render_markdown("bf16", [{"chunk": "256", **figures, "same_text_as_first_setting": True}])
    assert "| 256 | 2000 | 2 |" in report and "at chunk 256: raise --stream-tokens" in report


def test_a_failed_call_is_reported_not_measured() -> None:
    broken = Stream(error="UNAVAILABLE: gone")
    figures = _figures(Stream(token_times_s=[1.0]), broken, [Stream(token_times_s=[0.5])])
    assert figures == {"errors": ["UNAVAILABLE: gone"]}
    assert "errors: UNAVAILABLE: gone" in render_markdown("bf16", [{"chunk": "off", **figures}])
