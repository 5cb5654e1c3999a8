"""Rich output on stderr, so stdout stays free for paths and JSON that pipelines read."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

err = Console(stderr=True)
quiet = False


def log(message: str) -> None:
    if not quiet:
        err.print(escape(message), highlight=False, soft_wrap=True)  # messages hold paths and [extras], not markup


def warn(message: str) -> None:
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
