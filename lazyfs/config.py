"""Host-wide defaults for the `lazyfs` commands, from a small TOML file.

    # /etc/lazyfs/lazyfs.toml (or the file named by $LAZYFS_CONFIG)
    [cache]
    dir = "/var/cache/lazyfs"
    size = "20G"          # bytes, or with a K/M/G/T suffix
    [daemon]
    serve = "fuse"        # or "kernel": the kernel's EROFS serves each layer (docs/design.md)

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
class Config:
    cache_dir: Path = DEFAULT_CACHE_DIR
    cache_size: int | None = None
    serve: str = "fuse"


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
    serve = daemon.get("serve", "fuse")
    if serve not in SERVE_MODES:
        raise ConfigError(f"{path}: [daemon] serve must be one of {', '.join(SERVE_MODES)}, not {serve!r}")
    return Config(
        cache_dir=Path(cache.get("dir", DEFAULT_CACHE_DIR)),
        cache_size=parse_size(size) if size is not None else None,
        serve=serve,
    )
