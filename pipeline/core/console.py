"""The one place that prints: rich consoles for progress (stderr) and results (stdout)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

# Progress and diagnostics go to stderr so stdout stays parseable (tables, plans, JSON).
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def progress() -> Progress:
    """A transient progress display on stderr, shown only on a terminal: in logs and pipes a
    stage's summary line says it all. rich.progress is imported here, on first use, so quick
    commands (a no-op sync) do not pay for it."""
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
