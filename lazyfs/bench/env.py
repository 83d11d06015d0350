"""The system under test as one object, and its return to a cold (or warm) state.

``BenchEnv.reset`` runs before every measured run and then checks what it claims:

1. containerd: tasks, containers and images removed (synchronous GC), leftover content and
   snapshots of both snapshotters removed; checked: ``ctr images|content ls`` and
   ``ctr snapshots ls`` (overlayfs and lazyfs) are empty.
2. lazyfs: the snapshotter and its daemon are stopped, the snapshotter's state (metadata,
   FUSE mount point, chunk and metadata cache) is deleted, unless ``keep_cache``, which keeps
   the cache directory only; then both start again. Checked: a new daemon pid, its FUSE
   mount present, no attached layers, no fetches, and the cache directory empty (cold) or
   non-empty (warm).
3. the page cache: sync and ``drop_caches`` (3); the Cached figure of /proc/meminfo before
   and after is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .system import (
    Containerd, DaemonSettings, Snapshotter, SystemError_, cpu_seconds, drop_page_cache, mount_points_below,
)

log = logging.getLogger(__name__)

SNAPSHOTTERS = ("overlayfs", "lazyfs")


class ColdStateError(SystemError_):
    """The system did not reach the state a run must start from."""


@dataclass
class ResetReport:
    daemon_pid: int
    cache_files: int
    page_cache_before_kib: int
    page_cache_after_kib: int


def cached_files(cache_dir: Path) -> int:
    """Chunks and metadata images in a lazyfs cache directory (not its index or tmp)."""
    return sum(1 for store in ("chunks", "meta") if (cache_dir / store).exists()
               for p in (cache_dir / store).rglob("*") if p.is_file())


class BenchEnv:
    def __init__(self, work_dir: Path):
        self.work_dir = Path(work_dir)
        self.containerd = Containerd(self.work_dir / "containerd")
        self.snapshotter = Snapshotter(self.work_dir / "snapshotter", self.containerd.snapshotter_socket,
                                       self.work_dir)
        self.endpoint = ""
        self.registry_log: Path | None = None
        self.daemon_log = self.work_dir / "daemon.log"
        # The serving mode and policies the next reset starts the snapshotter with.
        self.daemon_settings = DaemonSettings()

    @contextlib.contextmanager
    def settings(self, settings: DaemonSettings) -> Iterator[None]:
        """Resets inside the block start the daemon with ``settings``."""
        saved, self.daemon_settings = self.daemon_settings, settings
        try:
            yield
        finally:
            self.daemon_settings = saved

    def start(self) -> None:
        self.containerd.base.mkdir(parents=True, exist_ok=True)
        self.containerd.start()

    def use_registry(self, endpoint: str, registry_log: Path) -> None:
        """Point pulls (containerd and the daemon) at a registry; restarts the snapshotter."""
        self.endpoint = endpoint
        self.registry_log = registry_log
        self.containerd.trust_http_registry(endpoint)

    def stop(self) -> None:
        try:
            self.snapshotter.stop()
        finally:
            self.containerd.stop()
        self._clear_snapshotter_state(keep_cache=False)

    # ------------------------------------------------------------------ state

    def reset(self, keep_cache: bool = False) -> ResetReport:
        old_pid = self.snapshotter.daemon_pid()
        self.containerd.remove_everything(SNAPSHOTTERS)
        self.snapshotter.stop()
        if mount_points_below(self.snapshotter.root):
            raise ColdStateError(f"mounts left below the snapshotter root: "
                                 f"{mount_points_below(self.snapshotter.root)}")
        self._clear_snapshotter_state(keep_cache)
        self.snapshotter.start([self.endpoint], self.daemon_settings)
        self.containerd.wait_snapshotter("lazyfs")
        before, after = drop_page_cache()
        report = ResetReport(self.snapshotter.daemon_pid() or 0, cached_files(self.snapshotter.cache_dir),
                             before, after)
        self.check(keep_cache, old_pid, report)
        return report

    def _clear_snapshotter_state(self, keep_cache: bool) -> None:
        root = self.snapshotter.root
        if not root.exists():
            return
        daemon_log = root / "daemon.log"
        if daemon_log.exists():  # kept for diagnosis: all daemons' logs in one file
            with open(self.daemon_log, "ab") as out:
                out.write(daemon_log.read_bytes())
        for entry in root.iterdir():
            if keep_cache and entry == self.snapshotter.cache_dir:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def check(self, warm: bool, old_daemon_pid: int | None, report: ResetReport) -> None:
        problems = []
        c = self.containerd
        for what in ("images", "content", "containers"):
            left = c.listing(what)
            if left:
                problems.append(f"containerd still has {what}: {left[:5]}")
        for name in SNAPSHOTTERS:
            left = c.snapshots(name)
            if left:
                problems.append(f"{name} snapshotter still has snapshots: {left[:5]}")
        pid = self.snapshotter.daemon_pid()
        if pid is None or pid == old_daemon_pid:
            problems.append(f"the lazyfs daemon was not restarted (pid {old_daemon_pid} -> {pid})")
        fuse_dir = self.snapshotter.fuse_dir()
        if fuse_dir is None or str(fuse_dir) not in mount_points_below(self.snapshotter.root):
            problems.append(f"the daemon's FUSE mount ({fuse_dir}) is missing")
        serve = self.daemon_settings.serve
        if serve is not None and self.snapshotter.daemon_request("ping").get("serve") != serve:
            problems.append(f"the daemon does not serve in {serve} mode")
        stats = self.snapshotter.daemon_request("stats")
        if stats.get("layers"):
            problems.append(f"the new daemon has {stats['layers']} layers attached")
        if stats["fetch"]["requests"]:
            problems.append("the new daemon has already fetched")
        if warm and report.cache_files == 0:
            problems.append("warm run, but the lazyfs cache is empty")
        if not warm and report.cache_files:
            problems.append(f"cold run, but the lazyfs cache holds {report.cache_files} files")
        if problems:
            raise ColdStateError("; ".join(problems))

    # ------------------------------------------------------------------ probes

    def daemon_cpu(self) -> float | None:
        return cpu_seconds(self.snapshotter.daemon_pid())

    def containerd_cpu(self) -> float | None:
        return cpu_seconds(self.containerd.pid)
