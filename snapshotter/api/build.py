#!/usr/bin/env python3
"""Generate the Python gRPC code for containerd's Snapshots API next to the .proto files.

protoc writes top-level imports (``import mount_pb2``); they are rewritten to package-relative
imports so the generated modules work as ``snapshotter.api.*``.
"""

import re
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

API_DIR = Path(__file__).resolve().parent
PROTOS = ["mount.proto", "snapshots.proto"]
_TOP_LEVEL_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def main() -> int:
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{API_DIR}",
        f"-I{well_known}",
        f"--python_out={API_DIR}",
        f"--grpc_python_out={API_DIR}",
        *(str(API_DIR / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for generated in API_DIR.glob("*_pb2*.py"):
        text = generated.read_text()
        generated.write_text(_TOP_LEVEL_IMPORT.sub(r"from . import \1 as \2", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
