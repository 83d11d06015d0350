"""Snapshot metadata in SQLite: kinds, names, parent chains, labels, usage, lazy layers.

The semantics follow containerd's snapshots/storage package (what the overlayfs snapshotter
uses): a snapshot keeps its numeric id, and so its directory, when an active snapshot is
committed under a new name; only committed snapshots can be parents; a snapshot with children
cannot be removed. The database runs in WAL mode and every change is one transaction under a
single writer lock.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

SCHEMA_VERSION = 1
MAX_LABEL_SIZE = 4096  # containerd's labels.Validate: key and key+value at most 4096 bytes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    kind        INTEGER NOT NULL,
    parent_id   INTEGER REFERENCES snapshots(id),
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0,
    lazy_layer  TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE INDEX IF NOT EXISTS snapshots_lazy_layer ON snapshots(lazy_layer);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, key)
);
"""


class Kind(enum.IntEnum):
    """Numbering of containerd.services.snapshots.v1.Kind."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class Snapshot:
    id: int
    name: str
    kind: Kind
    parent: str  # name of the parent, "" for none
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    parent_ids: list[int] = field(default_factory=list)  # nearest parent first
    size: int = 0
    inodes: int = 0
    lazy_layer: str | None = None


def validate_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if len(key.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(f"label key {key[:64]!r}... longer than {MAX_LABEL_SIZE} bytes")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(f"label {key!r}: key and value longer than {MAX_LABEL_SIZE} bytes")


def _now_ns() -> int:
    return time.time_ns()


class MetaStore:
    """The database; all access goes through :meth:`transaction`."""

    def __init__(self, path: Path):
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(_SCHEMA)
            row = self._conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise RuntimeError(f"metadata schema version {row[0]}, expected {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One serialized transaction; an exception inside rolls it back."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")


class Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    # -- reading ---------------------------------------------------------------------------

    def get(self, name: str) -> Snapshot:
        row = self._conn.execute("SELECT * FROM snapshots WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {name!r} does not exist")
        return self._load(row)

    def exists(self, name: str) -> bool:
        return self._conn.execute(
            "SELECT 1 FROM snapshots WHERE name = ?", (name,)).fetchone() is not None

    def get_active_or_view(self, name: str) -> Snapshot:
        snap = self.get(name)
        if snap.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"requested snapshot {name!r} not active or view")
        return snap

    def get_by_id(self, snapshot_id: int) -> Snapshot:
        row = self._conn.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot id {snapshot_id} does not exist")
        return self._load(row)

    def walk(self) -> list[Snapshot]:
        rows = self._conn.execute("SELECT * FROM snapshots ORDER BY name").fetchall()
        return [self._load(r) for r in rows]

    def ids(self) -> set[int]:
        return {r[0] for r in self._conn.execute("SELECT id FROM snapshots")}

    def lazy_snapshots(self) -> list[Snapshot]:
        rows = self._conn.execute(
            "SELECT * FROM snapshots WHERE lazy_layer IS NOT NULL ORDER BY id").fetchall()
        return [self._load(r) for r in rows]

    def lazy_layer_users(self, layer: str) -> int:
        (n,) = self._conn.execute(
            "SELECT count(*) FROM snapshots WHERE lazy_layer = ?", (layer,)).fetchone()
        return n

    def find_committed(self, ref_label: str, ref: str, parent: str) -> Snapshot | None:
        """The committed snapshot carrying label ``ref_label`` = ``ref`` on top of ``parent``."""
        rows = self._conn.execute(
            "SELECT s.* FROM snapshots s JOIN labels l ON l.snapshot_id = s.id "
            "WHERE s.kind = ? AND l.key = ? AND l.value = ?",
            (int(Kind.COMMITTED), ref_label, ref)).fetchall()
        for row in rows:
            snap = self._load(row)
            if snap.parent == parent:
                return snap
        return None

    # -- writing ---------------------------------------------------------------------------

    def create(self, kind: Kind, name: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot kind {kind!r} cannot be created; only active or view")
        if not name:
            raise InvalidArgument("snapshot key must not be empty")
        validate_labels(labels)
        parent_id = None
        if parent:
            row = self._conn.execute(
                "SELECT id, kind FROM snapshots WHERE name = ?", (parent,)).fetchone()
            if row is None:
                raise NotFound(f"parent snapshot {parent!r} does not exist")
            if row[1] != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = row[0]
        if self.exists(name):
            raise AlreadyExists(f"snapshot {name!r} already exists")
        now = _now_ns()
        cur = self._conn.execute(
            "INSERT INTO snapshots (name, kind, parent_id, created_ns, updated_ns) "
            "VALUES (?, ?, ?, ?, ?)", (name, int(kind), parent_id, now, now))
        self._write_labels(cur.lastrowid, labels)
        return self.get(name)

    def commit(self, key: str, name: str, size: int, inodes: int,
               labels: Mapping[str, str]) -> Snapshot:
        """Turn active snapshot ``key`` into committed ``name``; labels are replaced, not inherited."""
        validate_labels(labels)
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        if self.exists(name):
            raise AlreadyExists(f"committed snapshot {name!r} already exists")
        snap = self.get(key)
        if snap.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        now = _now_ns()
        self._conn.execute(
            "UPDATE snapshots SET name = ?, kind = ?, created_ns = ?, updated_ns = ?, size = ?, "
            "inodes = ? WHERE id = ?", (name, int(Kind.COMMITTED), now, now, size, inodes, snap.id))
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (snap.id,))
        self._write_labels(snap.id, labels)
        return self.get(name)

    def set_lazy_layer(self, name: str, layer: str) -> None:
        self._conn.execute("UPDATE snapshots SET lazy_layer = ? WHERE name = ?", (layer, name))

    def remove(self, name: str) -> Snapshot:
        snap = self.get(name)
        if self._conn.execute(
                "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snap.id,)).fetchone():
            raise FailedPrecondition(f"cannot remove snapshot {name!r} with child")
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

    def update_labels(self, name: str, labels: Mapping[str, str],
                      fieldpaths: list[str]) -> Snapshot:
        """containerd's UpdateInfo: ``labels`` replaces all, ``labels.K`` sets (or, empty, drops) K."""
        snap = self.get(name)
        updated = dict(snap.labels)
        if fieldpaths:
            for path in fieldpaths:
                if path.startswith("labels."):
                    key = path[len("labels."):]
                    updated[key] = labels.get(key, "")
                elif path == "labels":
                    updated = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {name!r}")
        else:
            updated = dict(labels)
        # An empty value is how containerd's label maps express removal.
        updated = {k: v for k, v in updated.items() if v != ""}
        validate_labels(updated)
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (snap.id,))
        self._write_labels(snap.id, updated)
        self._conn.execute(
            "UPDATE snapshots SET updated_ns = ? WHERE id = ?", (_now_ns(), snap.id))
        return self.get(name)

    # -- helpers ---------------------------------------------------------------------------

    def _write_labels(self, snapshot_id: int, labels: Mapping[str, str]) -> None:
        self._conn.executemany(
            "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(snapshot_id, k, v) for k, v in labels.items()])

    def _load(self, row: tuple) -> Snapshot:
        (sid, name, kind, parent_id, created_ns, updated_ns, size, inodes, lazy_layer) = row
        labels = dict(self._conn.execute(
            "SELECT key, value FROM labels WHERE snapshot_id = ?", (sid,)).fetchall())
        parent_ids: list[int] = []
        parent_name = ""
        next_id = parent_id
        while next_id is not None:
            prow = self._conn.execute(
                "SELECT name, parent_id FROM snapshots WHERE id = ?", (next_id,)).fetchone()
            if not parent_ids:
                parent_name = prow[0]
            parent_ids.append(next_id)
            next_id = prow[1]
        return Snapshot(id=sid, name=name, kind=Kind(kind), parent=parent_name,
                        created_ns=created_ns, updated_ns=updated_ns, labels=labels,
                        parent_ids=parent_ids, size=size, inodes=inodes, lazy_layer=lazy_layer)
