"""Keeping a lazyfs daemon alive: watch its process, start a new one when it dies, with backoff.

Used by the containerd snapshotter (which restarts its daemon for ever: containerd depends on
it) and by the supervisor of `lazyfs mount`'s own daemon (lazyfs.daemon.mountsupervisor),
which gives up after a few restarts in a row that did not last. What a restart means (which
process, how to tell it is ready, what to re-attach) is the caller's; this module only decides
when to try. It imports neither trio nor pyfuse3.

A restart is *in a row* with the previous one unless the daemon before it stayed up for
``stable_after`` seconds. The first restart after a stable run is immediate (readers of a
kernel-mode mount wait for it); each further one waits twice as long as the last, from
``first_delay`` up to ``max_delay``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class Stop(Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True)
class RestartPolicy:
    watch_interval: float = 0.5
    first_delay: float = 0.5
    max_delay: float = 30.0
    # Restarts in a row before giving up; None: never give up.
    max_restarts: int | None = None
    stable_after: float = 60.0

    def delay_before(self, restart: int) -> float:
        """Seconds to wait before restart number ``restart`` (1-based) of a row."""
        if restart <= 1:
            return 0.0
        return min(self.first_delay * 2 ** (restart - 2), self.max_delay)


class Supervisor:
    """Calls ``start()`` whenever ``alive()`` turns false, until ``stop`` is set or the policy
    gives up. ``start`` raises on failure (any exception: the supervisor must outlive it) and
    returns once the new daemon is ready; ``on_lost`` logs the loss (once per loss). ``stop``
    is a threading.Event or anything with its ``wait(timeout) -> bool``."""

    def __init__(self, *, alive: Callable[[], bool], start: Callable[[], None], policy: RestartPolicy,
                 on_lost: Callable[[], None] = lambda: None, stop: Stop | None = None,
                 what: str = "the lazyfs daemon", give_up_hint: str = ""):
        self.alive = alive
        self.start = start
        self.policy = policy
        self.on_lost = on_lost
        self.stop = stop or threading.Event()
        self.what = what
        self.give_up_hint = give_up_hint
        self.restarts = 0  # in the current row
        self.gave_up = False

    def watch(self) -> bool:
        """Watch until stopped (True) or given up (False, logged as one ERROR line)."""
        up_since = time.monotonic()
        while not self.stop.wait(self.policy.watch_interval):
            if self.alive():
                if self.restarts and time.monotonic() - up_since >= self.policy.stable_after:
                    self.restarts = 0
                continue
            self.on_lost()
            if not self._restart():
                return not self.gave_up
            up_since = time.monotonic()
        return True

    def _restart(self) -> bool:
        """Start a new daemon, retrying with backoff; False when stopped or given up."""
        while True:
            limit = self.policy.max_restarts
            if limit is not None and self.restarts >= limit:
                log.error("%s keeps dying (%d restarts in a row did not last); giving up%s", self.what,
                          self.restarts, self.give_up_hint)
                self.gave_up = True
                return False
            self.restarts += 1
            if self.stop.wait(self.policy.delay_before(self.restarts)):
                return False
            try:
                self.start()
                return True
            except Exception as e:  # noqa: BLE001 -- whatever failed, the next try may work
                log.error("restarting %s failed: %s", self.what, e)


def process_running(pid: int, marker: str | Path) -> bool:
    """``pid`` is a live process (not a zombie) with ``marker`` as one of its arguments (so a
    reused pid is not mistaken for it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            arguments = f.read().split(b"\0")
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X") and str(marker).encode() in arguments
