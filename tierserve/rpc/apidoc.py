"""Write docs/api.md from the proto files and their `///` comments: `python -m tierserve.rpc.apidoc`.

protoc parses the protos with their comments (source info) into descriptors; this renders services,
messages and enums as Markdown tables. A test fails when docs/api.md is stale.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

from tierserve.rpc.protogen import PROTO_ROOT, REPO_ROOT, proto_files

API_DOC = REPO_ROOT / "docs" / "api.md"

# Paths into FileDescriptorProto (descriptor.proto's field numbers).
MESSAGE, ENUM, SERVICE = 4, 5, 6
FIELD, ONEOF, ENUM_VALUE, METHOD = 2, 8, 2, 2

INTRO = """# API reference: `tierserve.v1`

Generated from `protos/tierserve/v1/*.proto` by `python -m tierserve.rpc.apidoc`; do not edit by hand.
Clients talk to the **Router** service; the **Worker** service is what the router talks to (and
what a client may call directly, e.g. for tests). Both also serve `grpc.health.v1.Health` and server
reflection.

Errors are gRPC status codes: `INVALID_ARGUMENT` (the message starts with the field's name),
`RESOURCE_EXHAUSTED` when overloaded (trailing metadata `retry-after-ms` says when to retry),
`FAILED_PRECONDITION` when no tier meets the accuracy tolerance or `messages` come to a model without
a chat template, `UNAVAILABLE` when no worker can serve or the server is shutting down (then with
`retry-after-ms` too: retry on another replica), `DEADLINE_EXCEEDED` and `CANCELLED`.
"""

_TYPES = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
}


def parse_protos() -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc  # dev dependency, as for the stubs

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.pb"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _clean(comment: str) -> str:
    # `///` comments arrive with their third slash; one line per paragraph suits a table cell.
    lines = [line.strip().removeprefix("/").strip() for line in comment.strip().splitlines()]
    return " ".join(line for line in lines if line).replace("|", "\\|")


def _comments(proto: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {tuple(loc.path): _clean(loc.leading_comments) for loc in proto.source_code_info.location}


def _type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    name = _TYPES.get(field.type) or field.type_name.removeprefix(".tierserve.v1.").lstrip(".")
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {name}"
    return f"optional {name}" if field.proto3_optional else name


def render(files: descriptor_pb2.FileDescriptorSet) -> str:
    out = [INTRO]
    ordered = sorted(
        files.file, key=lambda f: (0 if f.service else 1, not f.name.endswith("router.proto"), f.name)
    )
    for proto in ordered:
        notes = _comments(proto)
        out.append(f"## `{proto.name}`\n")
        for s, service in enumerate(proto.service):
            out.append(f"### service `{service.name}`\n\n{notes.get((SERVICE, s), '')}\n")
            out.append("| rpc | request | response | description |\n| --- | --- | --- | --- |")
            for m, method in enumerate(service.method):
                stream = "stream " if method.server_streaming else ""
                out.append(
                    f"| `{method.name}` | `{method.input_type.split('.')[-1]}` "
                    f"| `{stream}{method.output_type.split('.')[-1]}` "
                    f"| {notes.get((SERVICE, s, METHOD, m), '')} |"
                )
            out.append("")
        for i, message in enumerate(proto.message_type):
            out.append(f"### message `{message.name}`\n\n{notes.get((MESSAGE, i), '')}\n")
            if not message.field:
                out.append("No fields.\n")
                continue
            out.append("| field | number | type | description |\n| --- | --- | --- | --- |")
            for f, field in enumerate(message.field):
                real_oneof = field.HasField("oneof_index") and not field.proto3_optional
                where = f" (oneof `{message.oneof_decl[field.oneof_index].name}`)" if real_oneof else ""
                out.append(
                    f"| `{field.name}` | {field.number} | `{_type_name(field)}`{where} "
                    f"| {notes.get((MESSAGE, i, FIELD, f), '')} |"
                )
            out.append("")
        for e, enum in enumerate(proto.enum_type):
            out.append(f"### enum `{enum.name}`\n\n{notes.get((ENUM, e), '')}\n")
            out.append("| value | number | description |\n| --- | --- | --- |")
            for v, value in enumerate(enum.value):
                out.append(f"| `{value.name}` | {value.number} | {notes.get((ENUM, e, ENUM_VALUE, v), '')} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    API_DOC.parent.mkdir(exist_ok=True)
    API_DOC.write_text(render(parse_protos()), encoding="utf-8")
    print(API_DOC.relative_to(REPO_ROOT))


if __name__ == "__main__":
    main()
