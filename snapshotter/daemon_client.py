"""The lazyfs daemon as the snapshotter sees it: a control socket, and a process to keep alive.

:class:`DaemonLayerFS` implements :class:`snapshotter.layerfs.LayerFS` with requests on the
daemon's control socket (lazyfs.daemon.control: unix socket, one JSON object per line each way).
:class:`DaemonSupervisor` starts the daemon (or adopts one that is already answering, e.g.
after a snapshotter restart), watches it, and when it dies logs the loss, starts a new one and
lets the snapshotter re-attach its lazy layers. Running containers whose overlay mounts used
the old FUSE connection lose their lazy lowerdirs: the kernel cannot move them to the new one.
(In the kernel serving mode their EROFS lowerdirs stay mounted and keep serving what is in
the page cache; other reads fail until the new daemon has re-attached the layer, which swaps
the loop devices under them onto its own files: then every read works again.)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from lazyfs.daemon.control import ControlClient, ControlError
from lazyfs.daemon.supervise import RestartPolicy, Supervisor, process_running
from lazyfs.daemon.upgrade import successor_fuse_dir

from .config import Config, TracesConfig
from .errors import LayerFSError
from .layerfs import layer_source

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0  # an attach fetches and verifies the layer's metadata
PING_TIMEOUT = 2.0
START_TIMEOUT = 30.0
WATCH_INTERVAL = 0.5


class DaemonRequestError(LayerFSError):
    """The daemon answered with an error; ``kind`` is its error type ("exists", ...)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind
MAX_RESTART_DELAY = 30.0


class DaemonLayerFS:
    """Attach requests carry ``kind: "lazyfs"``, the image reference (registry host rewritten to
    a configured mirror), the layer digest, the layer's lazyfs annotations (full keys, as in
    the descriptor) and whether to prefetch its embedded trace; with the image's manifest digest
    (the CRI label), also the learned-trace settings: look a trace up in the registry, record
    the start, push it."""

    def __init__(self, control_socket: Path, mountpoint: Path,
                 mirrors: Mapping[str, list[str]] | None = None, prefetch: bool = True,
                 background_fetch: bool = False, background_rate: int | None = None,
                 traces: TracesConfig | None = None):
        self.control_socket = Path(control_socket)
        self.mountpoint = Path(mountpoint)
        self.mirrors = dict(mirrors or {})
        self.prefetch = prefetch
        self.background = {"background_fetch": True, "background_rate": background_rate} if background_fetch else {}
        self.traces = traces or TracesConfig()

    def request(self, op: str, timeout: float = REQUEST_TIMEOUT, **args) -> dict:
        try:
            with ControlClient(str(self.control_socket), timeout=timeout) as client:
                return client.request(op, **args)
        except ControlError as e:
            raise DaemonRequestError(f"lazyfs daemon: {op}: {e}", kind=e.kind) from e

    def ready(self) -> bool:
        try:
            return bool(self.request("ping", timeout=PING_TIMEOUT).get("ready"))
        except LayerFSError:
            return False

    def check(self, labels: Mapping[str, str]) -> bool:
        return layer_source(labels) is not None and self.ready()

    def mount(self, layer: str, labels: Mapping[str, str]) -> str:
        source = layer_source(labels)
        if source is None:
            raise LayerFSError(f"labels of layer {layer} do not describe a lazyfs layer")
        try:
            self.request("attach", kind="lazyfs", name=layer, ref=mirrored(source.image_ref, self.mirrors),
                         digest=source.layer_digest, annotations=source.lazyfs_annotations,
                         prefetch=self.prefetch, **self.background, **self._learning(source.manifest_digest))
        except DaemonRequestError as e:
            if e.kind != "exists":  # attached before (by us, before a snapshotter restart)
                raise
        return self.path(layer)

    def _learning(self, manifest_digest: str) -> dict:
        t = self.traces
        args: dict = {"share": t.share, "learned_trace": self.prefetch and t.share != "off", "record_trace": t.record}
        if manifest_digest.startswith("sha256:"):
            # CRI names the image manifest; without it (ctr-remote) the daemon resolves the reference
            args["image_manifest"] = manifest_digest
        if t.record and t.share == "push" and t.username:
            args["push_credentials"] = {"username": t.username, "password": t.password}
        return args

    def unmount(self, layer: str) -> None:
        try:
            self.request("detach", name=layer)
        except DaemonRequestError as e:
            if e.kind != "not-found":
                raise

    def path(self, layer: str) -> str:
        return str(self.mountpoint / layer)

    def attached(self) -> set[str]:
        return {entry["name"] for entry in self.request("list").get("layers", [])}


def mirrored(image_ref: str, mirrors: Mapping[str, list[str]]) -> str:
    """``image_ref`` with its registry host replaced by the first mirror configured for it."""
    first, sep, rest = image_ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = "docker.io", image_ref
    if host == "docker.io" and "/" not in path:
        path = "library/" + path
    for mirror in mirrors.get(host, [])[:1]:
        return f"{mirror.split('://', 1)[-1].rstrip('/')}/{path}"
    return image_ref


class DaemonSupervisor:
    def __init__(self, cfg: Config, layerfs: DaemonLayerFS,
                 on_restart: Callable[[], object] = lambda: None):
        self.cfg = cfg
        self.layerfs = layerfs
        self.on_restart = on_restart
        self.pid_file = cfg.root / "daemon.pid"
        self.log_file = cfg.root / "daemon.log"
        self._process: subprocess.Popen | None = None
        self._process_pid = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def command(self) -> list[str]:
        d = self.cfg.daemon
        program = [d.binary] if d.binary else [sys.executable, "-m", "lazyfs.daemon"]
        cmd = [*program, "--fuse-dir", str(d.fuse_dir(self.cfg.root)), "--socket", str(d.control_socket),
               "--cache-dir", str(d.cache_dir), "--cache-size", str(d.cache_size)]
        if d.serve == "kernel":
            cmd += ["--serve", "kernel", "--layers-dir", str(d.mountpoint),
                    "--loop-direct-io", "on" if d.loop_direct_io else "off"]
        for host in self.cfg.registry.insecure_hosts:
            cmd += ["--insecure-registry", host]
        registry = self.cfg.registry
        cmd += ["--hosts-dir", str(registry.hosts_dir) if registry.hosts_dir is not None else ""]
        if registry.auth_file is not None:
            cmd += ["--registry-auth", str(registry.auth_file)]
        if d.metrics:
            cmd += ["--metrics", d.metrics]
        if d.read_timeout is not None:
            cmd += ["--read-timeout", str(d.read_timeout)]
        if d.request_timeout is not None:
            cmd += ["--request-timeout", str(d.request_timeout)]
        if d.verbose:
            cmd += ["-v"]
        traces = self.cfg.traces
        cmd += ["--record-quiet", str(traces.quiet), "--record-max-seconds", str(traces.max_seconds),
                "--record-max-bytes", str(traces.max_bytes)]
        if d.allow_suid_dev:
            cmd.append("--allow-suid-dev")
        if d.policies:
            cmd += ["--policy", ",".join(d.policies)]
        return cmd

    def start(self) -> None:
        """Adopt or start the daemon, then watch it. A daemon that cannot start is logged and
        retried with backoff; meanwhile every layer takes the ordinary (unpacking) path."""
        if self.layerfs.ready():
            pid = self.layerfs.request("ping", timeout=PING_TIMEOUT).get("pid")
            if isinstance(pid, int):
                self.pid_file.write_text(str(pid))
            log.info("adopting the lazyfs daemon (pid %s) already serving %s", pid,
                     self.layerfs.control_socket)
        else:
            try:
                self._spawn()
            except LayerFSError as e:
                log.error("starting the lazyfs daemon failed: %s", e)
        self._thread = threading.Thread(target=self._watch, name="daemon-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising; the daemon keeps running for the containers that use it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def daemon_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def _alive(self) -> bool:
        """Whether the daemon process exists. A slow answer is no reason to start a second
        daemon on the same mountpoint, so liveness is the process, not the ping."""
        if self._process is not None:
            if self._process.poll() is None:  # poll also reaps an exited child
                return True
            self._process = None
            if self.daemon_pid() != self._process_pid:  # `lazyfs-snapshotter upgrade` recorded its successor
                log.info("lazyfs daemon %d was replaced by daemon %s (upgrade)", self._process_pid, self.daemon_pid())
        pid = self.daemon_pid()
        return pid is not None and _is_daemon_process(pid, self.cfg.daemon.control_socket)

    def _spawn(self) -> None:
        self._release_stale_mount()
        for path in (self.cfg.daemon.mountpoint, self.cfg.daemon.fuse_dir(self.cfg.root), self.cfg.daemon.cache_dir):
            path.mkdir(parents=True, exist_ok=True)
        try:
            out = open(self.log_file, "ab")
        except OSError as e:
            raise LayerFSError(f"daemon log {self.log_file}: {e}") from e
        with out:
            # Its own session: a signal to the snapshotter's process group must not reach it.
            try:
                self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                                 stdout=out, stderr=out, start_new_session=True)
            except OSError as e:
                raise LayerFSError(f"cannot run {self.cfg.daemon.binary}: {e}") from e
        self._process_pid = self._process.pid
        self.pid_file.write_text(str(self._process.pid))
        deadline = time.monotonic() + START_TIMEOUT
        while not self.layerfs.ready():
            if self._process.poll() is not None:
                raise LayerFSError(f"lazyfs daemon exited with status {self._process.returncode}; "
                                   f"see {self.log_file}")
            if time.monotonic() > deadline:
                raise LayerFSError(f"lazyfs daemon did not answer within {START_TIMEOUT}s")
            time.sleep(0.05)
        log.info("lazyfs daemon started (pid %d)", self._process.pid)

    def _release_stale_mount(self) -> None:
        """A dead daemon leaves its FUSE mount behind ("transport endpoint is not connected").
        (In kernel mode its layers' EROFS mounts stay too: the new daemon replaces each one as
        it re-attaches the layer.) After an upgrade the daemon's FUSE mount is beside the
        configured one (lazyfs.daemon.upgrade.successor_fuse_dir)."""
        fuse_dir = self.cfg.daemon.fuse_dir(self.cfg.root)
        for path in (str(fuse_dir), str(successor_fuse_dir(fuse_dir))):
            with open("/proc/self/mountinfo") as f:
                mounted = any(line.split()[4] == path for line in f)
            if mounted:
                subprocess.run(["umount", "-l", path], check=False, capture_output=True)

    def _watch(self) -> None:
        Supervisor(alive=self._alive, start=self._restart, on_lost=self._log_loss, stop=self._stop,
                   policy=RestartPolicy(watch_interval=WATCH_INTERVAL, first_delay=2 * WATCH_INTERVAL,
                                        max_delay=MAX_RESTART_DELAY)).watch()

    def _log_loss(self) -> None:
        if self.cfg.daemon.serve == "kernel":
            log.error("lazyfs daemon lost (pid %s); restarting it (kernel serving mode: running "
                      "containers get their layers back when they are re-attached)", self.daemon_pid())
        else:
            log.error("lazyfs daemon lost (pid %s); containers using its layers lose them; "
                      "restarting it", self.daemon_pid())

    def _restart(self) -> None:
        self._spawn()
        self.on_restart()


def _is_daemon_process(pid: int, control_socket: Path) -> bool:
    """``pid`` is running and is the daemon serving ``control_socket`` (not a reused pid)."""
    return process_running(pid, control_socket)


def stop_daemon(pid_file: Path, timeout: float = 10.0) -> None:
    """Terminate the daemon recorded in ``pid_file`` (for shutdown scripts and tests)."""
    try:
        pid = int(Path(pid_file).read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
