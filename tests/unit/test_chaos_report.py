"""The chaos benchmark's judgement of a stream and its report's arithmetic: failures told apart by cause,
lost = every request that neither completed nor was refused for overload nor cancelled on purpose, and
every finished stream's text against an uninterrupted run of the same request."""

from __future__ import annotations

from tierserve_client.v1 import generate_pb2

from tierserve.benchmarks.chaos import ChaosTally, chaos_markdown, check_stream, request_lengths
from tierserve.benchmarks.chaos_texts import FinishedStream, RequestShape, compare_texts, first_difference


def stream(indexes: list[int], text: str, generated: int) -> list[generate_pb2.GenerateResponse]:
    tokens = [generate_pb2.GenerateResponse(token=generate_pb2.Token(index=i, text=" a")) for i in indexes]
    summary = generate_pb2.Summary(text=text, generated_tokens=generated)
    return [*tokens, generate_pb2.GenerateResponse(summary=summary)]


def test_a_whole_stream_passes_and_each_kind_of_seam_is_named() -> None:
    assert check_stream(stream([0, 1], " a a", 2)) == ""
    assert check_stream(stream([0, 2], " a a", 2)).startswith("token indexes")
    assert check_stream(stream([0, 1], " a", 2)) == "streamed text differs from the summary's"
    assert check_stream(stream([0, 1], " a a", 3)).startswith("2 tokens but")
    assert check_stream(stream([0], " a", 1)[:-1]) == "no summary"


def test_lost_counts_every_request_not_completed_refused_or_cancelled_on_purpose() -> None:
    tally = ChaosTally(sent=20, completed=11, cancelled_by_client=2)
    tally.failed.update({"RESOURCE_EXHAUSTED": 3, "UNAVAILABLE": 1, "DEADLINE_EXCEEDED": 1, "CANCELLED": 1})
    report = tally.to_json(unfinished=1)
    assert report["refused_for_overload"] == 3 and report["cancelled_by_client"] == 2
    assert report["fault_failures_by_code"] == {"UNAVAILABLE": 1, "DEADLINE_EXCEEDED": 1}
    # A CANCELLED the client did not ask for is no fault's and no overload's: unexpected, and lost.
    assert report["unexpected_failures_by_code"] == {"CANCELLED": 1}
    # 3 failed (not overload) + 1 unfinished.
    assert report["lost"] == 4 and report["unfinished"] == 1


def test_overload_refusals_and_deliberate_cancels_are_not_lost() -> None:
    tally = ChaosTally(sent=10, completed=7, cancelled_by_client=1)
    tally.failed["RESOURCE_EXHAUSTED"] = 2
    report = tally.to_json(unfinished=0)
    assert report["lost"] == 0 and report["fault_failures_by_code"] == {}
    assert report["failed_by_code"] == {"RESOURCE_EXHAUSTED": 2}


def finished(text: str, tier: str = "fp32", failovers: int = 0, after: int = 0) -> FinishedStream:
    return FinishedStream(SHAPE, text, "b", tier, failovers, after, ("a",) if failovers else ())


SHAPE = RequestShape("The history of the lighthouse begins", 24)


def test_every_finished_stream_is_compared_with_its_reference_and_a_difference_is_shown() -> None:
    references = {SHAPE: " with a keeper and his lamp."}
    streams = [
        finished(" with a keeper and his lamp."),
        finished(" with a keeper and his lamp.", failovers=1, after=5),
        # Resumed after 5 tokens and continued differently from the uninterrupted run.
        finished(" with a keeper and her lamp.", failovers=1, after=5),
        # Sent again before its first token: not resumed, still compared.
        finished(" with a keeper and his lamp.", failovers=1, after=0),
    ]
    check = compare_texts(streams, references, "fp32")
    assert (check.compared, check.resumed_compared, check.resumed_mismatches) == (4, 2, 1)
    (mismatch,) = check.mismatches
    assert mismatch["first_difference_at"] == len(" with a keeper and h")
    assert mismatch["expected"].endswith("his lamp.") and mismatch["got"].endswith("her lamp.")
    assert mismatch["resumed_after_tokens"] == 5 and mismatch["failed_workers"] == ["a"]
    report = check.to_json()
    assert report["mismatches"] == 1 and report["resumed_mismatches"] == 1


def test_a_stream_a_worker_of_another_tier_finished_differs_even_with_the_same_text() -> None:
    check = compare_texts([finished(" same", tier="bf16")], {SHAPE: " same"}, "fp32")
    assert len(check.mismatches) == 1 and check.mismatches[0]["tier"] == "bf16"


def test_first_difference_and_the_request_lengths() -> None:
    assert first_difference("abc", "abd") == 2
    assert first_difference("ab", "abc") == 2 and first_difference("", "x") == 0
    assert request_lengths(48) == [24, 48] and request_lengths(1) == [1]


def test_the_markdown_report_lists_every_figure() -> None:
    tally = ChaosTally(sent=5, completed=3, cancelled_by_client=1, resumed=1)
    tally.failed["UNAVAILABLE"] = 1
    texts = compare_texts([finished(" a"), finished(" b", failovers=1, after=2)], {SHAPE: " a"}, "fp32")
    report = {
        "config": {
            "clients": 3,
            "duration_s": 40,
            "tier": "fp32",
            "request_lengths": [24, 48],
            "kill_every_s": 8,
            "workers": ["a", "b"],
            "seed": 7,
        },
        "requests": tally.to_json(unfinished=0),
        "texts": texts.to_json(),
        "kills": [{"at_s": 8.1, "worker": "a", "pid": 42, "in_flight": 2}],
        "restarts": 1,
    }
    markdown = chaos_markdown(report)
    for row in (
        "| sent | 5 |",
        "| completed | 3 |",
        "| resumed after a failover (tokens had been streamed) | 1 |",
        "| failed by a worker fault | UNAVAILABLE 1 |",
        "| **lost** | **1** |",
        "| **texts that differ** (resumed) | **1** (1) |",
        "| 8.1 | a | 42 | 2 |",
    ):
        assert row in markdown, row
    assert "differs at character 1: expected `' a'`, got `' b'`" in markdown
