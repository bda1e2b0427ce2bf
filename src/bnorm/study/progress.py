"""The progress display of ``bnorm study`` while it trains."""

from __future__ import annotations

from typing import Any

__all__ = ["Progress"]


class Progress:
    """Rich progress display (a bar for the whole study and one for each run in
    progress, from any worker), or nothing with ``quiet``."""

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
        self._runs: dict[int, tuple[Any, int]] = {}  # key -> (its bar, steps shown)

    def __enter__(self) -> Progress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start_run(self, key: int, description: str, total: int) -> None:
        """Show a bar for run ``key`` (several runs may be in progress at once)."""
        if self.progress is None:
            return
        self._runs[key] = (self.progress.add_task(description, total=total, status=""), 0)

    def step(self, key: int, step: int, total: int, accuracy: float | None) -> None:
        if self.progress is None or key not in self._runs or (step % 10 and step != total):
            return
        task, last = self._runs[key]
        status = f"test acc {100 * accuracy:.1f}%" if accuracy is not None else ""
        self.progress.update(task, completed=step, status=status)
        self.progress.advance(self.overall, step - last)
        self._runs[key] = (task, step)

    def finish_run(self, key: int, total: int) -> None:
        """Count the rest of run ``key``'s steps (all of them if its steps were not
        shown) and remove its bar."""
        if self.progress is None:
            return
        task, last = self._runs.pop(key, (None, 0))
        self.progress.advance(self.overall, total - last)
        if task is not None:
            self.progress.remove_task(task)
