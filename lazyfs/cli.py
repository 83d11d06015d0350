"""The `lazyfs` command line: a thin dispatcher over lazyfs.commands.*.

Each command lives in the module of the same name. Only the command being run is imported,
because start-up time is part of every cold start lazyfs measures (`lazyfs mount` with a
cold page cache spent most of a second importing the other commands).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from lazyfs import __version__, commands


def _command_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or with just `only` (whose module is the only one imported)."""
    parser = argparse.ArgumentParser(
        prog="lazyfs", description="Lazy-loading container image filesystem."
    )
    parser.add_argument("--version", action="version", version=f"lazyfs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in [only] if only else _command_names():
        module = importlib.import_module(f"lazyfs.commands.{name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _requested_command(argv: list[str]) -> str | None:
    names = set(_command_names())
    for arg in argv:
        if arg in ("-h", "--help", "--version"):
            return None
        if not arg.startswith("-"):
            return arg if arg in names else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_requested_command(argv)).parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
