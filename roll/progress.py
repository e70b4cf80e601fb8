"""Rich progress bars for long work, on stderr so stdout stays clean for results.

Bars nest: a bar opened while another is showing joins the same display as an extra line (rich allows
one live display at a time), so `roll iterate` shows its loop and the current stage together.
"""
from __future__ import annotations

from contextlib import contextmanager

_active = None  # the Progress currently on screen, if any


@contextmanager
def progress_bar(description: str, total: int, unit: str = "rows"):
    """Yield `advance(n)`; the bar shows done/total, rate and time left."""
    global _active
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    if _active is not None:
        task = _active.add_task(description, total=total, unit=unit)
        try:
            yield lambda n=1: _active.advance(task, n)
        finally:
            _active.remove_task(task)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        _active = progress
        try:
            task = progress.add_task(description, total=total, unit=unit)
            yield lambda n=1: progress.advance(task, n)
        finally:
            _active = None
