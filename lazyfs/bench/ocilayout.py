"""Pack rootfs directories into gzip tar layers and write an OCI image layout.

A layer is the difference between two rootfs directories (the stage before and after a
layer's steps): new or changed entries, with their parent directories, and whiteouts for
removed ones. Tar entries record whole-second mtimes (the rootfs was truncated first),
numeric owners only, and are sorted, so the same rootfs always gives the same blob.
"""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import json
import os
import stat
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ImageBuildError

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# Kernel filesystems and device nodes are the runtime's business: keep the directories only.
_RUNTIME_DIRS = ("dev", "proc", "sys")
_GZIP_LEVEL = 6
_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class LayerBlob:
    digest: str            # sha256:... of the gzip blob
    diff_id: str           # sha256:... of the uncompressed tar
    size: int              # compressed bytes
    tar_size: int          # uncompressed bytes
    entries: int           # tar members, whiteouts included
    whiteouts: int

    def to_json(self) -> dict:
        return asdict(self)


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, sink) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.count = 0

    def write(self, data) -> int:
        self._sink.write(data)
        self.sha256.update(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self._sink.flush()


def _same_entry(old: os.stat_result, new: os.stat_result, old_path: str, new_path: str) -> bool:
    if stat.S_IFMT(old.st_mode) != stat.S_IFMT(new.st_mode):
        return False
    if (old.st_mode, old.st_uid, old.st_gid, old.st_mtime_ns // 10**9) != \
            (new.st_mode, new.st_uid, new.st_gid, new.st_mtime_ns // 10**9):
        return False
    if stat.S_ISLNK(new.st_mode):
        return os.readlink(old_path) == os.readlink(new_path)
    if stat.S_ISCHR(new.st_mode) or stat.S_ISBLK(new.st_mode):
        return old.st_rdev == new.st_rdev
    if stat.S_ISREG(new.st_mode):
        return old.st_size == new.st_size and filecmp.cmp(old_path, new_path, shallow=False)
    return True


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def layer_entries(old: Path | None, new: Path) -> tuple[list[str], list[str]]:
    """(paths to pack, paths to white out), relative to the roots, in tar order.

    A directory is packed when it changed or anything below it is packed, so every packed
    entry's parent precedes it in the tar.
    """
    packed: list[str] = []
    removed: list[str] = []

    def walk(rel: str) -> bool:
        """Visit directory ``rel`` (already known to exist in new); True if anything packed."""
        new_dir = os.path.join(new, rel)
        names = sorted(os.listdir(new_dir))
        if rel in _RUNTIME_DIRS:
            names = []
        any_packed = False
        for name in names:
            child = f"{rel}/{name}" if rel else name
            new_path = os.path.join(new, child)
            new_st = os.lstat(new_path)
            old_path = os.path.join(old, child) if old is not None else ""
            old_st = _lstat(old_path) if old is not None else None
            changed = old_st is None or not _same_entry(old_st, new_st, old_path, new_path)
            if stat.S_ISDIR(new_st.st_mode):
                mark = len(packed)
                below = walk(child)
                if changed or below:
                    packed.insert(mark, child)
                    any_packed = True
            elif changed:
                packed.append(child)
                any_packed = True
        if old is not None and rel not in _RUNTIME_DIRS:
            old_dir = os.path.join(old, rel)
            if os.path.isdir(old_dir) and not os.path.islink(old_dir):
                kept = set(names)
                for name in sorted(os.listdir(old_dir)):
                    if name not in kept:
                        removed.append(f"{rel}/{name}" if rel else name)
                        any_packed = True
        return any_packed

    walk("")
    return packed, removed


def write_layer(old: Path | None, new: Path, dest_dir: Path) -> LayerBlob:
    """Pack the difference old -> new as a gzip tar blob named by digest in dest_dir."""
    packed, removed = layer_entries(old, new)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f".layer-{os.getpid()}.tmp"
    removed_by_parent: dict[str, list[str]] = {}
    for path in removed:
        parent, name = os.path.split(path)
        removed_by_parent.setdefault(parent, []).append(name)
    whiteouts = 0
    with open(tmp, "wb") as raw:
        blob = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=blob, compresslevel=_GZIP_LEVEL,
                           mtime=0) as gz:
            tar_stream = _HashingWriter(gz)
            with tarfile.open(fileobj=tar_stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                # Whiteouts of the root directory first, then each directory's whiteouts
                # right after the directory itself.
                whiteouts += _add_whiteouts(tar, "", removed_by_parent.pop("", []))
                for rel in packed:
                    _add_entry(tar, new, rel)
                    if rel in removed_by_parent:
                        whiteouts += _add_whiteouts(tar, rel, removed_by_parent.pop(rel))
                for parent, names in sorted(removed_by_parent.items()):
                    raise ImageBuildError(f"whiteouts under {parent!r} whose directory "
                                          f"was not packed: {names}")
    digest = "sha256:" + blob.sha256.hexdigest()
    final = dest_dir / digest.split(":", 1)[1]
    os.replace(tmp, final)
    return LayerBlob(digest=digest, diff_id="sha256:" + tar_stream.sha256.hexdigest(),
                     size=blob.count, tar_size=tar_stream.count,
                     entries=len(packed) + whiteouts, whiteouts=whiteouts)


def _add_whiteouts(tar: tarfile.TarFile, parent: str, names: list[str]) -> int:
    for name in sorted(names):
        info = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
        info.mode = 0o644
        tar.addfile(info)
    return len(names)


def _add_entry(tar: tarfile.TarFile, root: Path, rel: str) -> None:
    path = os.path.join(root, rel)
    info = tar.gettarinfo(path, arcname=rel)
    if info is None:  # sockets cannot be packed and mean nothing in an image
        return
    info.mtime = int(info.mtime)
    info.uname = info.gname = ""
    if info.isreg():
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)


def _write_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_oci_layout(dest: Path, layer_files: list[tuple[Path, LayerBlob]], *, tag: str,
                     cmd: list[str], env: list[str], history: list[str],
                     created: str = "1970-01-01T00:00:00Z",
                     architecture: str = "amd64") -> str:
    """Write an OCI image layout at dest holding one image; return the manifest digest.

    Layer blobs are hard-linked into the layout when they are on the same filesystem.
    """
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for src, layer in layer_files:
        target = blobs / layer.digest.split(":", 1)[1]
        if target.exists():
            continue
        try:
            os.link(src, target)
        except OSError:
            with open(src, "rb") as fin, open(target, "wb") as fout:
                while block := fin.read(_COPY_BLOCK):
                    fout.write(block)
    config = {
        "created": created,
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": env, "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for _, layer in layer_files]},
        "history": [{"created": created, "created_by": h} for h in history],
    }
    config_digest, config_size = _write_blob(blobs, _canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": layer.digest, "size": layer.size}
                   for _, layer in layer_files],
    }
    manifest_digest, manifest_size = _write_blob(blobs, _canonical(manifest))
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": manifest_digest,
                       "size": manifest_size, "annotations": {REF_NAME_ANNOTATION: tag}}],
    }
    (dest / "index.json").write_text(json.dumps(index, indent=1))
    return manifest_digest
