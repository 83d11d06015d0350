"""Kernel serving mode: a layer's tree served by the kernel's EROFS driver.

The daemon's FUSE mount shows the layer's chunk device as one read-only regular file. Here
that file gets a read-only loop device, the layer's metadata image gets another, and the
kernel mounts the metadata as EROFS with ``device=`` the chunk device's loop::

    mount("/dev/loopM", root, "erofs", MS_RDONLY, "device=/dev/loopD")

(EROFS takes extra devices of the same kind as its source: a block device source needs block
devices; hence the metadata's own loop, even where the kernel could mount a file directly.)
Metadata operations and page-cache hits then never reach the daemon; only reads of the chunk
device that miss the page cache become FUSE requests.

Loop devices are set up with one ``LOOP_CONFIGURE`` ioctl (Linux >= 5.8) with
``LO_FLAGS_AUTOCLEAR``: the kernel detaches a loop device by itself once its last user is gone
(the EROFS superblock, after the unmount -- lazy ones included -- and our descriptor, which is
closed as soon as the mount holds the device), so an unmount never leaves a loop behind and a
daemon that dies leaks none once its mounts go.

Failover: a daemon that dies leaves the EROFS mounts in place (their loop devices read its
dead FUSE files: page-cache hits still work, other reads fail). Each mount has a small record
beside it (``.<name>.loops``: the two loop devices); a new daemon attaching the same layer at
the same place finds it and swaps the chunk device's loop onto its own chunk-device file
with ``LOOP_CHANGE_FD`` (allowed for read-only loops onto a file of the same size), so the
EROFS mount, and every overlay and open file above it, reads again without a remount.

Everything here blocks, and mounting reads the chunk device through the FUSE mount that the
calling daemon serves: call it from a worker thread, never from the loop that answers FUSE.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# <linux/loop.h>
LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
LOOP_CHANGE_FD = 0x4C06
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64
# struct loop_info64: 5 x u64, 4 x u32, file name[64], crypt name[64], key[32], 2 x u64 init.
LOOP_INFO64 = struct.Struct(f"<5Q4I{LO_NAME_SIZE}s{LO_NAME_SIZE}s32s2Q")
# struct loop_config: u32 fd, u32 block_size, struct loop_info64, u64 reserved[8].
LOOP_CONFIG = struct.Struct(f"<II{LOOP_INFO64.size}s64x")
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
# A free loop device can be taken by another process between LOOP_CTL_GET_FREE and
# LOOP_CONFIGURE (EBUSY): try the next free one, a bounded number of times.
LOOP_ATTEMPTS = 32

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class KernelServeError(Exception):
    """Kernel mode is not possible for a layer (no loop devices, no EROFS, metadata refused).

    ``kind`` names the cause without the details of one layer ("loop", "device-file",
    "mount"), so that a daemon can report each cause once.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def loop_backing_file(loop: str) -> str | None:
    """The backing file of ``/dev/loopN`` as sysfs shows it, or None when the loop is unused."""
    try:
        return Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file").read_text().rstrip("\n")
    except OSError:
        return None


def attached_loops() -> dict[str, str]:
    """Every loop device in use: ``/dev/loopN`` -> its backing file (for tests and stats)."""
    loops = {}
    for entry in Path("/sys/block").glob("loop*"):
        backing = loop_backing_file(entry.name)
        if backing is not None:
            loops[f"/dev/{entry.name}"] = backing
    return loops


def attach_loop(backing_fd: int, direct_io: bool, block_size: int = 0) -> tuple[str, int]:
    """A read-only, auto-clearing loop device over ``backing_fd``: (path, open descriptor).

    The caller must keep the descriptor open until something else holds the device (a
    mount), then close it: closing the last reference detaches the loop (autoclear).
    """
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KernelServeError("loop", f"no loop devices: /dev/loop-control: {e.strerror}") from e
    flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | (LO_FLAGS_DIRECT_IO if direct_io else 0)
    info = LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, b"", b"", b"", 0, 0)
    config = LOOP_CONFIG.pack(backing_fd, block_size, info)
    try:
        for _ in range(LOOP_ATTEMPTS):
            try:
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            except OSError as e:
                raise KernelServeError("loop", f"no free loop device: {e.strerror}") from e
            path = f"/dev/loop{number}"
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # no device node (yet) for the new minor: let the kernel offer another
            except OSError as e:
                raise KernelServeError("loop", f"cannot open {path}: {e.strerror}") from e
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, config)
            except OSError as e:
                os.close(fd)
                if e.errno == errno.EBUSY:
                    continue  # taken by someone else meanwhile
                raise KernelServeError("loop", f"LOOP_CONFIGURE of {path}: {e.strerror}") from e
            return path, fd
        raise KernelServeError("loop", f"no free loop device after {LOOP_ATTEMPTS} attempts")
    finally:
        os.close(control)


def loop_flags(loop_fd: int) -> int:
    """``lo_flags`` of a configured loop device (LO_FLAGS_*)."""
    raw = fcntl.ioctl(loop_fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    return LOOP_INFO64.unpack(raw)[8]


def mount_erofs(meta_device: str, chunk_device: str, target: Path, allow_suid_dev: bool = False) -> None:
    """An image is untrusted input: its setuid bits and device nodes take effect only when
    allowed (as on the FUSE tree; overlays above take their own flags)."""
    options = f"device={chunk_device}".encode()
    flags = MS_RDONLY | (0 if allow_suid_dev else MS_NOSUID | MS_NODEV)
    if _libc.mount(meta_device.encode(), os.fsencode(target), b"erofs", flags, options) != 0:
        code = ctypes.get_errno()
        extra = "" if allow_suid_dev else "nosuid,nodev,"
        raise KernelServeError("mount", f"mount -t erofs -o ro,{extra}{options.decode()} {meta_device} {target}: "
                               f"{os.strerror(code)}")


def unmount(target: Path, lazy: bool = False) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"umount {target}: {os.strerror(code)}")


@dataclass
class KernelLayer:
    """What one layer in kernel mode holds: its EROFS mount and the two loop devices under it."""

    root: Path  # the EROFS mount: the layer's root directory
    chunk_loop: str
    meta_loop: str
    direct_io: bool
    identity: str = ""  # what the layer is (its digest; meta and blob of a plain image)

    def describe(self) -> dict:
        return {"serve": "kernel", "loop": self.chunk_loop, "meta_loop": self.meta_loop,
                "loop_direct_io": self.direct_io}


def _record_path(root: Path) -> Path:
    return root.with_name(f".{root.name}.loops")


def _write_record(layer: KernelLayer) -> None:
    path = _record_path(layer.root)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"loop": layer.chunk_loop, "meta_loop": layer.meta_loop, "direct_io": layer.direct_io,
                               "identity": layer.identity}))
    os.replace(tmp, path)


def _mount_source(target: Path) -> tuple[str, str] | None:
    """(filesystem type, source) of the topmost mount at ``target``, from mountinfo."""
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields, _, tail = line.decode("utf-8", "surrogateescape").partition(" - ")
            if fields.split()[4] == str(target):
                fstype, source = tail.split()[:2]
                found = (fstype, source)
    return found


def adopt_layer(device_file: Path, root: Path, identity: str) -> KernelLayer:
    """Take over the EROFS mount a dead daemon left at ``root``: its chunk device's loop is
    switched to ``device_file`` (this daemon's chunk-device file of the same layer, which
    ``identity`` must name as the record does) with LOOP_CHANGE_FD. KernelServeError when
    there is nothing that can be taken over."""
    try:
        record = json.loads(_record_path(root).read_text())
        chunk_loop, meta_loop, direct_io = record["loop"], record["meta_loop"], bool(record["direct_io"])
        recorded_identity = record["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KernelServeError("adopt", f"no record of the loop devices under {root}: {e}") from e
    if recorded_identity != identity:
        raise KernelServeError("adopt", f"{root} serves another layer ({recorded_identity})")
    if _mount_source(root) != ("erofs", meta_loop):
        raise KernelServeError("adopt", f"{root} is not the EROFS mount of {meta_loop} its record names")
    change_backing_file(chunk_loop, device_file)
    log.info("%s: %s now reads %s", root, chunk_loop, device_file)
    return KernelLayer(root, chunk_loop, meta_loop, direct_io, identity)


def _no_readahead(device_fd: int) -> None:
    """A loop device reads through the open file it is given: no page-cache readahead on it
    (POSIX_FADV_RANDOM), so that every read of the chunk device is one EROFS asked for. EROFS
    reads ahead within a file only; readahead of the device file would cross into other files,
    whose reads traces would then record (kernel-mode traces name the files whose cells are
    read). What follows a small read the daemon stores itself (lazyfs.serve.fuse.DevicePagePusher)."""
    os.posix_fadvise(device_fd, 0, 0, os.POSIX_FADV_RANDOM)


def change_backing_file(chunk_loop: str, device_file: Path) -> None:
    """Point a chunk device's loop at ``device_file`` (a chunk-device file of the same layer)
    with LOOP_CHANGE_FD; the kernel lets the reads in flight on the old file finish first."""
    try:
        new_fd = os.open(device_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelServeError("device-file", f"cannot open the chunk-device file {device_file}: {e.strerror}") from e
    try:
        _no_readahead(new_fd)
        loop_fd = os.open(chunk_loop, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(loop_fd, LOOP_CHANGE_FD, new_fd)
        finally:
            os.close(loop_fd)
    except OSError as e:
        raise KernelServeError("adopt", f"LOOP_CHANGE_FD of {chunk_loop} to {device_file}: {e.strerror}") from e
    finally:
        os.close(new_fd)


def mount_layer(device_file: Path, meta_fd: int, root: Path, direct_io: bool, identity: str = "",
                allow_suid_dev: bool = False) -> KernelLayer:
    """Loop devices over the chunk-device file and the metadata, and EROFS mounted at ``root``.

    On failure nothing stays: the loop descriptors are closed (autoclear detaches the loops)
    and ``root`` is removed if this call made it.
    """
    opened: list[int] = []
    made_root = False
    try:
        try:
            device_fd = os.open(device_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise KernelServeError("device-file", f"cannot open the chunk-device file {device_file}: {e.strerror}") from e
        try:
            _no_readahead(device_fd)
            chunk_loop, fd = attach_loop(device_fd, direct_io)
        finally:
            os.close(device_fd)  # the loop holds its own reference to the file
        opened.append(fd)
        meta_loop, fd = attach_loop(meta_fd, direct_io=False)
        opened.append(fd)
        if not root.is_dir():
            root.mkdir(parents=True)
            made_root = True
        mount_erofs(meta_loop, chunk_loop, root, allow_suid_dev)
        layer = KernelLayer(root, chunk_loop, meta_loop, direct_io, identity)
        try:
            _write_record(layer)
        except OSError as e:  # only failover needs it
            log.info("cannot record the loop devices of %s: %s", root, e)
        return layer
    except BaseException:
        if made_root:
            _rmdir_quietly(root)
        raise
    finally:
        for fd in opened:  # the mount (if any) holds the devices now
            os.close(fd)


def unmount_layer(root: Path, lazy_if_busy: bool = True) -> None:
    """Unmount a layer's EROFS (lazily if busy) and remove its mount point; the loop devices
    go by themselves (autoclear) once nothing uses the filesystem any more."""
    try:
        unmount(root)
    except OSError as e:
        if e.errno == errno.EINVAL:  # not mounted
            pass
        elif e.errno == errno.EBUSY and lazy_if_busy:
            unmount(root, lazy=True)
            log.info("%s was busy: detached lazily", root)
        else:
            raise
    _rmdir_quietly(root)
    try:
        _record_path(root).unlink()
    except FileNotFoundError:
        pass


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as e:
        log.debug("cannot remove %s: %s", path, e)
