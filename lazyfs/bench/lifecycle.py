"""Small pieces the benchmark's long-lived helpers share: a file lock across processes, and
the context-manager protocol of things that are started and stopped."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created, with its directory) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class StartStop:
    """``with X(...) as x``: start() on entry (stop() if starting fails half way), stop() on exit.
    The subclass defines start() and stop(); stop() must cope with a half-done start()."""

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
