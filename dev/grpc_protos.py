"""Compile sota_serve/grpc/*.proto into sota_serve/grpc/compiled.py: each file's descriptor,
serialized, for sota_serve/grpc/protos.py to build the message classes from at run time.

protoc's Python output (``*_pb2.py``) checks at import that the protobuf runtime is not older
than the protoc that wrote it, and a runtime two majors newer refuses it; a serialized
descriptor carries no such check, so one compiled file serves every protobuf the serve extra
allows. Run after editing a .proto (grpcio-tools is a developer's tool, not a dependency):

    pip install grpcio-tools && python dev/grpc_protos.py

tests/test_grpc.py checks that compiled.py holds what the .proto files say.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "sota_serve" / "grpc"
#: constant name in compiled.py -> .proto file
FILES = {"OPEN_INFERENCE": "open_inference_grpc.proto", "HEALTH": "health.proto"}
WIDTH = 96


def compiled(proto: str) -> bytes:
    """The serialized FileDescriptorProto of ``proto``, without source positions or comments."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={PROTOS}",
                        f"--descriptor_set_out={out}", proto], check=True)
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    (file,) = files
    return file.SerializeToString(deterministic=True)


def literal(data: bytes) -> str:
    """``data`` as a parenthesized run of bytes literals, one line each."""
    text = repr(data)[2:-1]
    lines, line = [], ""
    for i, char in enumerate(text):
        line += char
        # never split an escape sequence: cut only before a backslash or a plain character
        if len(line) >= WIDTH and (i + 1 == len(text) or text[i + 1] == "\\" or not _in_escape(line)):
            lines.append(line)
            line = ""
    if line:
        lines.append(line)
    return "(\n" + "".join(f"    b'{chunk}'\n" for chunk in lines) + ")"


def _in_escape(line: str) -> bool:
    """Whether ``line`` ends inside a backslash escape (``\\x4`` of ``\\x41``, a lone ``\\``)."""
    at = line.rfind("\\")
    if at < 0 or (at > 0 and line[at - 1] == "\\" and not _in_escape(line[: at - 1])):
        return False
    tail = line[at:]
    return tail == "\\" or (tail.startswith("\\x") and len(tail) < 4)


def main() -> None:
    parts = ['"""The descriptors of open_inference_grpc.proto and health.proto, serialized: written by\n'
             'dev/grpc_protos.py, which says why and how; edit the .proto files and run it, never this file.\n'
             '"""\n']
    for name, proto in FILES.items():
        parts.append(f"\n#: {proto}\n{name} = {literal(compiled(proto))}\n")
    target = PROTOS / "compiled.py"
    target.write_text("".join(parts))
    print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
