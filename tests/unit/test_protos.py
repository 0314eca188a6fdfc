"""The checked-in stubs must match what `make proto` generates from protos/."""

from pathlib import Path

from tierserve.rpc.protogen import STUBS_PACKAGE, STUBS_ROOT, generate


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc produced no files"
    checked_in_dir = STUBS_ROOT / STUBS_PACKAGE
    checked_in = sorted(checked_in_dir.glob("*_pb2*"))
    assert [p.name for p in fresh] == [p.name for p in checked_in], "run `make proto`"
    stale = [p.name for p in fresh if p.read_bytes() != (checked_in_dir / p.name).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit"


def test_stubs_import_only_the_client_package() -> None:
    for stub in (STUBS_ROOT / STUBS_PACKAGE).glob("*_pb2*.py*"):
        text = stub.read_text()
        assert "from tierserve.v1 import" not in text, stub.name
        assert "import tierserve.v1" not in text, stub.name
