"""Rich output on stderr, so stdout stays free for paths and JSON that pipelines read."""

from __future__ import annotations

import os

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

class _Console(Console):
    """As wide as the terminal; piped or redirected, as wide as each line needs (rich would wrap
    at 80 columns and cut module names and paths mid-word). $COLUMNS still sets a width."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(UNWRAPPED, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


UNWRAPPED = 1000  # wide enough for any table row this tool prints, without padding lines out to it

err = _Console(stderr=True)
quiet = False


def log(message: str) -> None:
    if not quiet:
        err.print(escape(message), highlight=False, soft_wrap=True)  # messages hold paths and [extras], not markup


def warn(message: str) -> None:
    """A warning; --quiet leaves only errors on stderr."""
    if quiet:
        return
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def progress(*extra_columns) -> Progress:
    """A progress bar on stderr; `extra_columns` adds live fields such as tokens/s."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
        transient=False,
    )


def stdout() -> Console:
    """A console on stdout (tables that are a command's result: `inspect`, `cache ls`)."""
    return _Console()
