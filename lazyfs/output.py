"""Where the commands print their tables (rich).

On a terminal, rich fits a table to the terminal's width; piped, it would fit it to 80
columns and cut digests and paths short. Piped output gets the full values instead: the
table is as wide as its contents.
"""

from __future__ import annotations

import sys

from rich.console import Console

PIPED_WIDTH = 100_000


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPED_WIDTH)
