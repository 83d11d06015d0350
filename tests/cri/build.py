#!/usr/bin/env python3
"""Generate the Python gRPC client for the CRI subset in api.proto (``tests.cri.api_pb2*``)."""

import sys
from pathlib import Path

from snapshotter.api.build import generate

if __name__ == "__main__":
    sys.exit(generate(Path(__file__).resolve().parent, ["api.proto"]))
