"""Software versions and machine facts recorded with every experiment, for reproduction."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("lazyfs", "pyfuse3", "trio", "httpx", "zstandard", "xxhash", "sortedcontainers",
            "google-crc32c", "grpcio", "protobuf", "rich", "matplotlib")
TOOLS = {
    "containerd": ["containerd", "--version"],
    "runc": ["runc", "--version"],
    "ctr": ["ctr", "--version"],
    "ctr-remote": ["ctr-remote", "--version"],
    "docker-registry": ["docker-registry", "--version"],
    "skopeo": ["skopeo", "--version"],
}


def _first_line(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def _git_revision() -> str | None:
    """The commit of the lazyfs source tree (with "-dirty" for local changes), if in git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'-dirty' if dirty else ''}" if head else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mem_total_kib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def environment() -> dict:
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lazyfs_git": _git_revision(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": packages,
        "tools": {name: _first_line(cmd) for name, cmd in TOOLS.items()},
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "machine": {
            "arch": platform.machine(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "mem_total_kib": _mem_total_kib(),
            "loadavg_at_start": list(os.getloadavg()),
        },
    }
