"""The one place that prints: rich consoles for progress (stderr) and results (stdout)."""

from __future__ import annotations

from rich.console import Console

# Progress and diagnostics go to stderr so stdout stays parseable (tables, plans, JSON).
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
