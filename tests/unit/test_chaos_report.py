"""The chaos benchmark's judgement of a stream and its report's arithmetic (lost = sent - ended)."""

from __future__ import annotations

from tierserve.benchmarks.chaos import ChaosTally, check_stream
from tierserve.v1 import generate_pb2


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


def test_lost_counts_requests_that_neither_completed_nor_failed() -> None:
    tally = ChaosTally(sent=10, completed=7)
    tally.failed["RESOURCE_EXHAUSTED"] = 2
    report = tally.to_json(unfinished=1)
    assert report["lost"] == 1 and report["failed_by_code"] == {"RESOURCE_EXHAUSTED": 2}
