"""Regenerates the Python stubs next to the .proto: `python clients/generate_stubs.py`.

The stubs are committed so that installing needs no protoc; tests/test_proto_and_config.py fails
when they fall behind the .proto.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO = "advface/v1/plugin.proto"


def generate(out: Path = HERE) -> None:
    import google.rpc.status_pb2  # noqa: F401  (locates googleapis-common-protos' .proto files)
    well_known = str(resources.files("grpc_tools") / "_proto")
    googleapis = str(Path(sys.modules["google.rpc.status_pb2"].__file__).parent.parent.parent)
    args = ["protoc", f"-I{HERE}", f"-I{well_known}", f"-I{googleapis}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", PROTO]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


if __name__ == "__main__":
    generate()
