"""A registry behind a shaped link, entirely on this machine.

    client --> 127.0.0.1:PORT  delay proxy (+rtt/2 each way)
                 --> host veth  [tbf rate R]  ==  namespace veth [tbf rate R]
                       --> docker-registry on 169.254.A.B:5000 inside network namespace

The registry runs in its own network namespace ``lazyfs-bench-<id>``, reachable only over a
veth pair addressed from a link-local /30 that exists on this pair alone (nothing is routed
anywhere else). Both veth ends carry a tbf qdisc, so requests (pushes) and responses are
both limited to the rate. The kernel has no netem, so the round-trip time is added by the
delay proxy (lazyfs.bench.delayproxy) that clients connect to on the loopback.

Every instance records itself in /run/lazyfs-bench/<namespace>.json (owner pid and start
time, proxy pid, addresses) before creating anything, so leftovers of a crashed run are
recognised and removed by the next one, and live instances of other processes are left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import NetShapeError
from .lifecycle import StartStop, exclusive_lock

log = logging.getLogger(__name__)

NAMESPACE_PREFIX = "lazyfs-bench-"
STATE_DIR = Path("/run/lazyfs-bench")
REGISTRY_PORT = 5000
# 169.254.200.0 - 169.254.209.255, in /30s: far from 169.254.169.254, which clouds use.
_SUBNET_THIRD_OCTETS = range(200, 210)
_READY_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class LinkShape:
    """The emulated link: rate (tbf on both veth ends) and added round-trip time (proxy)."""
    rate_mbit: float = 100.0
    rtt_ms: float = 20.0
    # tbf bucket: a few ms at line rate, never below one GSO-free burst of 16 KiB.
    burst_ms: float = 2.0
    # tbf queue: packets waiting longer than this are dropped (the bottleneck's buffer).
    queue_ms: float = 50.0

    @property
    def burst_bytes(self) -> int:
        return max(16 * 1024, int(self.rate_mbit * 1e6 / 8 * self.burst_ms / 1000))

    def tbf_args(self) -> list[str]:
        return ["tbf", "rate", f"{self.rate_mbit:g}mbit", "burst", str(self.burst_bytes),
                "latency", f"{self.queue_ms:g}ms"]


@dataclass
class _State:
    namespace: str
    owner_pid: int
    owner_start: str
    host_veth: str
    ns_veth: str
    host_addr: str
    ns_addr: str
    proxy_pid: int | None = None

    def path(self) -> Path:
        return STATE_DIR / f"{self.namespace}.json"

    def save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.path().with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, self.path())

    @classmethod
    def load(cls, namespace: str) -> _State | None:
        try:
            return cls(**json.loads((STATE_DIR / f"{namespace}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


def _ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetShapeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _tc(namespace: str | None, *args: str) -> None:
    cmd = ["tc", *(["-n", namespace] if namespace else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = ""
        if "unknown" in proc.stderr.lower():
            hint = " (the kernel needs sch_tbf: modprobe sch_tbf)"
        raise NetShapeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}{hint}")


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks: tells a live pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int | None, start: str | None = None) -> bool:
    if not pid:
        return False
    current = _process_start(pid)
    return current is not None and (start is None or current == start)


def _is_our_proxy(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"lazyfs.bench.delayproxy" in cmdline


def _stop_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL after a bound."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT
    while time.monotonic() < deadline and _alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def list_namespaces() -> list[str]:
    """Network namespaces created by this module (live or left over)."""
    out = _ip("netns", "list", check=False)
    return sorted(line.split()[0] for line in out.splitlines()
                  if line.startswith(NAMESPACE_PREFIX))


def _destroy(namespace: str, state: _State | None) -> None:
    """Stop everything an instance started and delete its namespace (and so its veth pair)."""
    if state is not None and state.proxy_pid and _is_our_proxy(state.proxy_pid):
        _stop_pid(state.proxy_pid)
    if namespace in list_namespaces():
        for pid in _ip("netns", "pids", namespace, check=False).split():
            _stop_pid(int(pid))
        _ip("netns", "del", namespace, check=False)
    if state is not None and state.host_veth:
        _ip("link", "del", state.host_veth, check=False)  # only if the namespace was never made
    (STATE_DIR / f"{namespace}.json").unlink(missing_ok=True)


def cleanup_leftovers(*, include_live: bool = False) -> list[str]:
    """Remove instances whose owner process is gone (or all of them); return their names."""
    removed = []
    names = set(list_namespaces())
    if STATE_DIR.is_dir():
        names |= {p.stem for p in STATE_DIR.glob(f"{NAMESPACE_PREFIX}*.json")}
    for namespace in sorted(names):
        state = _State.load(namespace)
        if state is not None and not include_live and _alive(state.owner_pid, state.owner_start):
            continue
        log.info("removing shaped-link instance %s (owner gone)", namespace)
        _destroy(namespace, state)
        removed.append(namespace)
    return removed


def _free_subnet() -> tuple[str, str]:
    """A /30 from our link-local block that no interface and no instance uses."""
    used = set(_ip("-o", "-4", "addr", "show", check=False).split())
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("*.json"):
            state = _State.load(path.stem)
            if state is not None:
                used |= {state.host_addr, state.ns_addr}
    for third in _SUBNET_THIRD_OCTETS:
        for base in range(0, 256, 4):
            host, peer = f"169.254.{third}.{base + 1}", f"169.254.{third}.{base + 2}"
            if f"{host}/30" not in used and host not in used and peer not in used:
                return host, peer
    raise NetShapeError("no free /30 left in 169.254.200.0-169.254.209.255 for a shaped link")


def _http_get_status(addr: str, path: str, timeout: float = 2.0) -> int:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


class ShapedRegistry(StartStop):
    """docker-registry in a network namespace behind tbf + a delay proxy (a context manager).

    ``endpoint`` ("127.0.0.1:PORT") is the shaped path clients use; ``registry_addr`` is the
    registry's own address behind tbf only (no added delay); ``registry_log`` its log,
    with one access-log line per request.
    """

    def __init__(self, root: Path, shape: LinkShape = LinkShape(), *,
                 registry_log: Path | None = None) -> None:
        self.root = Path(root)
        self.shape = shape
        self._run_dir: Path | None = None  # registry config, logs (removed at stop)
        self._registry_log = registry_log
        self.registry_log = registry_log
        self.namespace = ""
        self.registry_addr = ""
        self.endpoint = ""
        self._state: _State | None = None
        self._registry: subprocess.Popen | None = None
        self._proxy: subprocess.Popen | None = None

    def start(self) -> None:
        for tool in ("ip", "tc", "docker-registry"):
            if shutil.which(tool) is None:
                raise NetShapeError(f"{tool} is not installed")
        cleanup_leftovers()
        self._run_dir = Path(tempfile.mkdtemp(prefix="lazyfs-bench-registry-"))
        self.registry_log = self._registry_log or self._run_dir / "registry.log"
        ident = secrets.token_hex(3)
        with exclusive_lock(STATE_DIR / ".lock"):
            host_addr, ns_addr = _free_subnet()
            self._state = _State(
                namespace=NAMESPACE_PREFIX + ident, owner_pid=os.getpid(),
                owner_start=_process_start(os.getpid()) or "", host_veth=f"lzb{ident}h",
                ns_veth=f"lzb{ident}n", host_addr=host_addr, ns_addr=ns_addr)
            self._state.save()
            self._make_link(self._state)
        self.namespace = self._state.namespace
        self.registry_addr = f"{ns_addr}:{REGISTRY_PORT}"
        self._start_registry()
        self._start_proxy()
        log.info("shaped registry %s: %s -> %s (%g Mbit/s, +%g ms RTT)", self.namespace,
                 self.endpoint, self.registry_addr, self.shape.rate_mbit, self.shape.rtt_ms)

    def _make_link(self, s: _State) -> None:
        _ip("netns", "add", s.namespace)
        _ip("link", "add", s.host_veth, "type", "veth", "peer", "name", s.ns_veth,
            "netns", s.namespace)
        _ip("addr", "add", f"{s.host_addr}/30", "dev", s.host_veth)
        _ip("link", "set", s.host_veth, "up")
        _ip("-n", s.namespace, "addr", "add", f"{s.ns_addr}/30", "dev", s.ns_veth)
        _ip("-n", s.namespace, "link", "set", s.ns_veth, "up")
        _ip("-n", s.namespace, "link", "set", "lo", "up")
        _tc(None, "qdisc", "replace", "dev", s.host_veth, "root", *self.shape.tbf_args())
        _tc(s.namespace, "qdisc", "replace", "dev", s.ns_veth, "root", *self.shape.tbf_args())

    def _start_registry(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self._run_dir / "registry.yml"
        # JSON is YAML: the registry reads this as its configuration file.
        config.write_text(json.dumps({
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.root.resolve())},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.registry_addr},
        }))
        with open(self.registry_log, "ab") as out:
            self._registry = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, "docker-registry", "serve", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            if self._registry.poll() is not None:
                raise NetShapeError(f"docker-registry exited ({self._registry.returncode}): "
                                    f"{self._log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if _http_get_status(self.registry_addr, "/v2/") == 200:
                    return
            if time.monotonic() > deadline:
                raise NetShapeError(f"docker-registry not ready after {_READY_TIMEOUT:g} s: "
                                    f"{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.registry_log.read_text()[-2000:]
        return ""

    def _start_proxy(self) -> None:
        assert self._state is not None
        with open(self._run_dir / "proxy.log", "ab") as proxy_log:
            self._proxy = subprocess.Popen(
                [sys.executable, "-m", "lazyfs.bench.delayproxy",
                 "--upstream", self.registry_addr, "--delay-ms", f"{self.shape.rtt_ms / 2:g}"],
                stdout=subprocess.PIPE, stderr=proxy_log, stdin=subprocess.DEVNULL, text=True,
                start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]))
        self._state.proxy_pid = self._proxy.pid
        self._state.save()
        assert self._proxy.stdout is not None
        line = self._proxy.stdout.readline().strip()  # the proxy prints it once bound
        if not line.startswith("listening "):
            raise NetShapeError(f"delay proxy did not start (exit {self._proxy.poll()}): {line!r}")
        self.endpoint = line.split()[1]

    def stop(self) -> None:
        """Stop the proxy and registry, delete the namespace; safe to call more than once."""
        for proc in (self._proxy, self._registry):
            if proc is not None and proc.poll() is None:
                _stop_pid(proc.pid)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(_STOP_TIMEOUT)
                if proc.stdout is not None:
                    proc.stdout.close()
        if self._state is not None:
            _destroy(self._state.namespace, self._state)
            self._state = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None


@contextlib.contextmanager
def shaped_registry(rate_mbit: float = 100, rtt_ms: float = 20, *, root: Path | str,
                    **shape: float) -> Iterator[str]:
    """A docker-registry with storage in ``root`` behind a shaped link; yields "127.0.0.1:PORT".

    Extra keyword arguments are LinkShape fields (burst_ms, queue_ms).
    """
    with ShapedRegistry(Path(root), LinkShape(rate_mbit, rtt_ms, **shape)) as registry:
        yield registry.endpoint


# --- measurement ----------------------------------------------------------------------

def _connect(endpoint: str, timeout: float = 60) -> http.client.HTTPConnection:
    host, port = endpoint.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def upload_blob(endpoint: str, repository: str, data: bytes) -> str:
    """Monolithic blob upload (POST then PUT); returns the blob digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn = _connect(endpoint)
    try:
        conn.request("POST", f"/v2/{repository}/blobs/uploads/")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 202:
            raise NetShapeError(f"blob upload start: HTTP {resp.status}")
        location = urllib.parse.urlsplit(resp.getheader("Location", ""))
        query = f"{location.query}&digest={digest}" if location.query else f"digest={digest}"
        conn.request("PUT", f"{location.path}?{query}", body=data,
                     headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 201:
            raise NetShapeError(f"blob upload: HTTP {resp.status}")
    finally:
        conn.close()
    return digest


def time_blob_download(endpoint: str, repository: str, digest: str) -> tuple[int, float]:
    """(bytes, seconds) of one GET of the blob on a new connection; checks the digest."""
    started = time.monotonic()
    conn = _connect(endpoint)
    try:
        conn.request("GET", f"/v2/{repository}/blobs/{digest}")
        resp = conn.getresponse()
        if resp.status != 200:
            raise NetShapeError(f"blob download: HTTP {resp.status}")
        h = hashlib.sha256()
        size = 0
        while block := resp.read(1 << 20):
            h.update(block)
            size += len(block)
    finally:
        conn.close()
    seconds = time.monotonic() - started
    if "sha256:" + h.hexdigest() != digest:
        raise NetShapeError("blob download: content does not match its digest")
    return size, seconds


def time_round_trips(endpoint: str, count: int = 20) -> list[float]:
    """Seconds of each of ``count`` sequential tiny requests (GET /v2/) on one connection."""
    conn = _connect(endpoint)
    times = []
    try:
        conn.connect()
        for _ in range(count):
            started = time.monotonic()
            conn.request("GET", "/v2/")
            resp = conn.getresponse()
            resp.read()
            times.append(time.monotonic() - started)
            if resp.status != 200:
                raise NetShapeError(f"GET /v2/: HTTP {resp.status}")
    finally:
        conn.close()
    return times


def _curl_seconds(url: str, size: int) -> float:
    """curl's own total time for one GET of url (its size checked)."""
    proc = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
                           url], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise NetShapeError(f"curl {url} failed: {proc.stderr.strip()}")
    seconds, downloaded = proc.stdout.split()
    if int(float(downloaded)) != size:
        raise NetShapeError(f"curl {url}: {downloaded} bytes, expected {size}")
    return float(seconds)


def check_link(shape: LinkShape, blob_mib: int = 50) -> dict[str, float]:
    """Bring up a shaped registry, measure throughput and round trips, tear it down."""
    with tempfile.TemporaryDirectory(prefix="lazyfs-bench-check-") as root, \
            ShapedRegistry(Path(root), shape) as registry:
        data = os.urandom(blob_mib << 20)
        started = time.monotonic()
        digest = upload_blob(registry.endpoint, "check/blob", data)
        upload_seconds = time.monotonic() - started
        size, seconds = time_blob_download(registry.endpoint, "check/blob", digest)
        curl_seconds = _curl_seconds(f"http://{registry.endpoint}/v2/check/blob/blobs/{digest}",
                                     size)
        shaped_rtt = sorted(time_round_trips(registry.endpoint))
        direct_rtt = sorted(time_round_trips(registry.registry_addr))
    return {
        "curl_download_s": curl_seconds, "curl_mbit_s": size * 8 / curl_seconds / 1e6,
        "rate_mbit": shape.rate_mbit, "rtt_ms": shape.rtt_ms, "blob_mib": blob_mib,
        "upload_mbit_s": size * 8 / upload_seconds / 1e6,
        "download_s": seconds, "download_mbit_s": size * 8 / seconds / 1e6,
        "download_mb_s": size / seconds / 1e6,
        "rtt_median_ms": shaped_rtt[len(shaped_rtt) // 2] * 1000,
        "rtt_min_ms": shaped_rtt[0] * 1000,
        "rtt_unproxied_median_ms": direct_rtt[len(direct_rtt) // 2] * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazyfs.bench.netshape",
                                     description="A docker-registry behind a shaped link.")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run a shaped registry until interrupted")
    up.add_argument("--root", type=Path, required=True, help="registry storage directory")
    down = sub.add_parser("down", help="remove leftovers of crashed runs")
    down.add_argument("--all", action="store_true", help="also instances of live processes")
    check = sub.add_parser("check", help="measure throughput and round-trip time")
    check.add_argument("--blob-mib", type=int, default=50)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shape = LinkShape(args.rate_mbit, args.rtt_ms)

    if args.command == "down":
        for namespace in cleanup_leftovers(include_live=args.all):
            print(f"removed {namespace}")
        return 0
    if args.command == "check":
        for key, value in check_link(shape, args.blob_mib).items():
            print(f"{key:24} {value:10.2f}")
        return 0
    with ShapedRegistry(args.root, shape) as registry:
        print(f"endpoint {registry.endpoint}  (registry {registry.registry_addr} in "
              f"{registry.namespace}, log {registry.registry_log})", flush=True)
        stop = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.append(True))
        while not stop:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
