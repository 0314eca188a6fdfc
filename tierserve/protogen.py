"""Generate the Python gRPC stubs from protos/ (one command: `python -m tierserve.protogen`).

The stubs are checked in; a test regenerates them into a temporary folder and
fails when the checked-in ones are stale.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE = Path("tierserve") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and *_pb2_grpc.pyi under out_root/tierserve/v1."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    plugin_dir = Path(sys.executable).parent
    out = str(out_root)
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
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    return sorted((out_root / PROTO_PACKAGE).glob("*_pb2*"))


def main() -> None:
    written = generate(REPO_ROOT)
    print("\n".join(str(p.relative_to(REPO_ROOT)) for p in written))


if __name__ == "__main__":
    main()
