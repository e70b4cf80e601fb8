"""One rich progress bar for long work, written to stderr so stdout stays clean for results."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def progress_bar(description: str, total: int, unit: str = "rows"):
    """Yield `advance(n)`; the bar shows done/total, rate and time left."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
