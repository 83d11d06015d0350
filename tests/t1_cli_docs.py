"""Every `lazyfs ...` command line shown in README.md and docs/design.md parses with the real
CLI parser (lazyfs.cli.build_parser), and every `lazyfs-snapshotter ...` one with the
snapshotter's: the docs and the command line cannot drift apart.

Command lines are the lines of fenced code blocks that start with `lazyfs ` (a `$ ` prompt and
`sudo ` allowed; `;` separates commands; `#` starts a comment; a trailing `\\` continues the
line) and the inline code spans of the prose that start with `lazyfs `. Synopses use a small
notation, expanded before parsing: `[...]` is optional (each line is parsed once without and
once with every optional part), `a|b` and `{a,b}` are alternatives (each is parsed), `...`
means "and so on" and is dropped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lazyfs.cli import _command_names, build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "design.md"]
# Inline spans that quote output rather than show a command.
NOT_COMMANDS = {"lazyfs daemon lost (pid N)", "lazyfs daemon N was replaced by daemon M (upgrade)",
                "lazyfs daemon lost (pid N, killed by SIGKILL)", "lazyfs daemon started (pid N)"}  # log lines


def _fenced_and_prose(text: str) -> tuple[list[str], str]:
    """The lines inside fenced code blocks, and the rest of the text."""
    fenced, prose, inside = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        (fenced if inside else prose).append(line)
    return fenced, "\n".join(prose)


def _block_commands(lines: list[str]) -> list[str]:
    commands, pending = [], ""
    for line in lines:
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        line = re.sub(r"^(\$ )?(sudo )?(\.venv/bin/)?", "", line)
        if line.startswith("lazyfs-snapshotter "):
            commands.append(_uncommented(line))
        elif line.startswith("lazyfs ") and not line.split()[1].endswith(":"):  # not output ("lazyfs bench: ...")
            commands += [part.strip() for part in _uncommented(line).split(";")]
    return [c for c in commands if c.startswith(("lazyfs ", "lazyfs-snapshotter "))]


def _uncommented(line: str) -> str:
    """The line without its `#` comment (a # inside quotes stays)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def _inline_commands(prose: str) -> list[str]:
    # `lazyfs convert: ...` is a quoted error message, not a command line.
    spans = re.findall(r"`(lazyfs(?:-snapshotter)? (?![\w-]+:)[^`]+)`", prose)
    return [" ".join(span.split()) for span in spans]


def documented_commands() -> list[tuple[str, str, bool]]:
    """(file, command line, whether it is a whole command line rather than a mention in prose)."""
    found = []
    for path in DOCS:
        fenced, prose = _fenced_and_prose(path.read_text())
        found += [(path.name, command, True) for command in _block_commands(fenced)]
        found += [(path.name, command, False) for command in _inline_commands(prose) if command not in NOT_COMMANDS]
    return found


def _tokens(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def _expand(tokens: list[str]) -> list[list[str]]:
    """The concrete argument lists a synopsis stands for (see the module docstring)."""
    if "--" in tokens:  # the workload after -- is not ours to parse
        cut = tokens.index("--")
        return [head + tokens[cut:] for head in _expand(tokens[:cut])]
    variants: list[list[str]] = []
    for with_optional in (False, True):
        for pick in range(4):
            variants.append(_concrete(tokens, with_optional, pick))
    unique = []
    for variant in variants:
        if variant not in unique:
            unique.append(variant)
    return unique


def _concrete(tokens: list[str], with_optional: bool, pick: int) -> list[str]:
    out: list[str] = []
    depth = 0
    for token in tokens:
        opened = len(token) - len(token.lstrip("["))
        core = token.lstrip("[").removesuffix("...")
        closed = 0
        while core.endswith("]") and core.count("[") < core.count("]"):
            core, closed = core[:-1], closed + 1
        core = core.removesuffix("...")
        core = re.sub(r"\[([^\[\]]*)\]", r"\1" if with_optional else "", core)  # HOST[:PORT]
        depth += opened
        keep = depth == 0 or with_optional
        depth -= closed
        if not keep or not core:
            continue
        if core.startswith("{") and core.endswith("}"):
            choices = core[1:-1].split(",")
            core = choices[min(pick, len(choices) - 1)]
        elif "|" in core:
            choices = core.split("|")
            core = choices[min(pick, len(choices) - 1)]
        out.append(core)
    return out


COMMANDS = documented_commands()


# A mention in prose (`lazyfs convert --trace`) names a command and its options; it need not
# carry the arguments a whole command line must have.
MENTION_MAY_LACK = ("the following arguments are required", "expected one argument")


def test_the_docs_show_commands_of_every_kind():
    shown = {command.split()[1] for _, command, _ in COMMANDS}
    assert {"mount", "convert", "trace", "inspect", "daemon", "umount", "cache", "stats", "bench"} <= shown
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("where,command,whole", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c, _ in COMMANDS])
def test_documented_command_parses(where, command, whole, capsys):
    tokens = _tokens(command)
    if tokens[0] == "lazyfs-snapshotter":
        return _check_snapshotter_command(where, command, tokens, capsys)
    assert tokens[0] == "lazyfs"
    assert tokens[1] in _command_names() or tokens[1].startswith("-"), f"{where}: no command {tokens[1]!r}"
    for argv in _expand(tokens[1:]):
        error = _parse_error(_with_sample_values(argv, capsys), capsys)
        if error is None or (not whole and any(reason in error for reason in MENTION_MAY_LACK)):
            continue
        pytest.fail(f"{where}: `{command}` does not parse as {argv}:\n{error}")


def _check_snapshotter_command(where: str, command: str, tokens: list[str], capsys) -> None:
    from snapshotter.main import parse_args, parse_stop_args, parse_upgrade_args

    subcommands = {"stop": parse_stop_args, "upgrade": parse_upgrade_args}
    for argv in _expand(tokens[1:]):
        parse = subcommands.get(argv[0] if argv else "", parse_args)
        try:
            parse(argv[1:] if parse is not parse_args else argv)
        except SystemExit as e:
            if e.code != 0:
                pytest.fail(f"{where}: `{command}` does not parse as {argv}:\n{capsys.readouterr().err}")


def _parse_error(argv: list[str], capsys) -> str | None:
    """What argparse says about argv, or None if it parses (or is --help/--version)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        error = capsys.readouterr().err
        return None if e.code == 0 else error
    return None


# A placeholder value (`--chunk-size N`, `--timeout S`) is replaced by the first sample its
# option's type accepts; an option that accepts none of them still fails.
SAMPLE_VALUES = ("1M", "1", "linux/amd64", "127.0.0.1:9100")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(/[A-Za-z]+)?")


def _with_sample_values(argv: list[str], capsys) -> list[str]:
    argv = list(argv)
    for i in range(1, len(argv)):
        option = argv[i - 1]
        if not (option.startswith("-") and PLACEHOLDER.fullmatch(argv[i])):
            continue
        for value in (argv[i], *SAMPLE_VALUES):
            error = _parse_error([*argv[:i], value, *argv[i + 1:]], capsys)
            if error is None or f"argument {option}" not in error and f"/{option}" not in error:
                argv[i] = value
                break
    return argv
