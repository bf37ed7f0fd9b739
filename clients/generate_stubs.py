"""Regenerates the Python stubs next to the .proto: `python clients/generate_stubs.py`.

The stubs are committed so that installing needs no protoc; tests/test_proto_and_config.py fails
when they fall behind the .proto (it compares descriptors, so a newer protoc alone does not fail it).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO = "advface/v1/plugin.proto"


def include_paths() -> list[str]:
    """protoc's -I flags for the .proto's imports: protobuf's well-known types and googleapis' rpc/status."""
    import google.rpc.status_pb2  # noqa: F401  (locates googleapis-common-protos' .proto files)
    well_known = str(resources.files("grpc_tools") / "_proto")
    googleapis = str(Path(sys.modules["google.rpc.status_pb2"].__file__).parent.parent.parent)
    return [f"-I{well_known}", f"-I{googleapis}"]


def generate(out: Path = HERE) -> None:
    args = ["protoc", f"-I{HERE}", *include_paths(),
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", PROTO]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


if __name__ == "__main__":
    generate()
