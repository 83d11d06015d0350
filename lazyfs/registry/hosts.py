"""Where to send a registry's requests: containerd's hosts.toml convention (a certs.d directory).

For a registry `host[:port]`, the first of these files that exists configures it:

    DIR/host_port_/hosts.toml      (only for a registry with a port)
    DIR/host:port/hosts.toml
    DIR/_default/hosts.toml

    server = "https://registry.example"          # default: the registry itself
    [host."http://mirror.rack1:5000"]            # tried first, in file order
      capabilities = ["pull", "resolve"]         # default: pull, resolve, push
      skip_verify = false
      ca = "mirror.crt"                          # path or list; relative to the hosts.toml
      dial_timeout = "1s"                        # connect timeout (Go duration: 500ms, 2s, 1m)
      [host."http://mirror.rack1:5000".header]
        x-custom = "value"                       # string or list of strings

The `[host]` entries are tried in order, then the `server`. A request goes to the hosts with
the capability it needs: `resolve` (and `pull`) for a manifest by tag, `pull` for a manifest
by digest and for blobs, `push` for uploads. A host URL's path is the API root's prefix
(`https://m.example/team` serves `/team/v2/...`) unless `override_path = true` makes it the
API root itself. Requests to a host other than the registry carry `?ns=<registry>` so one
mirror can serve several registries. What a mirror answers is trusted no more than the
registry: manifests by digest, blobs and chunks are verified against their digests.
"""

from __future__ import annotations

import re
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import RegistryError

DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})


class HostsConfigError(RegistryError):
    """A hosts.toml that cannot be read or has a bad value."""


@dataclass(frozen=True)
class RegistryHost:
    """One place a registry's requests may go: a mirror or the registry's own server."""

    api_root: str  # scheme://netloc/path-of-/v2, e.g. "http://mirror:5000/v2"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool = False
    ca: tuple[Path, ...] = ()
    client_certs: tuple[tuple[Path, Path | None], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    dial_timeout: float | None = None  # seconds to connect; None: the client's own
    namespace: str | None = None  # the registry it stands in for (sent as ?ns=), None for the registry itself

    @property
    def netloc(self) -> str:
        return urlsplit(self.api_root).netloc

    @property
    def is_mirror(self) -> bool:
        return self.namespace is not None

    @property
    def needs_own_tls(self) -> bool:
        """Whether requests need a TLS configuration other than the default one."""
        return self.api_root.startswith("https:") and bool(self.skip_verify or self.ca or self.client_certs)

    @property
    def needs_own_client(self) -> bool:
        """Whether requests need an HTTP client of their own (TLS settings, connect timeout)."""
        return self.needs_own_tls or self.dial_timeout is not None

    def url(self, repository: str, path: str) -> str:
        """The URL of `path` (e.g. "/blobs/sha256:...") in `repository` on this host."""
        query = f"?ns={self.namespace}" if self.namespace else ""
        return f"{self.api_root}/{repository}{path}{query}"

    def ssl_context(self) -> ssl.SSLContext | bool:
        """The `verify` argument of an httpx client for this host."""
        if not self.needs_own_tls:
            return True
        context = ssl.create_default_context()
        try:
            for ca in self.ca:
                context.load_verify_locations(cafile=str(ca))
            for cert, key in self.client_certs:
                context.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as e:
            raise HostsConfigError(f"TLS files of {self.netloc}: {e}") from None
        if self.skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def hosts_file(hosts_dir: Path, registry: str) -> Path | None:
    """The hosts.toml that configures `registry` (host[:port]), or None."""
    names = []
    host, sep, port = registry.rpartition(":")
    if sep and port.isdigit() and not registry.endswith("]"):
        names.append(f"{host}_{port}_")
    names += [registry, "_default"]
    for name in names:
        candidate = hosts_dir / name / "hosts.toml"
        if candidate.is_file():
            return candidate
    return None


def registry_hosts(registry: str, endpoint: str, *, hosts_dir: Path | None, insecure: bool) -> list[RegistryHost]:
    """The hosts to try for `registry`, in order: the mirrors of its hosts.toml, then its server.

    `endpoint` is where the registry itself is reached (docker.io: registry-1.docker.io);
    `insecure` whether that is over plain HTTP. Without a hosts.toml: just the registry.
    """
    origin = RegistryHost(f"{'http' if insecure else 'https'}://{endpoint}/v2")
    path = hosts_file(hosts_dir, registry) if hosts_dir is not None else None
    if path is None:
        return [origin]
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise HostsConfigError(f"{path}: {e}") from None
    default_scheme = "http" if insecure else "https"
    hosts = []
    for url, table in _table(config, "host", path).items():
        if not isinstance(table, dict):
            raise HostsConfigError(f"{path}: host {url!r} must be a table")
        host = _host(url, table, path, default_scheme, registry)
        if host.netloc in (registry, endpoint):  # the registry itself, listed as a host: no ?ns=
            host = _host(url, table, path, default_scheme, None)
        hosts.append(host)
    server = config.get("server")
    if server is None:
        top = _host(f"{default_scheme}://{endpoint}", config, path, default_scheme, None)
    else:
        if not isinstance(server, str):
            raise HostsConfigError(f"{path}: server must be a string")
        own = urlsplit(server if "://" in server else f"//{server}").netloc in (registry, endpoint)
        top = _host(server, config, path, default_scheme, None if own else registry)
    return [*hosts, top]


def _table(config: dict, key: str, path: Path) -> dict:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise HostsConfigError(f"{path}: {key} must be a table")
    return value


def _host(url: str, table: dict, path: Path, default_scheme: str, namespace: str | None) -> RegistryHost:
    where = f"{path}: host {url!r}"
    if "://" not in url:
        url = f"{default_scheme}://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HostsConfigError(f"{where}: not an http(s) URL")
    override_path = _typed(table, "override_path", bool, False, where)
    prefix = parts.path.rstrip("/")
    if not override_path and not prefix.endswith("/v2"):
        prefix += "/v2"
    capabilities = _typed(table, "capabilities", list, sorted(ALL_CAPABILITIES), where)
    unknown = set(capabilities) - ALL_CAPABILITIES
    if unknown:
        raise HostsConfigError(f"{where}: unknown capabilities {sorted(unknown)}")
    headers = []
    for name, value in _typed(table, "header", dict, {}, where).items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            raise HostsConfigError(f"{where}: header {name} must be a string or a list of strings")
        headers += [(name, v) for v in values]
    return RegistryHost(
        api_root=f"{parts.scheme}://{parts.netloc}{prefix}",
        capabilities=frozenset(capabilities),
        skip_verify=_typed(table, "skip_verify", bool, False, where),
        ca=tuple(_relative(path, p) for p in _paths(table.get("ca"), where)),
        client_certs=_client_certs(table.get("client"), path, where),
        headers=tuple(headers),
        dial_timeout=_duration(table.get("dial_timeout"), where),
        namespace=namespace,
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value, where: str) -> float | None:
    """Seconds from a Go duration string ("500ms", "1s", "1m30s"); None if absent."""
    if value is None:
        return None
    parts = _DURATION.findall(value) if isinstance(value, str) else []
    if not parts or "".join(n + u for n, u in parts) != value:
        raise HostsConfigError(f"{where}: dial_timeout must be a duration such as \"500ms\" or \"2s\"")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def _typed(table: dict, key: str, kind: type, default, where: str):
    value = table.get(key, default)
    if not isinstance(value, kind):
        raise HostsConfigError(f"{where}: {key} must be a {kind.__name__}")
    return value


def _paths(value, where: str) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        raise HostsConfigError(f"{where}: expected a path or a list of paths")
    return values


def _relative(hosts_toml: Path, value: str) -> Path:
    """Paths in a hosts.toml are absolute or relative to the file."""
    return Path(value) if Path(value).is_absolute() else hosts_toml.parent / value


def _client_certs(value, path: Path, where: str) -> tuple[tuple[Path, Path | None], ...]:
    if value is None:
        return ()
    pairs = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            pairs.append((_relative(path, item), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            pairs.append((_relative(path, item[0]), _relative(path, item[1]) if item[1] else None))
        else:
            raise HostsConfigError(f"{where}: client must be a path, a list of paths or of [cert, key] pairs")
    return tuple(pairs)


@dataclass
class HostHealth:
    """Hosts that failed to connect are passed over for a while (while others remain): a dead
    mirror then costs one failed connection per `penalty` seconds, not one per request."""

    penalty: float = 30.0
    down_until: dict[str, float] = field(default_factory=dict)

    def usable(self, host: RegistryHost, now: float) -> bool:
        return self.down_until.get(host.api_root, 0.0) <= now

    def failed(self, host: RegistryHost, now: float) -> None:
        self.down_until[host.api_root] = now + self.penalty

    def succeeded(self, host: RegistryHost) -> None:
        self.down_until.pop(host.api_root, None)
