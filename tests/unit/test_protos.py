"""The checked-in stubs must match what `make proto` generates from protos/."""

from pathlib import Path

from tierserve.protogen import PROTO_PACKAGE, REPO_ROOT, generate


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc produced no files"
    checked_in = sorted((REPO_ROOT / PROTO_PACKAGE).glob("*_pb2*"))
    assert [p.name for p in fresh] == [p.name for p in checked_in], "run `make proto`"
    stale = [p.name for p in fresh if p.read_bytes() != (REPO_ROOT / PROTO_PACKAGE / p.name).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit"
