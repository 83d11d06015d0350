#!/usr/bin/env python3
"""Generate the Python gRPC code for containerd's Snapshots API next to the .proto files.

protoc writes top-level imports (``import mount_pb2``); they are rewritten to package-relative
imports so the generated modules work as ``snapshotter.api.*``. ``generate`` serves any
directory of .proto copies the same way (the tests' CRI client is built with it).
"""

import re
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

API_DIR = Path(__file__).resolve().parent
PROTOS = ["mount.proto", "snapshots.proto"]
_TOP_LEVEL_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def generate(api_dir: Path, protos: list[str]) -> int:
    """Run protoc on ``protos`` (names in ``api_dir``), writing ``*_pb2*.py`` next to them."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{api_dir}",
        f"-I{well_known}",
        f"--python_out={api_dir}",
        f"--grpc_python_out={api_dir}",
        *(str(api_dir / p) for p in protos),
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for generated in api_dir.glob("*_pb2*.py"):
        text = generated.read_text()
        generated.write_text(_TOP_LEVEL_IMPORT.sub(r"from . import \1 as \2", text))
    return 0


def main() -> int:
    return generate(API_DIR, PROTOS)


if __name__ == "__main__":
    sys.exit(main())
