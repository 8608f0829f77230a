"""One progress display for long stages (rich), printed to stderr."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)

console = Console(stderr=True)


@contextmanager
def progress(enabled: bool = True):
    """Yields a rich Progress (or a silent stand-in when disabled)."""
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                   disable=not enabled)
    with bar:
        yield bar
