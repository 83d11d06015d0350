"""The parts an experiment runs against: a private containerd, lazyfs-snapshotter (with its
lazyfs daemon), a plain loopback registry, and probes of processes and the page cache.

Everything lives below one work directory the runner owns; ``stop()`` of each part is
idempotent and runs on every exit path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lazyfs.daemon.control import ControlClient, ControlError

from .errors import BenchError
from .lifecycle import StartStop

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CTR_TIMEOUT = 600.0
NAMESPACE = "lazyfs-bench"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"


class SystemError_(BenchError):
    """A part of the system under test failed to start, stop or reach its cold state."""


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemError_(f"{name} is not installed (tools/install.sh installs it)")
    return path


def venv_script(name: str) -> str:
    """A console script installed next to this interpreter (lazyfs, lazyfs-snapshotter)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return tool(name)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a live process (from /proc/PID/stat), or None."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # after the command: state(0) ... utime is field 14 of the line, index 11 here; stime 12
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def page_cache_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1])
    raise SystemError_("no Cached: line in /proc/meminfo")


def drop_page_cache() -> tuple[int, int]:
    """sync, then drop the page cache, dentries and inodes; (Cached KiB before, after)."""
    before = page_cache_kib()
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemError_(f"cannot drop the page cache (root needed): {e}") from e
    return before, page_cache_kib()


def mount_points_below(base: Path) -> list[str]:
    prefix = str(base)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def unmount_below(base: Path) -> None:
    """Lazily unmount everything at or below ``base``, deepest first."""
    for point in sorted(mount_points_below(base), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _stop_process(proc: subprocess.Popen | None, timeout: float = STOP_TIMEOUT) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pid_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PlainRegistry(StartStop):
    """docker-registry on 127.0.0.1 with no shaping (the ``loopback`` profile, and pushes).

    Same interface as ShapedRegistry: ``endpoint`` and ``registry_log`` (access log lines).
    """

    def __init__(self, root: Path, run_dir: Path):
        self.root = Path(root)
        self.run_dir = Path(run_dir)
        self.endpoint = ""
        self.registry_log = self.run_dir / "registry.log"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"127.0.0.1:{free_port()}"
        config = self.run_dir / "registry.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.root.resolve())},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.endpoint},
        }))
        with open(self.registry_log, "ab") as out:
            self._process = subprocess.Popen([tool("docker-registry"), "serve", str(config)],
                                             stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise SystemError_(f"docker-registry exited: {self.registry_log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", int(self.endpoint.rsplit(":", 1)[1])), 1):
                    return
            if time.monotonic() > deadline:
                raise SystemError_("docker-registry did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        _stop_process(self._process)
        self._process = None


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a component's log, for error messages ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return ""


class Containerd:
    """A private containerd (root, state, sockets below ``base``) with the lazyfs proxy plugin."""

    def __init__(self, base: Path, namespace: str = NAMESPACE):
        self.base = Path(base)
        self.namespace = namespace
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.address = str(self.base / "containerd.sock")
        self.snapshotter_socket = self.base / "lazyfs-snapshotter.sock"
        self.hosts_dir = self.base / "hosts.d"
        self.log_path = self.base / "containerd.log"
        self.process: subprocess.Popen | None = None

    # No Kubernetes CRI (a subclass turns it on), no snapshotters or tracing this host lacks.
    disabled_plugins: tuple[str, ...] = (
        CRI_PLUGIN, "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
        "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
        "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing")

    def plugins_config(self) -> str:
        """TOML appended to the configuration: settings of enabled plugins (none here)."""
        return ""

    def config(self) -> str:
        disabled = ", ".join(json.dumps(p) for p in self.disabled_plugins)
        return f"""\
version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[proxy_plugins]
  [proxy_plugins.lazyfs]
    type = "snapshot"
    address = "{self.snapshotter_socket}"
""" + self.plugins_config()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def start(self) -> None:
        tool("runc")
        for d in (self.root, self.state, self.hosts_dir):
            d.mkdir(parents=True, exist_ok=True)
        config = self.base / "containerd.toml"
        config.write_text(self.config())
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [tool("containerd"), "--config", str(config), "--log-level", "warn"],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise SystemError_(f"containerd exited: {self.log_tail()}")
            if os.path.exists(self.address) and self.ctr("version", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise SystemError_(f"containerd did not start: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    def command(self, *args: str, tool_name: str = "ctr", namespace: str | None = None) -> list[str]:
        return [tool(tool_name), "-a", self.address, "-n", namespace or self.namespace, *args]

    def ctr(self, *args: str, check: bool = True, timeout: float = CTR_TIMEOUT,
            tool_name: str = "ctr", namespace: str | None = None) -> subprocess.CompletedProcess:
        cmd = self.command(*args, tool_name=tool_name, namespace=namespace)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SystemError_(f"{' '.join(cmd[3:])} failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        return proc

    def trust_http_registry(self, host: str) -> None:
        d = self.hosts_dir / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(
            f'server = "http://{host}"\n\n[host."http://{host}"]\n'
            f'  capabilities = ["pull", "resolve", "push"]\n')

    def listing(self, *args: str) -> list[str]:
        """Names from a ``ctr ... ls -q`` style listing."""
        return self.ctr(*args, "ls", "-q").stdout.split()

    def snapshots(self, snapshotter: str) -> list[str]:
        out = self.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout
        return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]

    def wait_snapshotter(self, snapshotter: str, timeout: float = START_TIMEOUT) -> None:
        """Return once containerd reaches the snapshotter's backend. containerd redials a
        restarted proxy snapshotter with backoff; ``snapshots ls`` does not tell (containerd
        answers it from its own metadata), so a probe snapshot is prepared and removed."""
        probe = f"lazyfs-bench-probe-{os.getpid()}"
        deadline = time.monotonic() + timeout
        while True:
            prepared = self.ctr("snapshots", "--snapshotter", snapshotter, "prepare", probe,
                                check=False, timeout=60)
            if prepared.returncode == 0:
                self.ctr("snapshots", "--snapshotter", snapshotter, "rm", probe, timeout=60)
                return
            if time.monotonic() > deadline:
                raise SystemError_(f"containerd cannot reach the {snapshotter} snapshotter: "
                                   f"{prepared.stderr.strip()}")
            time.sleep(0.1)

    def remove_everything(self, snapshotters: tuple[str, ...]) -> None:
        """Tasks, containers, images (synchronous GC), leftover content and snapshots."""
        for task in self.listing("task"):
            self.ctr("task", "kill", "-s", "SIGKILL", task, check=False)
            self.ctr("task", "delete", "-f", task, check=False)
        for container in self.listing("containers"):
            self.ctr("containers", "rm", container, check=False)
        images = self.listing("images")
        if images:
            self.ctr("images", "rm", "--sync", *images, check=False)
        content = self.listing("content")
        if content:
            self.ctr("content", "rm", *content, check=False)
        for snapshotter in snapshotters:
            for _ in range(16):  # children before parents: a bounded number of passes
                names = self.snapshots(snapshotter)
                if not names:
                    break
                for name in names:
                    self.ctr("snapshots", "--snapshotter", snapshotter, "rm", name, check=False)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, SystemError_):
                for task in self.ctr("task", "ls", "-q", check=False, timeout=30).stdout.split():
                    self.ctr("task", "kill", "-s", "SIGKILL", task, check=False, timeout=30)
                    self.ctr("task", "delete", "-f", task, check=False, timeout=30)
            _stop_process(self.process)
        self.process = None
        unmount_below(self.base)


@dataclass(frozen=True)
class DaemonSettings:
    """What the snapshotter configuration says about its daemon for a run: the serving mode
    (``[daemon] serve``) and the fetch policies (``[daemon] policies``); None for either
    writes nothing, so the snapshotter's and the daemon's defaults apply."""
    serve: str | None = None
    policies: tuple[str, ...] | None = None

    def toml(self) -> str:
        lines = []
        if self.serve is not None:
            lines.append(f"serve = {json.dumps(self.serve)}")
        if self.policies:  # () is "the daemon's default" as well: nothing to write
            lines.append(f"policies = {json.dumps(list(self.policies))}")
        return "".join(line + "\n" for line in lines)


class Snapshotter:
    """lazyfs-snapshotter (and through it the lazyfs daemon) with its state in ``root``."""

    def __init__(self, root: Path, socket_path: Path, log_dir: Path):
        self.root = Path(root)
        self.socket = Path(socket_path)
        self.config_path = Path(log_dir) / "snapshotter.toml"
        self.log_path = Path(log_dir) / "snapshotter.log"
        self.process: subprocess.Popen | None = None
        self.insecure_hosts: list[str] = []

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def control_socket(self) -> Path:
        return self.root / "daemon.sock"

    def fuse_dir(self) -> Path | None:
        """The running daemon's FUSE mount (the layer directories, or in kernel serving mode
        the chunk-device files), as its ``ping`` says."""
        with contextlib.suppress(SystemError_):
            fuse = self.daemon_request("ping").get("fuse")
            return Path(fuse) if fuse else None
        return None

    def daemon_pid(self) -> int | None:
        try:
            pid = int((self.root / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def daemon_request(self, op: str, timeout: float = 10.0, **args) -> dict:
        try:
            with ControlClient(str(self.control_socket), timeout=timeout) as client:
                return client.request(op, **args)
        except ControlError as e:
            raise SystemError_(f"lazyfs daemon: {op}: {e}") from e

    def start(self, insecure_hosts: list[str], settings: DaemonSettings = DaemonSettings()) -> None:
        self.insecure_hosts = list(insecure_hosts)
        self.root.mkdir(parents=True, exist_ok=True)
        hosts = ", ".join(json.dumps(h) for h in self.insecure_hosts)
        # prefetch = true: layers with an embedded trace are prefetched (trace modes).
        self.config_path.write_text(
            f'root = {json.dumps(str(self.root))}\nsocket = {json.dumps(str(self.socket))}\n'
            f'log_level = "info"\n\n[daemon]\nenabled = true\nprefetch = true\n{settings.toml()}\n'
            f'[registry]\ninsecure_hosts = [{hosts}]\n')
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen([venv_script("lazyfs-snapshotter"), "--config",
                                             str(self.config_path)], stdout=out, stderr=out,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise SystemError_(f"lazyfs-snapshotter exited: {self.log_tail()}")
            if self.socket.exists() and self.daemon_pid() is not None:
                with contextlib.suppress(SystemError_):
                    if self.daemon_request("ping", timeout=2).get("ready"):
                        return
            if time.monotonic() > deadline:
                raise SystemError_(f"lazyfs-snapshotter or its daemon did not start: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop the snapshotter first (so nothing restarts the daemon), then the daemon."""
        _stop_process(self.process)
        self.process = None
        pid = self.daemon_pid()
        if pid is not None:
            _stop_pid(pid)
        unmount_below(self.root)


def make_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lazyfs-bench-"))
