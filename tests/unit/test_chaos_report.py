"""The chaos benchmark's judgement of a stream and its report's arithmetic: failures told apart by cause,
and lost = every request that neither completed nor was refused for overload nor cancelled on purpose."""

from __future__ import annotations

from tierserve_client.v1 import generate_pb2

from tierserve.benchmarks.chaos import ChaosTally, check_stream


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
