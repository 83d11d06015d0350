"""lazyfs-snapshotter configuration: a TOML file, every key optional.

```toml
root = "/var/lib/lazyfs-snapshotter"
socket = "/run/lazyfs-snapshotter/snapshotter.sock"
log_level = "info"

[daemon]
enabled = true                 # false: no lazy layers, every layer is unpacked
binary = ""                    # "": this Python's `-m lazyfs.daemon`; else a program taking its arguments
mountpoint = ""                # default <root>/mnt: one directory per attached layer (the lowerdirs)
serve = "kernel"               # each layer is an EROFS mount over a loop device of its chunk device, a
                               # file of the daemon's FUSE mount at <root>/chunk-devices; "fuse": the
                               # daemon's FUSE mount serves the layers' trees
loop_direct_io = true          # kernel mode: the chunk device's loop reads its file with direct I/O (false:
                               # through the page cache, the daemon storing what follows small reads there)
control_socket = ""            # default <root>/daemon.sock
cache_dir = ""                 # default <root>/cache
cache_size = "10GiB"
prefetch = true                # ask the daemon to prefetch each layer's embedded trace
policies = []                  # fetch policies, e.g. ["trace", "locality"] ([]: the daemon's default)
background_fetch = false       # after the prefetch, fetch each lazy layer whole at the lowest priority
background_rate = ""           # "": unlimited; else bytes per second of that fill, e.g. "10MiB"
metrics = ""                   # "HOST:PORT": the daemon serves Prometheus metrics there
verbose = false                # the daemon logs at DEBUG (default INFO: attach, detach, failures)
allow_suid_dev = false         # true: the daemon's FUSE mount honours setuid bits and device nodes
                               # (containers never need it: their overlay mounts decide)
read_timeout = 60              # seconds a read waits for data not fetched yet, then EIO
request_timeout = 30           # seconds a registry request may stay silent (or take per MiB)

[traces]                       # learned traces (see docs/design.md, "Learned traces")
record = true                  # record each image's start (kept in the daemon's cache, traces/)
share = "pull"                 # "off": neither look up nor push; "pull": a layer without a trace
                               # of its own prefetches from a trace attached to its image in the
                               # registry; "push": also attach each recorded trace to the image
quiet = 5.0                    # a recorded start ends after this many seconds without a new chunk
max_seconds = 120.0            # ... or this long after its first read
username = ""                  # push credentials; "" = the Docker config.json of the daemon's user
password = ""

[registry]
insecure_hosts = ["127.0.0.1:5000"]          # plain HTTP (passed to the daemon)
hosts_dir = "/etc/containerd/certs.d"        # containerd hosts.toml files: mirrors ("" for none)
auth_file = ""                               # Docker config.json; "": $DOCKER_CONFIG or ~/.docker
[registry.mirrors]                           # lazy layers of docker.io images come from here
"docker.io" = ["mirror.example:5000"]
```

These are all the daemon's settings: the FUSE directory, control socket, cache, metrics,
verbosity, time bounds and registry access are its command line; prefetch and background fetch go with
each attach request.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ROOT = Path("/var/lib/lazyfs-snapshotter")
DEFAULT_SOCKET = Path("/run/lazyfs-snapshotter/snapshotter.sock")
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")  # containerd's
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class ConfigError(Exception):
    pass


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m:
        raise ConfigError(f"bad size {value!r} (examples: 1073741824, 512MiB, 10GiB)")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


@dataclass
class DaemonConfig:
    enabled: bool = True
    binary: str = ""
    mountpoint: Path = Path()
    control_socket: Path = Path()
    cache_dir: Path = Path()
    cache_size: int = 10 * 1024**3
    prefetch: bool = True
    background_fetch: bool = False
    background_rate: int | None = None
    metrics: str = ""
    verbose: bool = False
    allow_suid_dev: bool = False
    read_timeout: float | None = None  # None: the daemon's default
    request_timeout: float | None = None
    serve: str = "kernel"
    loop_direct_io: bool = True

    def fuse_dir(self, root: Path) -> Path:
        """Where the daemon's FUSE mount goes: the layer directories themselves, or in kernel
        mode the chunk-device files (the layers are EROFS mounts under ``mountpoint``)."""
        return root / "chunk-devices" if self.serve == "kernel" else self.mountpoint
    policies: list[str] = field(default_factory=list)


@dataclass
class TracesConfig:
    record: bool = True
    share: str = "pull"  # pushing publishes what an image's start reads: only when asked for
    quiet: float = 5.0
    max_seconds: float = 120.0
    max_bytes: int = 1 << 20  # the merged trace of an image kept by the daemon
    username: str = ""
    password: str = ""


SERVE_MODES = ("fuse", "kernel")


@dataclass
class RegistryConfig:
    mirrors: dict[str, list[str]] = field(default_factory=dict)
    insecure_hosts: list[str] = field(default_factory=list)
    hosts_dir: Path | None = DEFAULT_HOSTS_DIR
    auth_file: Path | None = None


@dataclass
class Config:
    root: Path = DEFAULT_ROOT
    socket: Path = DEFAULT_SOCKET
    log_level: str = "info"
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    traces: TracesConfig = field(default_factory=TracesConfig)


def _take(table: dict, key: str, kind: type, default):
    if key not in table:
        return default
    value = table.pop(key)
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {getattr(kind, '__name__', 'a size')}, got {value!r}")
    return value


def _seconds(value, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not 0 < value < float("inf"):
        raise ConfigError(f"daemon.{key}: expected a positive number of seconds, got {value!r}")
    return float(value)


def load(path: Path | None, root: Path | None = None) -> Config:
    """Read ``path`` (None: all defaults), override the root if given, and fill in the paths
    derived from the root."""
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from e
    cfg = Config()
    cfg.root = Path(_take(raw, "root", str, str(cfg.root)))
    if root is not None:
        cfg.root = Path(root)
    cfg.socket = Path(_take(raw, "socket", str, str(cfg.socket)))
    cfg.log_level = _take(raw, "log_level", str, cfg.log_level)
    daemon = _take(raw, "daemon", dict, {})
    d = cfg.daemon
    d.enabled = _take(daemon, "enabled", bool, d.enabled)
    d.binary = _take(daemon, "binary", str, d.binary)
    d.mountpoint = Path(_take(daemon, "mountpoint", str, "") or cfg.root / "mnt")
    d.control_socket = Path(_take(daemon, "control_socket", str, "") or cfg.root / "daemon.sock")
    d.cache_dir = Path(_take(daemon, "cache_dir", str, "") or cfg.root / "cache")
    d.cache_size = parse_size(_take(daemon, "cache_size", (int, str), d.cache_size))
    d.prefetch = _take(daemon, "prefetch", bool, d.prefetch)
    d.serve = _take(daemon, "serve", str, d.serve)
    if d.serve not in SERVE_MODES:
        raise ConfigError(f"daemon.serve: expected one of {', '.join(SERVE_MODES)}, got {d.serve!r}")
    d.policies = _take(daemon, "policies", list, [])
    if not all(isinstance(name, str) and name.strip() and "," not in name for name in d.policies):
        raise ConfigError("daemon.policies must be a list of policy names, e.g. [\"trace\", \"locality\"]")
    d.background_fetch = _take(daemon, "background_fetch", bool, d.background_fetch)
    rate = _take(daemon, "background_rate", (int, str), "")
    d.background_rate = parse_size(rate) if rate != "" else None
    d.metrics = _take(daemon, "metrics", str, d.metrics)
    d.verbose = _take(daemon, "verbose", bool, d.verbose)
    traces = _take(raw, "traces", dict, {})
    t = cfg.traces
    t.record = _take(traces, "record", bool, t.record)
    t.share = _take(traces, "share", str, t.share)
    if t.share not in ("off", "pull", "push"):
        raise ConfigError(f"traces.share: expected \"off\", \"pull\" or \"push\", got {t.share!r}")
    t.quiet = float(_take(traces, "quiet", (int, float), t.quiet))
    t.max_seconds = float(_take(traces, "max_seconds", (int, float), t.max_seconds))
    max_bytes = _take(traces, "max_bytes", (int, str), "")
    t.max_bytes = parse_size(max_bytes) if max_bytes != "" else t.max_bytes
    t.username = _take(traces, "username", str, t.username)
    t.password = _take(traces, "password", str, t.password)
    if bool(t.username) != bool(t.password):
        raise ConfigError("traces.username and traces.password go together")
    d.allow_suid_dev = _take(daemon, "allow_suid_dev", bool, d.allow_suid_dev)
    d.read_timeout = _seconds(_take(daemon, "read_timeout", (int, float), d.read_timeout), "read_timeout")
    d.request_timeout = _seconds(_take(daemon, "request_timeout", (int, float), d.request_timeout),
                                 "request_timeout")
    d.loop_direct_io = _take(daemon, "loop_direct_io", bool, d.loop_direct_io)
    registry = _take(raw, "registry", dict, {})
    cfg.registry.mirrors = _take(registry, "mirrors", dict, {})
    cfg.registry.insecure_hosts = _take(registry, "insecure_hosts", list, [])
    hosts_dir = _take(registry, "hosts_dir", str, str(DEFAULT_HOSTS_DIR))
    cfg.registry.hosts_dir = Path(hosts_dir) if hosts_dir else None
    auth_file = _take(registry, "auth_file", str, "")
    cfg.registry.auth_file = Path(auth_file) if auth_file else None
    for table, name in ((raw, ""), (daemon, "daemon."), (registry, "registry."), (traces, "traces.")):
        if table:
            raise ConfigError(f"unknown configuration keys: {', '.join(name + k for k in table)}")
    return cfg
