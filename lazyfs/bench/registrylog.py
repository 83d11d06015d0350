"""What a registry served, from docker-registry's access log (Apache combined format).

A line looks like::

    169.254.200.1 - - [23/Nov/2026:16:35:56 +0000] "GET /v2/r/blobs/sha256:… HTTP/1.1" 206 1048576 "" "ua"

The size field is the body bytes the registry wrote (ranged answers count their range). The
registry's own log lines (``time=… level=…``) share the file and are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_ACCESS = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+)[^"]*" (\d{3}) (\d+|-)')


@dataclass
class RegistryTraffic:
    requests: int = 0
    bytes: int = 0
    blob_requests: int = 0
    blob_bytes: int = 0
    manifest_requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"requests": self.requests, "bytes": self.bytes, "blob_requests": self.blob_requests,
                "blob_bytes": self.blob_bytes, "manifest_requests": self.manifest_requests,
                "by_status": dict(self.by_status)}


def log_position(path: Path) -> int:
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        return 0


def traffic_since(path: Path, offset: int) -> RegistryTraffic:
    """Sum the access-log lines written after byte ``offset``."""
    traffic = RegistryTraffic()
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    for line in text.splitlines():
        m = _ACCESS.match(line)
        if m is None:
            continue
        method, target, status, size = m.groups()
        nbytes = int(size) if size != "-" else 0
        traffic.requests += 1
        traffic.bytes += nbytes
        traffic.by_status[status] = traffic.by_status.get(status, 0) + 1
        path_only = target.split("?", 1)[0]
        if "/blobs/sha256:" in path_only and method in ("GET", "HEAD"):
            traffic.blob_requests += 1
            traffic.blob_bytes += nbytes
        elif "/manifests/" in path_only:
            traffic.manifest_requests += 1
    return traffic
