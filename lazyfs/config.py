"""Host-wide defaults for the `lazyfs` commands, from a small TOML file.

    # /etc/lazyfs/lazyfs.toml (or the file named by $LAZYFS_CONFIG)
    [cache]
    dir = "/var/cache/lazyfs"
    size = "20G"          # bytes, or with a K/M/G/T suffix
    [daemon]
    serve = "kernel"      # or "fuse": the daemon serves every file operation (docs/design.md)

    [registry]            # for every command that talks to a registry, and the daemon
    insecure = ["127.0.0.1:5000"]          # plain HTTP (loopback registries always are)
    hosts_dir = "/etc/containerd/certs.d"  # containerd hosts.toml files: mirrors (the default)
    auth_file = "/root/.docker/config.json"  # credentials (default: $DOCKER_CONFIG, ~/.docker)

Command-line options override the file; a missing file means the built-in defaults.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/lazyfs/lazyfs.toml")
DEFAULT_CACHE_DIR = Path("/var/cache/lazyfs")
SERVE_MODES = ("fuse", "kernel")
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")  # containerd's own default (lazyfs.registry.hosts)


class ConfigError(Exception):
    """The configuration file is unreadable or has a bad value."""


def parse_size(text: str | int) -> int:
    """Bytes from ``1048576``, ``500M``, ``20G``, ``1.5GiB``."""
    if isinstance(text, int):
        return text
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (body[:-1], body[-1]) if body and body[-1] in units else (body, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (examples: 500M, 20G)") from None
    if value < 0:
        raise ConfigError(f"a size cannot be negative: {text!r}")
    return value


@dataclass(frozen=True)
class RegistrySettings:
    """How to reach registries: what every command that talks to one, and the daemon, share."""

    insecure: tuple[str, ...] = ()
    hosts_dir: Path | None = DEFAULT_HOSTS_DIR  # None: no hosts.toml lookup
    auth_file: Path | None = None  # None: $DOCKER_CONFIG/config.json or ~/.docker/config.json

    def store_options(self) -> dict:
        """Keyword arguments of lazyfs.registry.open_store."""
        return {"insecure_registries": self.insecure, "hosts_dir": self.hosts_dir, "auth_file": self.auth_file}

    def daemon_arguments(self) -> list[str]:
        """The same settings as arguments of `python -m lazyfs.daemon`."""
        argv = [arg for host in self.insecure for arg in ("--insecure-registry", host)]
        argv += ["--hosts-dir", str(self.hosts_dir) if self.hosts_dir is not None else ""]
        if self.auth_file is not None:
            argv += ["--registry-auth", str(self.auth_file)]
        return argv


@dataclass(frozen=True)
class Config:
    cache_dir: Path = DEFAULT_CACHE_DIR
    cache_size: int | None = None
    serve: str = "kernel"
    registry: RegistrySettings = RegistrySettings()


def load_config(path: Path | None = None) -> Config:
    path = path or Path(os.environ.get("LAZYFS_CONFIG", DEFAULT_CONFIG))
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return Config()
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    cache = data.get("cache", {})
    if not isinstance(cache, dict):
        raise ConfigError(f"{path}: [cache] must be a table")
    size = cache.get("size")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{path}: [daemon] must be a table")
    serve = daemon.get("serve", Config.serve)
    if serve not in SERVE_MODES:
        raise ConfigError(f"{path}: [daemon] serve must be one of {', '.join(SERVE_MODES)}, not {serve!r}")
    return Config(
        cache_dir=Path(cache.get("dir", DEFAULT_CACHE_DIR)),
        cache_size=parse_size(size) if size is not None else None,
        serve=serve,
        registry=_registry_settings(data.get("registry", {}), path),
    )


def _registry_settings(table, path: Path) -> RegistrySettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [registry] must be a table")
    unknown = set(table) - {"insecure", "hosts_dir", "auth_file"}
    if unknown:
        raise ConfigError(f"{path}: unknown [registry] keys: {', '.join(sorted(unknown))}")
    insecure = table.get("insecure", [])
    if not isinstance(insecure, list) or not all(isinstance(h, str) for h in insecure):
        raise ConfigError(f"{path}: [registry] insecure must be a list of host[:port] strings")
    for key in ("hosts_dir", "auth_file"):
        if not isinstance(table.get(key, ""), str):
            raise ConfigError(f"{path}: [registry] {key} must be a path")
    hosts_dir = table.get("hosts_dir", str(DEFAULT_HOSTS_DIR))
    return RegistrySettings(insecure=tuple(insecure), hosts_dir=Path(hosts_dir) if hosts_dir else None,
                            auth_file=Path(table["auth_file"]) if table.get("auth_file") else None)
