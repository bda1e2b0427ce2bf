"""The one-screen summary that ``bnorm study`` prints when it is done."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import summary_rows

__all__ = ["print_summary"]


def print_summary(metrics: dict[str, Any], out: Path, paths: list[Path]) -> None:
    """The one-screen summary: the summary table and where the report is."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or logged (e.g. `make study | tee`): room for the table
        console = Console(width=160)
    headers, rows = summary_rows(metrics, compact=True)
    table = Table(
        title="bnorm study: accuracy is mean ± std over seeds; speed-up as in the BN paper"
    )
    for h in headers:
        table.add_column(h, no_wrap=h in ("Experiment",))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for row in metrics["summary"]:
        if row.get("note"):
            console.print(f"  [dim]{row['experiment']}:[/] {row['note']}", highlight=False)
    if metrics["interrupted"]:
        console.print(
            f"[bold yellow]Interrupted[/]: {metrics['runs_finished']} of "
            f"{metrics['runs_planned']} runs "
            f"finished; the report covers them. Continue with: bnorm study --resume {out}"
        )
    console.print(
        f"Wall time {metrics['wall_s']:.1f} s · CPU time {metrics.get('cpu_s', 0.0):.1f} s · "
        f"{metrics['runs_finished']} runs · "
        f"{len(paths) - 2} figures",
        highlight=False,
    )
    console.print(
        f"Report: [bold]{out / 'report.html'}[/]  (also report.md, metrics.json, config.json)"
    )
