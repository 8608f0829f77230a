"""One progress display for long stages (rich), printed to stderr, and the console for tables."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)

console = Console(stderr=True)


def table_console(stderr: bool = False) -> Console:
    """A console for result tables. Piped or redirected output has no width, and rich would cut
    wide tables to 80 columns (numbers ending in an ellipsis): give it 160 there."""
    con = Console(stderr=stderr)
    return con if con.is_terminal else Console(stderr=stderr, width=max(con.width, 160))


@contextmanager
def progress(enabled: bool = True):
    """Yields a rich Progress (or a silent stand-in when disabled)."""
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                   disable=not enabled)
    with bar:
        yield bar
