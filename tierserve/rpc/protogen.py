"""Generate the Python gRPC stubs from protos/ (one command: `python -m tierserve.rpc.protogen`).

The stubs live in the light client distribution (`clients/python`, package `tierserve_client.v1`),
so a client needs neither torch nor the server. protoc names Python modules after the proto files'
paths (`tierserve/v1/*.proto` gives `tierserve.v1`), so the stubs' imports of each other are
rewritten to `tierserve_client.v1`; the wire names (package `tierserve.v1`) are untouched. The
stubs are checked in; a test regenerates them into a temporary folder and fails when the checked-in
ones are stale.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE = Path("tierserve") / "v1"
STUBS_ROOT = REPO_ROOT / "clients" / "python"
STUBS_PACKAGE = Path("tierserve_client") / "v1"

# Only the import lines and the module names given to the descriptor builder: the serialized
# descriptors also hold "tierserve.v1." (the wire package) and must stay byte for byte.
_STUB_IMPORT = re.compile(r"^(from|import) tierserve\.v1\b", re.MULTILINE)
_BUILDER_MODULE = re.compile(r"'tierserve\.v1\.(\w+_pb2)'")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def _relocate(stub: Path) -> str:
    text = _STUB_IMPORT.sub(r"\1 tierserve_client.v1", stub.read_text())
    return _BUILDER_MODULE.sub(r"'tierserve_client.v1.\1'", text)


def generate(out_root: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and *_pb2_grpc.pyi under out_root/tierserve_client/v1."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    plugin_dir = Path(sys.executable).parent
    scratch = out_root / ".protoc"
    scratch.mkdir(parents=True, exist_ok=True)
    out = str(scratch)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--plugin=protoc-gen-mypy={shutil.which('protoc-gen-mypy', path=str(plugin_dir))}",
        f"--plugin=protoc-gen-mypy_grpc={shutil.which('protoc-gen-mypy_grpc', path=str(plugin_dir))}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    try:
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")
        target = out_root / STUBS_PACKAGE
        target.mkdir(parents=True, exist_ok=True)
        for stub in sorted((scratch / PROTO_PACKAGE).glob("*_pb2*")):
            (target / stub.name).write_text(_relocate(stub))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return sorted((out_root / STUBS_PACKAGE).glob("*_pb2*"))


def main() -> None:
    written = generate(STUBS_ROOT)
    print("\n".join(str(p.relative_to(REPO_ROOT)) for p in written))


if __name__ == "__main__":
    main()
