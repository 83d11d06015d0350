"""Run a workload chrooted into a private, writable overlay of a directory, as a container would.

``python -m lazyfs.trace.sandbox --root DIR -- CMD ...`` (as root):

1. ``unshare(CLONE_NEWNS | CLONE_NEWPID)``, and every mount made private, so nothing below
   is seen outside and everything goes away with the namespace;
2. a tmpfs holding the overlay's upper and work directories; an overlay ``lowerdir=DIR``
   at ``merged``: the workload may write, ``DIR`` stays untouched;
3. a child that is PID 1 of the new PID namespace mounts ``/proc`` (proc of that
   namespace), a minimal ``/dev`` (tmpfs with null, zero, full, random, urandom, tty, a
   devpts ``/dev/pts``, a tmpfs ``/dev/shm`` and the fd/stdin/stdout/stderr links) and
   ``/sys`` read-only, then forks the workload, which chroots into ``merged`` and execs CMD;
4. PID 1 reaps every process until the workload exits and exits with its status. When it
   exits (or the outer process, on SIGTERM/SIGINT, kills it) the kernel kills everything
   left in the namespace and the mounts are released.

``run_workload`` is the parent side: it starts the sandbox, reads the workload's output
lines (stdout and stderr together) and returns when the workload exits, a line matches the
readiness pattern, or the timeout passes -- calling ``at_end`` before stopping the workload
so a trace can be taken at exactly that point.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MNT_DETACH = 0x2
MS_PRIVATE = 0x40000
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
WORKLOAD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STOP_TIMEOUT = 10.0


class SandboxError(Exception):
    """The sandbox could not be set up or the workload could not be started."""


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str | Path, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(source.encode(), str(target).encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None),
           f"mount {fstype or source} at {target}")


def _setup_overlay(root: Path, base: Path) -> Path:
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    # The overlay's upper directory must not be on an overlay itself: a tmpfs of our own,
    # mounted only in this namespace.
    _mount("tmpfs", base, "tmpfs", MS_NOSUID, "mode=0700")
    for name in ("upper", "work", "merged"):
        (base / name).mkdir()
    merged = base / "merged"
    _mount("overlay", merged, "overlay", 0,
           f"lowerdir={root},upperdir={base / 'upper'},workdir={base / 'work'}")
    return merged


def _mkdir_in(merged: Path, name: str) -> Path:
    path = merged / name
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SandboxError(f"/{name} in the image is not a directory")
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def _setup_system_mounts(merged: Path) -> None:
    """/proc, /dev and /sys as a container runtime provides them (runs as PID 1 of the namespace)."""
    _mount("proc", _mkdir_in(merged, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = _mkdir_in(merged, "dev")
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=0755,size=65536k")
    for name in DEVICES:
        rdev = os.stat(f"/dev/{name}").st_rdev
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, rdev)
        os.chmod(dev / name, 0o666)
    (dev / "pts").mkdir()
    _mount("devpts", dev / "pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", dev / "ptmx")
    (dev / "shm").mkdir()
    _mount("shm", dev / "shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, dev / link)
    _mount("sysfs", _mkdir_in(merged, "sys"), "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _exec_workload(merged: Path, command: Sequence[str], workdir: str, env: dict[str, str]) -> None:
    os.chroot(merged)
    os.chdir(workdir)
    os.execvpe(command[0], list(command), env)


def _status_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _namespace_init(merged: Path, command: Sequence[str], workdir: str, env: dict[str, str]) -> int:
    _setup_system_mounts(merged)
    workload = os.fork()
    if workload == 0:
        try:
            _exec_workload(merged, command, workdir, env)
        except OSError as e:
            print(f"lazyfs sandbox: cannot run {command[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)
    while True:  # PID 1 reaps orphans too
        pid, status = os.waitpid(-1, 0)
        if pid == workload:
            return _status_code(status)


def sandbox_main(root: Path, command: Sequence[str], workdir: str, env: dict[str, str]) -> int:
    base = Path(tempfile.mkdtemp(prefix="lazyfs-sandbox-"))
    try:
        return _run_in_namespaces(root, base, command, workdir, env)
    finally:
        _libc.umount2(str(base).encode(), MNT_DETACH)
        os.rmdir(base)


def _run_in_namespaces(root: Path, base: Path, command: Sequence[str], workdir: str, env: dict[str, str]) -> int:
    merged = _setup_overlay(root, base)
    init = os.fork()  # the first child after unshare(CLONE_NEWPID) is PID 1 of the namespace
    if init == 0:
        code = 127
        try:
            code = _namespace_init(merged, command, workdir, env)
        except (SandboxError, OSError) as e:
            print(f"lazyfs sandbox: {e}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def stop(_signum, _frame):
        try:
            os.kill(init, signal.SIGKILL)  # PID 1 gone: the kernel kills the whole namespace
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _, status = os.waitpid(init, 0)
    return _status_code(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazyfs.trace.sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the directory to overlay and chroot into")
    parser.add_argument("--workdir", default="/", help="working directory inside the root")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="workload environment (default: PATH, HOME=/root, TERM=xterm)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    env = {"PATH": WORKLOAD_PATH, "HOME": "/root", "TERM": "xterm"}
    env.update(item.split("=", 1) for item in args.env if "=" in item)
    try:
        return sandbox_main(args.root.resolve(), command, args.workdir, env)
    except SandboxError as e:
        print(f"lazyfs sandbox: {e}", file=sys.stderr)
        return 125


# ---------------------------------------------------------------------- parent side


@dataclass
class WorkloadResult:
    reason: str  # "ready", "exited" or "timeout"
    seconds: float  # from start to the reason
    status: int | None  # exit status when it exited by itself
    output: list[str]


def run_workload(root: Path, command: Sequence[str], *, ready: re.Pattern[str] | None = None,
                 timeout: float | None = None, at_end: Callable[[str], None] | None = None,
                 echo: Callable[[str], None] | None = None, env: Sequence[str] = (),
                 wrapper: Sequence[str] = ()) -> WorkloadResult:
    """Run ``command`` in a sandbox over ``root`` until it exits, prints a line matching
    ``ready`` or ``timeout`` seconds pass; ``at_end(reason)`` runs before the workload is
    stopped. The sandbox and everything in it is gone when this returns. ``wrapper`` is put
    in front of the sandbox's command line (e.g. ``strace -f -o LOG``)."""
    argv = [*wrapper, sys.executable, "-m", "lazyfs.trace.sandbox", "--root", str(root)]
    for item in env:
        argv += ["--env", item]
    started = time.monotonic()
    proc = subprocess.Popen([*argv, "--", *command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode(errors="replace").rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    output: list[str] = []
    reason = "exited"
    deadline = None if timeout is None else started + timeout
    try:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                reason = "timeout"
                break
            if line is None:
                break
            output.append(line)
            if echo is not None:
                echo(line)
            if ready is not None and ready.search(line):
                reason = "ready"
                break
        seconds = time.monotonic() - started
        if reason == "exited":
            proc.wait()
        if at_end is not None:
            at_end(reason)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(STOP_TIMEOUT)
    return WorkloadResult(reason, seconds, proc.returncode if reason == "exited" else None, output)


if __name__ == "__main__":
    sys.exit(main())
