"""Crafted layers in a real daemon: each fails its attach or its own reads with a clear error
while a good layer in the same daemon (same FUSE mount) keeps serving.

The crafted blobs (tests.t1_hostile_layer) carry valid digests, as a hostile registry would
make them; they are served from an OCI layout directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import struct
from pathlib import Path

import pytest

from lazyfs.daemon.control import ControlError, request
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.lazymount import start_shared_daemon
from tests.t1_hostile_layer import (
    GOOD, assemble, dirent_pos, good_entries, patched_meta, raw_sections, short_twin_table, table_with, zeros_frame,
)


def layout_with(root, blobs: dict[str, bytes]) -> str:
    """An OCI layout holding ``blobs`` (name -> bytes); its reference."""
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": []}))
    for blob in blobs.values():
        (root / "blobs" / "sha256" / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    return f"oci:{root}"


# A crafted chunk never verifies: its reads fail once the read bound is spent retrying it, so a
# short bound keeps the test short (what fails, and what keeps working, is the same). No
# speculative policy: one that fetched the good layer's "ext" would put chunks with the digests
# the crafted tables name into the content-addressed cache, and the crafted reads would then be
# served those verified bytes instead of failing.
CRAFTED_DAEMON_OPTIONS = ("--read-timeout", "5", "--policy", "readahead")


def start_crafted_daemon(tmp_path, *serve: str):
    """A `lazyfs daemon` for crafted layers: (socket, FUSE mount, process)."""
    require_root()
    require_tool("fusermount3")
    socket, fuse = tmp_path / "daemon.sock", tmp_path / "fuse"
    return socket, fuse, start_shared_daemon(socket, fuse, tmp_path / "cache", tmp_path / "daemon.log",
                                             *CRAFTED_DAEMON_OPTIONS, *serve)


@pytest.fixture
def daemon(tmp_path):
    # FUSE-tree mode: lazyfs itself parses every crafted layer's metadata and serves its tree.
    socket, fuse, proc = start_crafted_daemon(tmp_path, "--serve", "fuse")
    try:
        yield socket, fuse, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def crafted_layers() -> dict[str, tuple[bytes, dict[str, str]]]:
    meta_size = len(raw_sections(GOOD)["meta"])
    good_blob, good_annotations = assemble(GOOD)
    layers = {"good": (good_blob, good_annotations)}
    layers["meta-bomb"] = assemble(GOOD, meta_stored=zeros_frame(256 << 20), meta_size=meta_size)
    blob, annotations = assemble(GOOD)
    # (an offset that is merely wrong is harmless: sections are found by digest in the cache,
    # and fetched bytes must match it)
    layers["lying-offset"] = (blob, dict(annotations, **{"containerd.io/snapshot/lazyfs.meta.offset": str(len(blob))}))

    def loop(img, meta):
        a = img.lookup(img.root_nid, b"a")
        struct.pack_into("<Q", meta, dirent_pos(img, a, b"b")[0], img.root_nid)

    layers["dir-loop"] = patched_meta(loop)

    def huge(img, meta):
        inode = img.inode(img.lookup(img.root_nid, b"ext"))
        struct.pack_into("<Q", meta, inode.offset + 8, 2**63)

    layers["huge-size"] = patched_meta(huge)
    entries = good_entries()
    first = entries[0]
    wrong = [n for n, e in enumerate(entries) if e[3] != first[3]]
    for n in wrong:  # every chunk unlike chunk 0 points at chunk 0's frame
        entries[n] = (first[0], first[1], entries[n][2], entries[n][3])
    layers["wrong-frames"] = assemble(GOOD, table=table_with(entries))
    layers["short-twin"] = assemble(GOOD, table=short_twin_table()[0])
    return layers


def attach(socket, ref: str, name: str, blob: bytes, annotations: dict[str, str]) -> dict:
    return request(str(socket), "attach", name=name, kind="lazyfs", ref=ref,
                   digest="sha256:" + hashlib.sha256(blob).hexdigest(), annotations=annotations,
                   size=len(blob), timeout=60)


def read_good(fuse) -> None:
    assert (fuse / "good" / "top").read_bytes() == b"top file\n" * 1000
    assert (fuse / "good" / "a" / "b" / "big").read_bytes() == bytes(range(256)) * 64
    assert sorted(os.listdir(fuse / "good")) == ["a", "c", "ext", "link", "top"]


def test_crafted_layers_fail_alone(daemon, tmp_path):
    socket, fuse, proc = daemon
    layers = crafted_layers()
    ref = layout_with(tmp_path / "layout", {name: blob for name, (blob, _a) in layers.items()})
    attach(socket, ref, "good", *layers["good"])
    read_good(fuse)

    # Refused at attach, with one line that says why; nothing is left attached.
    for name, why in (("meta-bomb", "decompressed to more than"), ("lying-offset", "exceeds the blob")):
        with pytest.raises(ControlError) as failure:
            attach(socket, ref, name, *layers[name])
        assert failure.value.kind == "attach-failed" and why in str(failure.value)
        assert "\n" not in str(failure.value)
        read_good(fuse)
    assert {layer["name"] for layer in request(str(socket), "list")["layers"]} == {"good"}

    # Attached, but the crafted part fails (EIO or ELOOP) for its own operations only.
    for name in ("dir-loop", "huge-size", "wrong-frames", "short-twin"):
        attach(socket, ref, name, *layers[name])
    with pytest.raises(OSError) as failure:
        for _ in os.walk(fuse / "dir-loop", onerror=_raise):
            pass
        os.listdir(fuse / "dir-loop" / "a" / "b" / "a")
    assert failure.value.errno in (errno.EIO, errno.ELOOP), failure.value
    with pytest.raises(OSError) as failure:
        os.stat(fuse / "huge-size" / "ext")
    assert failure.value.errno == errno.EIO
    assert (fuse / "huge-size" / "top").read_bytes() == b"top file\n" * 1000
    with pytest.raises(OSError) as failure:
        (fuse / "wrong-frames" / "ext").read_bytes()
    assert failure.value.errno == errno.EIO
    assert (fuse / "wrong-frames" / "a" / "b" / "big").read_bytes() == bytes(range(256)) * 64  # chunk 0's twins
    # A chunk whose bytes are valid (its digest matches) but shorter than the range mapped
    # onto it: EIO, never a short or shifted read.
    with pytest.raises(OSError) as failure:
        (fuse / "short-twin" / "ext").read_bytes()
    assert failure.value.errno == errno.EIO
    assert (fuse / "short-twin" / "top").read_bytes() == b"top file\n" * 1000
    read_good(fuse)
    assert proc.poll() is None


def _raise(error: OSError) -> None:
    raise error


@pytest.fixture
def kernel_daemon(tmp_path):
    socket, _fuse, proc = start_crafted_daemon(tmp_path, "--serve", "kernel", "--layers-dir", str(tmp_path / "layers"))
    try:
        yield socket, proc
    finally:
        for layer in request(str(socket), "list")["layers"]:
            request(str(socket), "detach", name=layer["name"], timeout=60)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_crafted_layers_fail_alone_in_kernel_mode(kernel_daemon, tmp_path):
    """Kernel serving mode: the kernel's EROFS driver parses the crafted metadata and the
    daemon serves only the chunk device. Refusals at attach are the same as in FUSE-tree mode;
    the crafted parts fail for their own operations, with the kernel's error where it is the
    kernel that finds the damage; the good layer and the daemon are untouched."""
    socket, proc = kernel_daemon
    layers = crafted_layers()
    ref = layout_with(tmp_path / "layout", {name: blob for name, (blob, _a) in layers.items()})
    good = Path(attach(socket, ref, "good", *layers["good"])["path"])
    read_good(good.parent)
    for name, why in (("meta-bomb", "decompressed to more than"), ("lying-offset", "exceeds the blob")):
        with pytest.raises(ControlError) as failure:
            attach(socket, ref, name, *layers[name])
        assert failure.value.kind == "attach-failed" and why in str(failure.value)
        read_good(good.parent)
    roots = {name: Path(attach(socket, ref, name, *layers[name])["path"])
             for name in ("dir-loop", "huge-size", "wrong-frames", "short-twin")}
    damaged = (errno.EIO, errno.ELOOP, errno.EUCLEAN)
    with pytest.raises(OSError) as failure:
        for _ in os.walk(roots["dir-loop"], onerror=_raise):
            pass
        os.listdir(roots["dir-loop"] / "a" / "b" / "a")
    assert failure.value.errno in damaged, failure.value
    with pytest.raises(OSError) as failure:  # the kernel may accept the size, never the bytes behind it
        (roots["huge-size"] / "ext").read_bytes()
    assert failure.value.errno in damaged + (errno.EFBIG, errno.EINVAL, errno.ENOMEM), failure.value
    assert (roots["huge-size"] / "top").read_bytes() == b"top file\n" * 1000
    with pytest.raises(OSError) as failure:
        (roots["wrong-frames"] / "ext").read_bytes()
    assert failure.value.errno == errno.EIO
    assert (roots["wrong-frames"] / "a" / "b" / "big").read_bytes() == bytes(range(256)) * 64
    with pytest.raises(OSError) as failure:
        (roots["short-twin"] / "ext").read_bytes()
    assert failure.value.errno == errno.EIO
    assert (roots["short-twin"] / "top").read_bytes() == b"top file\n" * 1000
    read_good(good.parent)
    assert proc.poll() is None
