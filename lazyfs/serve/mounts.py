"""Kernel mount plumbing around the FUSE mount: stacking, unmounting, stale-mount cleanup.

Blocking (subprocess) calls: the daemon runs them in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class MountError(Exception):
    """A mount or unmount the kernel refused; the message carries mount(8)'s explanation."""


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def mounted_paths() -> set[str]:
    """Mount points of this mount namespace (octal escapes of /proc/self/mountinfo decoded)."""
    paths = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            field = line.split()[4]
            paths.add(_unescape(field.decode("utf-8", "surrogateescape")))
    return paths


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def device_of_mount(path: str | os.PathLike) -> str | None:
    """"major:minor" of the filesystem mounted at ``path`` (from mountinfo, no access to it)."""
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4].decode("utf-8", "surrogateescape")) == target:
                return fields[2].decode()
    return None


def set_read_ahead(path: str | os.PathLike, kib: int) -> bool:
    """Set the kernel readahead of the filesystem mounted at ``path``; False if not possible."""
    device = device_of_mount(path)
    if device is None:
        return False
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.info("cannot set readahead of %s: %s", path, e)
        return False
    return True


def is_mounted(path: str | os.PathLike) -> bool:
    return os.path.abspath(path) in mounted_paths()


def is_stale(path: str | os.PathLike) -> bool:
    """A mount whose FUSE server is gone (or stacked on one) answers ENOTCONN. (statfs too: a
    stat may be answered from attributes the kernel still has cached.)"""
    try:
        os.stat(path)
        os.statvfs(path)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    return False


def mount_flags(allow_suid_dev: bool) -> str:
    """The per-mount flags of every lazyfs mount: an image is untrusted input, so its setuid
    bits, file capabilities and device nodes take effect only when explicitly allowed."""
    return "suid,dev" if allow_suid_dev else "nosuid,nodev"


def stack_mount(lower: Sequence[Path], target: Path, *, allow_suid_dev: bool = False) -> None:
    """Present ``lower`` (topmost first) at ``target``: an overlay, or a bind mount for one dir.

    A new overlay takes its own flags; a bind mount inherits the FUSE mount's, so it is
    remounted with the wanted ones (a daemon may serve trusted and untrusted images alike).
    """
    if not lower:
        raise MountError("nothing to mount: no layers")
    target.mkdir(parents=True, exist_ok=True)
    flags = mount_flags(allow_suid_dev)
    if len(lower) == 1:
        cmds = [["mount", "--bind", str(lower[0]), str(target)],
                ["mount", "-o", f"remount,bind,ro,{flags}", str(target)]]
    else:
        for path in lower:
            if ":" in str(path) or "," in str(path):
                raise MountError(f"overlayfs cannot take a lower directory named {path}")
        options = f"ro,{flags},lowerdir=" + ":".join(str(p) for p in lower)
        cmds = [["mount", "-t", "overlay", "overlay", "-o", options, str(target)]]
    for cmd in cmds:
        result = _run(cmd)
        if result.returncode != 0:
            if cmd is not cmds[0]:
                _run(["umount", str(target)])
            raise MountError(f"{' '.join(cmd[:4])} ... {target} failed: {result.stderr.strip()}")
    log.info("mounted %s layer(s) at %s (%s)", len(lower), target, flags)


def unmount_path(path: Path, lazy_if_busy: bool = False) -> None:
    """Unmount ``path`` if mounted; with ``lazy_if_busy`` detach it lazily when busy."""
    if not is_mounted(path):
        return
    result = _run(["umount", str(path)])
    if result.returncode == 0:
        return
    if lazy_if_busy or is_stale(path):
        result = _run(["umount", "-l", str(path)])
        if result.returncode == 0:
            log.info("%s was busy or stale: detached lazily", path)
            return
    raise MountError(f"umount {path} failed: {result.stderr.strip()}")


def unmount_fuse(path: Path) -> None:
    """Unmount a FUSE mount, lazily (the server may be dead or the mount still referenced)."""
    if not is_mounted(path):
        return
    result = _run(["fusermount3", "-u", "-z", str(path)])
    if result.returncode != 0 and is_mounted(path):
        result = _run(["umount", "-l", str(path)])
        if result.returncode != 0:
            raise MountError(f"cannot unmount FUSE at {path}: {result.stderr.strip()}")
