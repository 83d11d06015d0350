"""Differential: what a real containerd unpacks from a crafted layer against what `lazyfs convert`
+ `lazyfs mount` serve from the same layer.

Every layer of tests/hostile_tars.py (and a few ordinary forms) is pushed as its own gzip image
to the test registry; containerd pulls it with its stock overlayfs snapshotter (Go's archive/tar
and containerd's applier) and the image's rootfs is mounted with ``ctr image mount``; lazyfs
converts it and mounts it. The trees (names, types, modes, owners, sizes, content, symlink
targets, hard links, device numbers, user.* xattrs) must be equal, or both must refuse the layer.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import hostile_tars as h
from tests.fixtures.containerd import containerd  # noqa: F401 (fixture)
from tests.fixtures.images import build_image
from tests.fixtures.lazymount import lazy_mount
from tests.fixtures.lazyimage import push_to_registry
from tests.fixtures.registry import registry  # noqa: F401 (fixture)


def extra_cases() -> list[h.Case]:
    """Ordinary forms both must read alike (they exercise the paths the hostile ones avoid)."""
    data = bytes(range(256)) * 40
    records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", b"holes"),
               (b"GNU.sparse.realsize", b"20000")]
    sparse_map = h.padded(b"2\n100\n5\n9000\n3\n")
    return [
        h.Case("ordinary-kinds",
               h.directory(b"etc", mode=0o750, uid=3, gid=4)
               + h.reg(b"etc/passwd", b"root:x:0:0\n", mode=0o4755)
               + h.header(b"etc/link", type=b"1", linkname=b"etc/passwd")
               + h.header(b"etc/sym", type=b"2", linkname=b"../nowhere")
               + h.header(b"dev/null", type=b"3", mode=0o666, fields={329: h.octal(1, 8), 337: h.octal(3, 8)})
               + h.header(b"fifo", type=b"6", mode=0o600)
               + h.reg(b"big", data * 30) + h.END,
               {}),
        h.Case("pax-xattrs-and-mtime",
               h.pax([(b"SCHILY.xattr.user.comment", b"hello"), (b"mtime", b"1600000000.123456789"),
                      (b"LIBARCHIVE.xattr.user.other", b"aGk")])
               + h.reg(b"with-xattr", b"x") + h.END, {}),
        h.Case("pax-sparse-1.0",
               h.pax(records) + h.reg(b"GNUSparseFile.0/holes", sparse_map + b"a" * 5 + b"b" * 3,
                                      size=len(sparse_map) + 8) + h.END, {}),
        h.Case("replace-and-merge",
               h.directory(b"d", mode=0o700) + h.reg(b"d/f", b"1") + h.directory(b"d", mode=0o755)
               + h.reg(b"x", b"file") + h.directory(b"x") + h.reg(b"x/inner", b"2") + h.END, {}),
        h.Case("whiteout-and-opaque",
               h.reg(b".wh.gone", b"") + h.directory(b"d") + h.reg(b"d/.wh..wh..opq", b"") + h.reg(b"d/kept", b"k")
               + h.reg(b".wh..wh.plnk", b"") + h.END, {}),
        h.Case("whiteout-after-its-file",
               h.reg(b"x", b"file") + h.reg(b".wh.x", b"") + h.END, {}),
        h.Case("whiteout-before-its-file",
               h.reg(b".wh.y", b"") + h.reg(b"y", b"file") + h.END, {}),
        h.Case("root-entry",
               h.directory(b"./", mode=0o700, uid=5) + h.reg(b"a", b"a") + h.END, {}),
    ]


def _xattrs(path: str) -> dict[str, bytes]:
    names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")]
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def signature(root: Path) -> dict[str, tuple]:
    """Per path below root: type, permission bits, owner, size, device, content or target,
    hard-link group, user.* xattrs (times are not compared: containerd stamps implicit
    directories with the time of extraction)."""
    out: dict[str, tuple] = {}
    groups: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                # A whiteout: overlayfs hides one in its lowest layer, `lazyfs mount` shows it as
                # the 0:0 device the layer holds. Either way the path is absent from the image.
                continue
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            # (st_dev, st_ino): a lazyfs mount in kernel serving mode is an overlay of one EROFS
            # per layer, whose inode numbers repeat from layer to layer.
            group = groups.setdefault((st.st_dev, st.st_ino), rel) if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if stat.S_ISREG(st.st_mode) else None,
                        st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None,
                        content, group, _xattrs(path))
    return out


def containerd_tree(ctrd, ref: str, target: Path) -> tuple[dict | None, str]:
    pulled = ctrd.ctr("image", "pull", "--hosts-dir", str(ctrd.hosts_dir), ref,
                      check=False, timeout=120)
    if pulled.returncode != 0:
        return None, (pulled.stderr or pulled.stdout).strip().splitlines()[-1]
    target.mkdir(parents=True)
    ctrd.ctr("image", "mount", "--hosts-dir", str(ctrd.hosts_dir), ref, str(target), timeout=60)
    try:
        return signature(target), ""
    finally:
        ctrd.ctr("image", "unmount", "--rm", str(target), check=False)


def lazyfs_tree(ref: str, converted: str, work: Path) -> tuple[dict | None, str]:
    result = subprocess.run([sys.executable, "-m", "lazyfs.cli", "convert", "-q", ref, converted],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        return None, result.stderr.strip()
    with lazy_mount(work / "mnt", converted, run_dir=work / "run", cache_dir=work / "cache") as mount:
        return signature(mount.path), ""


@pytest.fixture
def short_dir():
    """A short directory for run dirs (a unix socket path must fit 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lzdiff-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_lazyfs_serves_what_containerd_unpacks(containerd, registry, tmp_path, short_dir):  # noqa: F811
    containerd.trust_http_registry(registry.host)
    mismatches: list[str] = []
    report: list[str] = []
    for number, case in enumerate(h.cases() + extra_cases()):
        repo = "differential/" + re.sub(r"[^a-z0-9]+", "-", case.name.lower()).strip("-")
        push_to_registry(registry, repo, build_image([case.tar]))
        ref = f"{registry.host}/{repo}:v1"
        stock, stock_error = containerd_tree(containerd, ref, tmp_path / "ctr" / repo.replace("/", "-"))
        lazy, lazy_error = lazyfs_tree(ref, f"{registry.host}/{repo}:lazy", short_dir / str(number))
        if stock is None and lazy is None:
            report.append(f"{case.name}: both refuse (containerd: {stock_error}; lazyfs: {lazy_error})")
        elif stock is None:
            mismatches.append(f"{case.name}: containerd refuses ({stock_error}), lazyfs serves {sorted(lazy)}")
        elif lazy is None:
            if not case.stricter:
                mismatches.append(f"{case.name}: lazyfs refuses ({lazy_error}), containerd unpacks {sorted(stock)}")
        elif stock != lazy:
            diff = {p: (stock.get(p), lazy.get(p)) for p in sorted(set(stock) | set(lazy)) if stock.get(p) != lazy.get(p)}
            mismatches.append(f"{case.name}: trees differ (path: containerd, lazyfs): {diff}")
        else:
            report.append(f"{case.name}: same tree {sorted(stock)}")
    print("\n".join(report))
    assert not mismatches, "\n".join(mismatches)
