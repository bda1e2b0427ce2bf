"""The progress display of ``bnorm study`` while it trains."""

from __future__ import annotations

from typing import Any

__all__ = ["Progress"]


class Progress:
    """Rich progress display (a bar for the whole study and one for the current run),
    or nothing with ``quiet``."""

    def __init__(self, total_steps: int, quiet: bool) -> None:
        self.quiet = quiet
        self.progress: Any = None
        if quiet:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self.progress = RichProgress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.overall = self.progress.add_task("study", total=total_steps, status="")
        self.current = self.progress.add_task("", total=1, status="", visible=False)
        self._last = 0

    def __enter__(self) -> Progress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start_run(self, description: str, total: int) -> None:
        if self.progress is None:
            return
        self._last = 0
        self.progress.reset(
            self.current, total=total, description=description, status="", visible=True
        )

    def step(self, step: int, total: int, accuracy: float | None) -> None:
        if self.progress is None or (step % 10 and step != total):
            return
        status = f"test acc {100 * accuracy:.1f}%" if accuracy is not None else ""
        self.progress.update(self.current, completed=step, status=status)
        self.progress.advance(self.overall, step - self._last)
        self._last = step

    def finish_run(self, total: int) -> None:
        if self.progress is None:
            return
        self.progress.advance(self.overall, total - self._last)
        self._last = total
