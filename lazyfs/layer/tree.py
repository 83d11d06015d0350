"""The file tree of one layer as a safe tar applier would leave it, ready for the EROFS writer.

Rules (modelled on containerd's archive applier, stricter where it scopes instead of refusing):
entries naming the root are ignored (containerd skips them); absolute names, ``..`` components, names passing through a symlink or a non-directory of this
layer, and hard links to missing entries or directories are refused with UnsafeTarEntry naming
the entry. A later entry replaces an earlier one at the same path (directories merge their
attributes, as tar extraction does). Whiteouts become what overlayfs expects in a lowerdir:
``.wh.NAME`` a character device 0:0 named NAME, ``.wh..wh..opq`` the xattr
``trusted.overlay.opaque=y`` on its directory. Other ``.wh..wh.`` names (aufs bookkeeping) are
dropped, and so are ``trusted.overlay.*`` xattrs coming from the tar, so a layer cannot forge
overlayfs metadata.
"""

from __future__ import annotations

import dataclasses
import logging
import stat
from collections.abc import Iterator

from lazyfs.erofs.writer import ChunkedData, Entry
from lazyfs.layer.errors import UnsafeTarEntry

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
WHITEOUT_OPAQUE = b".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = b"trusted.overlay."
IMPLICIT_DIR_MODE = stat.S_IFDIR | 0o755


@dataclasses.dataclass(eq=False)
class Node:
    """One inode. Hard links are the same Node object at several names."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    xattrs: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    rdev: tuple[int, int] | None = None
    link_target: bytes | None = None
    data: bytes | ChunkedData | None = None
    children: dict[bytes, Node] | None = None  # directories only
    opaque: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def split_name(name: bytes, entry: str) -> list[bytes]:
    """The components of a tar member name, refusing any that could leave the root."""
    if name.startswith(b"/"):
        raise UnsafeTarEntry(entry, "absolute path")
    if b"\0" in name:
        raise UnsafeTarEntry(entry, "NUL in name")
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UnsafeTarEntry(entry, "'..' component (would escape the layer root)")
    return parts


class Tree:
    def __init__(self) -> None:
        self.root = Node(mode=IMPLICIT_DIR_MODE, children={})
        # What the metadata writer will hold (an upper bound: replaced nodes stay counted), so
        # the builder can refuse a layer before it exhausts memory.
        self.nodes = 1
        self.path_bytes = 0

    def _parent_dir(self, parts: list[bytes], entry: str) -> Node:
        """The directory holding parts[-1], creating missing directories like an extractor."""
        node = self.root
        length = -1
        for i, name in enumerate(parts[:-1]):
            length += 1 + len(name)
            child = node.children.get(name)
            if child is None:
                child = Node(mode=IMPLICIT_DIR_MODE, children={})
                node.children[name] = child
                self.nodes += 1
                self.path_bytes += length
            elif stat.S_ISLNK(child.mode):
                where = b"/".join(parts[: i + 1]).decode(errors="replace")
                raise UnsafeTarEntry(entry, f"path goes through the symlink {where!r} of this layer")
            elif not child.is_dir:
                where = b"/".join(parts[: i + 1]).decode(errors="replace")
                raise UnsafeTarEntry(entry, f"parent {where!r} is not a directory")
            node = child
        return node

    def add(self, name: bytes, node: Node, entry: str) -> None:
        """Place node at name (later entries win; a directory over a directory merges)."""
        parts = split_name(name, entry)
        if not parts:
            log.debug("tar entry %s ignored: it names the layer root", entry)  # as containerd does
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, node, entry)
            return
        parent = self._parent_dir(parts, entry)
        old = parent.children.get(base)
        if old is not None and old.is_dir and node.is_dir:
            self._merge_dir(old, node)
            return
        if node.is_dir and node.children is None:
            node.children = {}
        parent.children[base] = node
        self.nodes += 1
        self.path_bytes += sum(map(len, parts)) + len(parts) - 1

    def discard(self, name: bytes, entry: str) -> None:
        """What an entry that creates nothing does (a global PAX header, to containerd): its
        parents are created, and whatever is at its path is removed (or whited out)."""
        parts = split_name(name, entry)
        if not parts:
            return
        if parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, Node(mode=stat.S_IFREG), entry)
            return
        self._parent_dir(parts, entry).children.pop(parts[-1], None)

    def _merge_dir(self, old: Node, new: Node) -> None:
        old.mode, old.uid, old.gid = new.mode, new.uid, new.gid
        old.mtime, old.mtime_nsec, old.xattrs = new.mtime, new.mtime_nsec, new.xattrs

    def _whiteout(self, parts: list[bytes], header: Node, entry: str) -> None:
        base = parts[-1]
        if base == WHITEOUT_OPAQUE:
            directory = self._dir_at(parts[:-1], entry)
            directory.opaque = True
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            log.debug("dropping aufs metadata entry %s", entry)
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if target in (b"", b".", b".."):
            raise UnsafeTarEntry(entry, "whiteout without a name")
        parent = self._parent_dir(parts, entry)
        self.nodes += 1
        self.path_bytes += sum(map(len, parts)) + len(parts) - 1
        parent.children[target] = Node(
            mode=stat.S_IFCHR, uid=header.uid, gid=header.gid, mtime=header.mtime,
            mtime_nsec=header.mtime_nsec, rdev=(0, 0),
        )

    def _dir_at(self, parts: list[bytes], entry: str) -> Node:
        if not parts:
            return self.root
        parent = self._parent_dir(parts, entry)
        node = parent.children.get(parts[-1])
        if node is None:
            node = Node(mode=IMPLICIT_DIR_MODE, children={})
            parent.children[parts[-1]] = node
            self.nodes += 1
            self.path_bytes += sum(map(len, parts)) + len(parts) - 1
        elif not node.is_dir:
            raise UnsafeTarEntry(entry, "opaque marker inside something that is not a directory")
        return node

    def lookup_link_target(self, name: bytes, entry: str) -> Node:
        """The existing non-directory a hard link names (its last component is not followed)."""
        parts = split_name(name, entry)
        node = self.root
        for i, part in enumerate(parts):
            if node.children is None or part not in node.children:
                raise UnsafeTarEntry(entry, f"hard link target {name.decode(errors='replace')!r} does not exist")
            node = node.children[part]
            if i < len(parts) - 1 and stat.S_ISLNK(node.mode):
                raise UnsafeTarEntry(entry, "hard link target goes through a symlink")
        if not parts or node.is_dir:
            raise UnsafeTarEntry(entry, "hard link to a directory")
        return node

    def entries(self) -> Iterator[Entry]:
        """Writer entries, parents first; a hard-linked node is written at its first path."""
        first_path: dict[int, bytes] = {}
        stack: list[tuple[bytes, Node]] = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            seen = first_path.get(id(node))
            if seen is not None:
                yield Entry(path=path, mode=node.mode, hardlink_to=seen)
                continue
            first_path[id(node)] = path
            xattrs = dict(node.xattrs)
            if node.opaque:
                xattrs[OPAQUE_XATTR] = b"y"
            yield Entry(
                path=path, mode=node.mode, uid=node.uid, gid=node.gid, mtime=node.mtime,
                mtime_nsec=node.mtime_nsec, xattrs=xattrs, rdev=node.rdev,
                link_target=node.link_target, data=node.data,
            )
            if node.children:
                prefix = path + b"/" if path else b""
                for name in sorted(node.children, reverse=True):
                    stack.append((prefix + name, node.children[name]))
