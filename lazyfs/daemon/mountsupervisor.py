"""The supervisor of `lazyfs mount`'s own daemon in kernel serving mode.

In kernel serving mode a layer's EROFS mount, its loop devices and the overlay at the mount
point outlive the daemon: only reads that miss the page cache need it. So when the daemon
dies (SIGKILL, a crash) this small process starts a new one with the same startup spec,
marked as a restart: the new daemon attaches each layer where it was, takes the layer's
mount over by switching the chunk loop device onto its own chunk-device file (LOOP_CHANGE_FD),
and keeps the overlay at the mount point (if a layer could not be taken over, it stacks a new
overlay there: what was open in the old one stays dead). Readers that held files open across
the gap read on.

The first start is relayed: the daemon's one-line startup report goes to ``--ready-fd`` of
`lazyfs mount`, and a daemon that fails to start is not restarted (its exit status is ours).
Restarts are bounded (lazyfs.daemon.supervise.RestartPolicy): a daemon that keeps dying is
given up with one ERROR line in daemon.log, leaving the mount for `lazyfs umount` to release.
A daemon that exits with status 0 was shut down on purpose: the supervisor exits too.
SIGTERM/SIGINT stop the supervisor and leave the daemon running (`lazyfs umount` stops the
supervisor first, then the daemon).

FUSE-tree mode is not supervised: there the overlay's lower layers are directories of the
daemon's FUSE mount, which die with it; no new daemon can bring them back under open files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from lazyfs.daemon.mountstate import MountState
from lazyfs.daemon.supervise import RestartPolicy, Supervisor

log = logging.getLogger("lazyfs.supervisor")

MODULE = "lazyfs.daemon.mountsupervisor"
READY_TIMEOUT = 300.0
POLICY = RestartPolicy(watch_interval=0.2, first_delay=0.5, max_delay=8.0, max_restarts=5, stable_after=60.0)


class SignalStop:
    """A stop flag that a signal handler may set (a threading.Event may not: a handler that
    interrupts the main thread while it holds the event's lock would wait for it for ever)."""

    def __init__(self):
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def set(self) -> None:
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:  # set many times over: already readable
            pass

    def wait(self, timeout: float | None = None) -> bool:
        return bool(select.select([self.fd], [], [], timeout)[0])

    def is_set(self) -> bool:
        return self.wait(0)


class StartFailed(Exception):
    def __init__(self, message: str, status: int = 1, usage: bool = False):
        super().__init__(message)
        self.status = status
        self.usage = usage


class MountSupervisor:
    def __init__(self, state: MountState, daemon_cmd: list[str]):
        self.state = state
        self.daemon_cmd = daemon_cmd
        self.process: subprocess.Popen | None = None
        self.stop = SignalStop()

    def start(self, restart: bool) -> None:
        """Start a daemon and wait for its startup report; raises StartFailed."""
        if restart:
            spec = json.loads(self.state.startup_file.read_text())
            spec["restart"] = True
            tmp = self.state.startup_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(spec, indent=1))
            os.replace(tmp, self.state.startup_file)
        ready_read, ready_write = os.pipe()
        try:
            # Same session as this supervisor (which has its own): `lazyfs umount` signals each.
            self.process = subprocess.Popen([*self.daemon_cmd, "--ready-fd", str(ready_write)],
                                            stdin=subprocess.DEVNULL, close_fds=True, pass_fds=(ready_write,))
        except OSError as e:
            os.close(ready_read)
            raise StartFailed(f"cannot run the daemon: {e}") from e
        finally:
            os.close(ready_write)
        tmp = self.state.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{self.process.pid}\n")
        os.replace(tmp, self.state.pid_file)
        with os.fdopen(ready_read, "rb") as ready:
            outcome = self._wait_report(ready)
        if outcome is None:  # stopped while the daemon starts
            if restart:
                return  # `lazyfs umount` stops this daemon next
            self.process.terminate()
            self.process.wait()
            raise StartFailed("stopped before the daemon was ready")
        if outcome.get("ready"):
            if restart:
                log.info("lazyfs daemon started (pid %d); the layers of %s are re-attached", self.process.pid,
                         self.state.mountpoint)
            return
        status = self.process.wait()
        raise StartFailed(outcome.get("error") or f"the daemon exited with status {status}", status or 1,
                          bool(outcome.get("usage")))

    def _wait_report(self, ready) -> dict | None:
        readable, _, _ = select.select([ready, self.stop.fd], [], [], READY_TIMEOUT)
        if ready in readable:
            line = ready.readline()
            try:
                return json.loads(line) if line else {}
            except ValueError:
                return {}
        if readable:
            return None
        self.process.terminate()
        return {"error": f"the daemon was not ready after {READY_TIMEOUT:.0f}s"}

    def alive(self) -> bool:
        status = self.process.poll()
        if status == 0:  # shut down on purpose (`lazyfs umount`, the shutdown request)
            self.stop.set()
            return True
        return status is None

    def log_loss(self) -> None:
        log.error("lazyfs daemon lost (pid %d, %s); restarting it: the mount at %s stays, reads that "
                  "miss the page cache fail until the layers are re-attached", self.process.pid,
                  _describe_status(self.process.returncode), self.state.mountpoint)

    def supervise(self) -> bool:
        return Supervisor(alive=self.alive, start=lambda: self.start(restart=True), on_lost=self.log_loss,
                          stop=self.stop, policy=POLICY, what=f"the lazyfs daemon of {self.state.mountpoint}",
                          give_up_hint=f"; `lazyfs umount {self.state.mountpoint}` releases the mount").watch()


def _describe_status(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def _report(fd: int, outcome: dict) -> None:
    try:
        os.write(fd, json.dumps(outcome).encode() + b"\n")
    except OSError:  # `lazyfs mount` is gone: nobody to tell
        pass
    finally:
        os.close(fd)


def command(state: MountState, daemon_cmd: list[str], ready_fd: int | None = None) -> list[str]:
    """The supervisor's command line; the daemon's (without --ready-fd) follows ``--``."""
    cmd = [sys.executable, "-m", MODULE, "--state-dir", str(state.root), "--mountpoint", str(state.mountpoint)]
    if ready_fd is not None:
        cmd += ["--ready-fd", str(ready_fd)]
    return [*cmd, "--", *daemon_cmd]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="the mount's state directory")
    parser.add_argument("--mountpoint", type=Path, required=True)
    parser.add_argument("--ready-fd", type=int, default=None, help="gets the first daemon's startup report")
    parser.add_argument("daemon", nargs=argparse.REMAINDER, help="-- and the daemon's command line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    daemon_cmd = args.daemon[1:] if args.daemon[:1] == ["--"] else args.daemon
    supervisor = MountSupervisor(MountState(args.mountpoint, args.state_dir), daemon_cmd)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor.stop.set())
    ready_fd = args.ready_fd
    if ready_fd is not None:
        os.set_inheritable(ready_fd, False)
    try:
        supervisor.start(restart=False)
    except StartFailed as e:
        if ready_fd is not None:
            _report(ready_fd, {"error": str(e), "usage": e.usage})
        return e.status
    if ready_fd is not None:
        _report(ready_fd, {"ready": True})
    return 0 if supervisor.supervise() else 1


if __name__ == "__main__":
    sys.exit(main())
