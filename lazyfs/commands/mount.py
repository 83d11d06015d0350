"""`lazyfs mount`: serve an image (or one layer, or a plain EROFS image) read-only at a directory.

The daemon (lazyfs.daemon.server) runs in its own session with a FUSE mount in a private state
directory (see lazyfs.daemon.mountstate); the layers are attached there and stacked at MOUNTPOINT
with a read-only overlay (a bind mount for a single layer). Unless --foreground is given,
this command returns once the mount is ready, or fails with the daemon's error.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from lazyfs.cliopts import add_registry_arguments, load_with_registry
from lazyfs.config import ConfigError, parse_size
from lazyfs.daemon.control import ControlError, request
from lazyfs.daemon.mountsupervisor import command as supervisor_command
from lazyfs.fetch.policy_names import PolicyError, parse_policy_names
from lazyfs.daemon.mountstate import (
    DEFAULT_RUN_DIR, MountState, add_timeout_arguments, daemon_command, daemon_running,
)
from lazyfs.serve.mounts import is_mounted

NAME = "mount"
HELP = "mount an image, a layer or a plain chunk-based EROFS image read-only"
READY_TIMEOUT = 300.0


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="+", metavar="[IMAGE] MOUNTPOINT",
                        help="registry reference or oci:DIR[:TAG], then the mount point "
                             "(only the mount point with --meta/--blob)")
    parser.add_argument("--layer", metavar="DIGEST", help="mount only this layer of the image")
    parser.add_argument("--meta", type=Path, help="metadata image of a plain chunk-based EROFS image")
    parser.add_argument("--blob", help="its blob device (mkfs.erofs --blobdev): a file or an http(s) URL")
    parser.add_argument("--serve", choices=("fuse", "kernel"), default=None,
                        help="fuse: the daemon serves every file operation; kernel: the kernel's EROFS serves "
                             "each layer, the daemon only its chunk device (default: config, else kernel)")
    parser.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground until unmounted")
    parser.add_argument("--daemon", type=Path, default=None, metavar="SOCKET",
                        help="mount through the running daemon at this control socket (`lazyfs daemon`) "
                             "instead of starting one for this mount")
    parser.add_argument("--cache-dir", type=Path, default=None, help="chunk cache directory (default: config)")
    parser.add_argument("--cache-size", type=_size, default=None, help="cache size limit, e.g. 20G (default: config)")
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    add_timeout_arguments(parser)
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="where per-mount state lives")
    parser.add_argument("--platform", default=None, help="os/arch[/variant] to pick from an index")
    parser.add_argument("--trace", type=Path, default=None,
                        help="prefetch the chunks this trace file lists (instead of the layers' embedded traces)")
    parser.add_argument("--no-prefetch", action="store_true", help="do not prefetch embedded traces")
    parser.add_argument("--record-trace", type=Path, default=None, metavar="FILE",
                        help="record an access trace from the mount on; written to FILE when unmounted "
                             "(mounts with --serve fuse unless --serve is given)")
    parser.add_argument("--policy", default=None, metavar="NAME[,NAME]",
                        help="fetch policies of the mount's daemon: none, readahead, trace, background, "
                             "locality, extent, or package.module:Class (default: readahead,trace,extent)")
    parser.add_argument("--learned-trace", choices=("off", "pull", "push"), default="pull",
                        help="pull (default): a layer without a trace of its own prefetches from a trace "
                             "attached to the image in the registry, and the start is recorded into the "
                             "cache's trace of the image; push: that trace is also attached to the image "
                             "in the registry (needs push access); off: neither")
    parser.add_argument("--allow-suid-dev", action="store_true",
                        help="trust the image: its setuid/setgid bits, file capabilities and device nodes "
                             "take effect on the mount (default: mounted nosuid,nodev)")
    parser.add_argument("--background-fetch", action="store_true",
                        help="after the prefetch, fetch the rest of the image at the lowest priority")
    parser.add_argument("--background-rate", type=_size, default=None, metavar="BYTES",
                        help="limit the background fetch to this many bytes per second (e.g. 10M)")
    add_registry_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config, registry = load_with_registry(args)
        mountpoint, startup = _startup_spec(args)
        if args.policy is not None:
            parse_policy_names(args.policy)
    except (_UsageError, ConfigError, PolicyError) as e:
        print(f"lazyfs mount: {e}", file=sys.stderr)
        return 2
    if args.daemon is not None:
        return _mount_shared(args, mountpoint, startup)
    cache_dir = args.cache_dir or config.cache_dir
    cache_size = args.cache_size if args.cache_size is not None else config.cache_size
    state = MountState.for_mountpoint(mountpoint, args.run_dir)
    refusal = _mount_point_refusal(state)
    if refusal is not None:
        print(f"lazyfs mount: {refusal}", file=sys.stderr)
        return 1
    startup["stack"]["mountpoint"] = str(state.mountpoint)
    if args.record_trace is not None:
        startup["record_trace"] = os.path.abspath(args.record_trace)
    if args.background_fetch:
        for attach in startup.get("attach", []):
            attach["background_fetch"] = True
            attach["background_rate"] = args.background_rate
    state.root.mkdir(parents=True, exist_ok=True)
    os.chmod(state.root, 0o700)
    state.startup_file.write_text(json.dumps(startup, indent=1))
    state.info_file.write_text(json.dumps({"mountpoint": str(state.mountpoint), "source": startup["source"]},
                                          indent=1))
    ready_read, ready_write = os.pipe()
    # A trace recorded in kernel mode lacks the lookup/open events (the kernel answers them).
    serve = args.serve or ("fuse" if args.record_trace is not None else config.serve)
    cmd = daemon_command(fuse_dir=state.fuse_dir, socket=state.socket, cache_dir=cache_dir, cache_size=cache_size,
                         metrics=args.metrics, registry=registry, verbose=args.verbose,
                         allow_suid_dev=args.allow_suid_dev, read_timeout=args.read_timeout,
                         request_timeout=args.request_timeout,
                         serve=serve, layers_dir=state.layers_dir if serve == "kernel" else None,
                         policies=args.policy.split(",") if args.policy else None)
    cmd += ["--startup", str(state.startup_file)]
    # Kernel mode: the layers' mounts outlive the daemon, so a supervisor restarts a daemon that
    # dies (lazyfs.daemon.mountsupervisor). In the foreground this command watches it instead.
    supervised = serve == "kernel" and not args.foreground
    if supervised:
        cmd = supervisor_command(state, cmd, ready_fd=ready_write)
    else:
        cmd += ["--ready-fd", str(ready_write)]
    try:
        with open(state.log_file, "ab") as log_file:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                    start_new_session=not args.foreground, close_fds=True, pass_fds=(ready_write,))
    finally:
        os.close(ready_write)
    (state.supervisor_pid_file if supervised else state.pid_file).write_text(f"{proc.pid}\n")
    with os.fdopen(ready_read, "rb") as ready:
        error, status = _wait_ready(state, proc, ready)
    if error is not None:
        print(f"lazyfs mount: {error}", file=sys.stderr)
        state.clean_stale()
        return status
    if not args.foreground:
        return 0
    return _wait_foreground(state, proc)


class _UsageError(Exception):
    pass


def _mount_point_refusal(state: MountState) -> str | None:
    """Why nothing may be mounted at the state's mount point (after cleaning up after a dead
    daemon), or None."""
    if state.exists() and state.in_use():
        return f"{state.mountpoint} is already mounted by daemon {state.pid()}"
    state.clean_stale()
    if is_mounted(state.mountpoint):
        return f"something else is mounted at {state.mountpoint}"
    if not state.mountpoint.is_dir():
        return f"{state.mountpoint} is not a directory"
    return None


_NOT_WITH_DAEMON = {"meta": "--meta/--blob", "foreground": "--foreground", "record_trace": "--record-trace",
                    "metrics": "--metrics", "cache_dir": "--cache-dir", "cache_size": "--cache-size",
                    "insecure_registry": "--insecure-registry", "hosts_dir": "--hosts-dir",
                    "registry_auth": "--registry-auth", "serve": "--serve", "policy": "--policy",
                    "read_timeout": "--read-timeout", "request_timeout": "--request-timeout"}


def _mount_shared(args: argparse.Namespace, mountpoint: str, startup: dict) -> int:
    """Mount the image through a running daemon: no process to start, no imports to pay."""
    given = [flag for attr, flag in _NOT_WITH_DAEMON.items() if getattr(args, attr)]
    if given:
        print(f"lazyfs mount: {', '.join(given)} cannot be used with --daemon (they are the daemon's "
              f"own settings)", file=sys.stderr)
        return 2
    socket = args.daemon.absolute()
    state = MountState.for_mountpoint(mountpoint, args.run_dir)
    refusal = _mount_point_refusal(state)
    if refusal is not None:
        print(f"lazyfs mount: {refusal}", file=sys.stderr)
        return 1
    try:
        pid = request(str(socket), "ping", timeout=5.0)["pid"]
        request(str(socket), "mount-image", timeout=READY_TIMEOUT, image=startup["image"],
                mountpoint=str(state.mountpoint))
    except ControlError as e:
        print(f"lazyfs mount: {e}", file=sys.stderr)
        return 2 if e.kind in ("bad-image", "bad-request") else 1
    state.root.mkdir(parents=True, exist_ok=True)
    os.chmod(state.root, 0o700)
    state.shared_file.write_text(json.dumps({"socket": str(socket)}))
    state.socket.symlink_to(socket)
    state.pid_file.write_text(f"{pid}\n")
    state.info_file.write_text(json.dumps({"mountpoint": str(state.mountpoint), "source": startup["source"]},
                                          indent=1))
    return 0


def _startup_spec(args: argparse.Namespace) -> tuple[str, dict]:
    if args.meta is not None or args.blob is not None:
        if args.meta is None or args.blob is None:
            raise _UsageError("--meta and --blob go together")
        if len(args.target) != 1:
            raise _UsageError("with --meta/--blob give only the mount point")
        blob = args.blob if args.blob.startswith(("http://", "https://")) else os.path.abspath(args.blob)
        attach = {"name": "layer", "kind": "plain", "meta": os.path.abspath(args.meta), "blob": blob}
        return args.target[0], {"source": {"meta": attach["meta"], "blob": blob}, "attach": [attach],
                                "stack": {"layers": ["layer"], "allow_suid_dev": args.allow_suid_dev}}
    if len(args.target) != 2:
        raise _UsageError("usage: lazyfs mount IMAGE MOUNTPOINT (or --meta META --blob BLOB MOUNTPOINT)")
    # The daemon resolves the image (lazyfs.daemon.imagespec): this process stays free of trio and
    # httpx, whose import is most of a cold mount's start-up time.
    image = {"ref": args.target[0], "layer": args.layer, "platform": args.platform,
             "trace": os.path.abspath(args.trace) if args.trace else None, "prefetch": not args.no_prefetch,
             "learn": args.learned_trace, "background_fetch": args.background_fetch, "background_rate": args.background_rate,
             "allow_suid_dev": args.allow_suid_dev}
    return args.target[1], {"source": {"image": args.target[0], "layer": args.layer},
                            "image": image, "stack": {}}


def _wait_ready(state: MountState, proc: subprocess.Popen, ready) -> tuple[str | None, int]:
    """Wait for the daemon's startup report on the ready pipe; (error or None, exit status)."""
    readable, _, _ = select.select([ready], [], [], READY_TIMEOUT)
    line = ready.readline() if readable else None
    if line is None:
        proc.terminate()
        return f"the mount was not ready after {READY_TIMEOUT:.0f}s:\n{_log_tail(state)}", 1
    try:
        outcome = json.loads(line) if line else {}
    except ValueError:
        outcome = {}
    if outcome.get("ready"):
        return None, 0
    if "error" in outcome:
        proc.wait()
        return outcome["error"], 2 if outcome.get("usage") else 1
    # The pipe closed without a report: the daemon died before it could say why.
    status = proc.wait()
    return f"the daemon exited with status {status}:\n{_log_tail(state)}", 1


def _log_tail(state: MountState, lines: int = 20) -> str:
    try:
        text = state.log_file.read_text(errors="replace")
    except FileNotFoundError:
        return "(no daemon log)"
    return "\n".join(text.splitlines()[-lines:])


def _wait_foreground(state: MountState, proc: subprocess.Popen) -> int:
    def forward(signum, _frame):
        if daemon_running(proc.pid):
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = proc.wait()
    state.clean_stale()
    return 0 if status in (0, -signal.SIGTERM) else status
