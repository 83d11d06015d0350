"""One measured cold start: pull an image into a snapshotter, run the workload, time it.

Times are ``time.monotonic()`` seconds relative to the start of the pull:

* ``pull_s``  -- ``ctr image pull`` (full pull and unpack) or ``ctr-remote image rpull``
  (remote snapshots: manifest, config, layer metadata) returned;
* ``ready_s`` -- the readiness line appeared on the container's stdout (or, for ``exit``
  workloads, the container exited with status 0): the cold-start time;
* ``start_to_ready_s`` -- from ``ctr run`` to readiness (the part after the pull);
* ``total_s`` -- ``ctr run --rm`` returned (container exited and was removed).

A workload still running ``STOP_GRACE`` seconds after its readiness line is killed (a
server); a workload that is not ready within the timeout is killed and the run fails.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass

from .errors import BenchError
from .experiment import READY_ON_EXIT
from .system import Containerd

STOP_GRACE = 10.0


class RunFailed(BenchError):
    """The workload failed, timed out, or the pull failed."""


@dataclass(frozen=True)
class Workload:
    name: str
    command: tuple[str, ...]
    ready: str  # regex on a stdout line, or READY_ON_EXIT


@dataclass
class Timings:
    pull_s: float
    start_to_ready_s: float
    ready_s: float
    total_s: float
    exit_code: int
    killed_after_ready: bool
    output_tail: str
    started_wall: float  # time.time() at the start of the pull, to place fetch events

    def to_json(self) -> dict:
        return {"pull_s": self.pull_s, "start_to_ready_s": self.start_to_ready_s,
                "ready_s": self.ready_s, "total_s": self.total_s, "exit_code": self.exit_code,
                "killed_after_ready": self.killed_after_ready}


def pull(containerd: Containerd, ref: str, snapshotter: str, remote: bool, timeout: float) -> None:
    if remote:
        containerd.ctr("image", "rpull", "--hosts-dir", str(containerd.hosts_dir),
                       "--snapshotter", snapshotter, ref, timeout=timeout, tool_name="ctr-remote")
    else:
        containerd.ctr("image", "pull", "--hosts-dir", str(containerd.hosts_dir),
                       "--snapshotter", snapshotter, ref, timeout=timeout)


def _kill_task(containerd: Containerd, name: str) -> None:
    containerd.ctr("task", "kill", "-s", "SIGKILL", name, check=False, timeout=30)


def run_container(containerd: Containerd, ref: str, snapshotter: str, name: str,
                  workload: Workload, timeout: float, t0: float) -> tuple[float, float, int, bool, str]:
    """(ready time, exit time, exit code, killed after ready, output tail); times from ``t0``."""
    pattern = None if workload.ready == READY_ON_EXIT else re.compile(workload.ready)
    cmd = containerd.command("run", "--rm", "--snapshotter", snapshotter, ref, name, *workload.command)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace")
    ready_at: float | None = None
    killed = threading.Event()
    lines: deque[str] = deque(maxlen=40)
    ready_event = threading.Event()

    def kill() -> None:
        killed.set()
        _kill_task(containerd, name)
        try:  # ctr itself must go too, or the reader below would wait for ever
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()

    def watchdog() -> None:
        # Not ready in time: kill. Ready but still running after the grace: kill (a server).
        if not ready_event.wait(max(0.0, timeout - (time.monotonic() - t0))):
            kill()
            return
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            kill()

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.monotonic()
        lines.append(line.rstrip("\n"))
        if ready_at is None and pattern is not None and pattern.search(line):
            ready_at = now - t0
            ready_event.set()
    code = proc.wait()
    exited_at = time.monotonic() - t0
    if pattern is None and code == 0 and not killed.is_set():
        ready_at = exited_at
    ready_event.set()
    guard.join(timeout=60)
    tail = "\n".join(lines)
    if ready_at is None:
        reason = "timed out" if killed.is_set() else f"exited with status {code}"
        raise RunFailed(f"workload {workload.name} {reason} before readiness; output:\n{tail}")
    if code != 0 and not killed.is_set():
        raise RunFailed(f"workload {workload.name} exited with status {code}; output:\n{tail}")
    return ready_at, exited_at, code, killed.is_set(), tail


def measure(containerd: Containerd, ref: str, snapshotter: str, remote: bool, name: str,
            workload: Workload, timeout: float) -> Timings:
    started_wall = time.time()
    t0 = time.monotonic()
    try:
        pull(containerd, ref, snapshotter, remote, timeout)
    except BenchError as e:
        raise RunFailed(f"pull failed: {e}") from e
    pulled = time.monotonic() - t0
    ready, exited, code, killed, tail = run_container(containerd, ref, snapshotter, name,
                                                      workload, timeout, t0)
    return Timings(pull_s=pulled, start_to_ready_s=ready - pulled, ready_s=ready, total_s=exited,
                   exit_code=code, killed_after_ready=killed, output_tail=tail,
                   started_wall=started_wall)
