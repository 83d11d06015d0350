"""Fetch policy names, without importing the fetcher (the CLI checks them before it starts a daemon)."""

from __future__ import annotations

from collections.abc import Iterable

BUILTIN_NAMES = ("none", "readahead", "trace", "background", "locality", "extent")
DEFAULT_POLICIES = ("readahead", "trace", "extent")


class PolicyError(Exception):
    """A policy name that names nothing, or a class that cannot be loaded."""


def parse_policy_names(text: str | Iterable[str]) -> list[str]:
    """``"trace,locality"`` or a list of names -> the names (checked: unknown ones raise)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [item.strip() for item in items if item.strip()]
    if not names:
        raise PolicyError("no fetch policy named (use 'none' for none)")
    for name in names:
        if name not in BUILTIN_NAMES and ":" not in name:
            raise PolicyError(f"unknown fetch policy {name!r} (built in: {', '.join(BUILTIN_NAMES)}; "
                              "or package.module:Class)")
    return names
