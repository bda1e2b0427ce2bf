"""``lr_sweep`` / ``batch_sweep`` (:data:`SWEEPS`): one run per (grid value, seed, norm)
on the grid ``options["lrs"]`` / ``options["batch_sizes"]``; final accuracy per value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..blocks import (
    Block,
    Figure,
    Table,
    format_accuracy,
    new_figure,
    norm_colour,
    norm_label,
    save_figure,
)
from ..spec import TrainSpec
from .base import (
    Experiment,
    Kind,
    ScheduledRun,
    SummaryInputs,
    final_accuracy,
    mean_std,
)

__all__ = ["SWEEPS", "Sweep"]


@dataclass(frozen=True)
class Sweep:
    """A grid over one :class:`TrainSpec` field: ``field`` takes each value of
    ``options[option]``; ``label`` and ``log_base`` describe the plot's x axis."""

    field: str
    option: str
    label: str
    log_base: float
    cast: Callable[[Any], Any]


SWEEPS: dict[str, Sweep] = {
    "lr_sweep": Sweep("lr", "lrs", "learning rate", 10, float),
    "batch_sweep": Sweep("batch_size", "batch_sizes", "batch size", 2, int),
}


def schedule_sweep(
    exp: Experiment, spec: TrainSpec, norms: Sequence[str], seeds: Sequence[int]
) -> list[ScheduledRun]:
    """One run per (grid value, seed, norm); the runs of the norms in
    ``options["recalibrated"]`` also measure their accuracy after bnorm.recalibrate."""
    sweep = SWEEPS[exp.kind]
    recalibrated = exp.options.get("recalibrated", [])
    return [
        ScheduledRun(
            f"{norm}-{sweep.field}{v:g}-seed{seed}",
            norm,
            seed,
            replace(
                spec,
                **{sweep.field: sweep.cast(v)},
                recalibrate_check=spec.recalibrate_check or norm in recalibrated,
            ),
        )
        for v in exp.options.get(sweep.option, [])
        for seed in seeds
        for norm in norms
    ]


def measured_columns(
    runs: list[dict[str, Any]], norms: Sequence[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs and the norms, plus a column ``"<norm>+recalibrated"`` for each norm whose
    runs measured their test accuracy after :func:`bnorm.recalibrate`
    (``recalibrate_check``): the same networks, their final accuracy that one."""
    extra: list[dict[str, Any]] = []
    columns = list(norms)
    for norm in norms:
        measured = [
            r for r in runs if r["norm"] == norm and r.get("recalibrated_accuracy") is not None
        ]
        if not measured:
            continue
        columns.append(f"{norm}+recalibrated")
        for r in measured:
            curve = {**r["curve"], "test_accuracy": [r["recalibrated_accuracy"]]}
            extra.append({**r, "norm": f"{norm}+recalibrated", "curve": curve})
    return runs + extra, columns


def summarize_sweep(
    exp: Experiment, runs: list[dict[str, Any]], norms: Sequence[str], given: SummaryInputs
) -> dict[str, Any]:
    """Per grid value and column (the norms, and each norm's recalibrated networks where
    measured: :func:`measured_columns`), the final accuracy's mean ± std over seeds; per
    column, the mean over the grid per seed, then over seeds."""
    sweep = SWEEPS[exp.kind]
    values = [sweep.cast(v) for v in exp.options.get(sweep.option, [])]
    runs, norms = measured_columns(runs, norms)
    table = []
    for v in values:
        row: dict[str, Any] = {sweep.field: v}
        for norm in norms:
            mine = [r for r in runs if r["norm"] == norm and r.get(sweep.field) == v]
            row[norm] = {
                **mean_std([final_accuracy(r) for r in mine]),
                "diverged": sum(r["diverged_at"] is not None for r in mine),
            }
        table.append(row)
    means = [row[n]["mean"] for row in table for n in norms if row[n]["mean"] is not None]
    best = max(means, default=0.0)
    per_norm = {}
    for norm in norms:
        seeds = sorted({r["seed"] for r in runs if r["norm"] == norm})
        # Per seed: the mean final accuracy over the grid values that seed finished.
        per_seed = []
        for seed in seeds:
            accs = [final_accuracy(r) for r in runs if r["norm"] == norm and r["seed"] == seed]
            finite = [a for a in accs if a is not None]
            per_seed.append(sum(finite) / len(finite) if finite else None)
        trains = [
            row[sweep.field]
            for row in table
            if row[norm]["mean"] is not None and row[norm]["mean"] >= 0.9 * best
        ]
        per_norm[norm] = {"mean_over_values": mean_std(per_seed), "values_that_train": trains}
    if sweep.field == "batch_size" and table:
        # Where small batches hurt: the accuracy of each norm at the smallest batch.
        smallest = table[int(min(range(len(values)), key=lambda i: values[i]))]
        note = f"final accuracy at batch size {smallest['batch_size']:g}: " + ", ".join(
            f"{norm_label(norm)} {100 * smallest[norm]['mean']:.1f}%"
            for norm in norms
            if smallest[norm]["mean"] is not None
        )
    else:
        note = "trains (final accuracy ≥ 90% of the best) at " + ", ".join(
            f"{len(per_norm[norm]['values_that_train'])} of {len(values)} {sweep.label}s "
            f"with {norm_label(norm)}"
            for norm in norms
        )
    headline = {
        "measure": f"final accuracy, mean over {len(values)} {sweep.label}s "
        f"({min(values, default=0):g}–{max(values, default=0):g})",
        "short": f"mean final acc, {len(values)} {sweep.option.replace('_', ' ')}",
        "values": {n: per_norm[n]["mean_over_values"] for n in norms},
        "speedup": {},
        "note": note,
    }
    return {
        "field": sweep.field,
        "label": sweep.label,
        "log_base": sweep.log_base,
        "columns": norms,
        "values": values,
        "table": table,
        "per_norm": per_norm,
        "best_mean_accuracy": best,
        "headline": headline,
    }


def plot_sweep(summary: dict[str, Any], norms: Sequence[str], path: Path) -> Path | None:
    table = summary.get("table", [])
    if not table:
        return None
    field, label = summary["field"], summary["label"]
    fig, (ax,) = new_figure(7, 3.8)
    for norm in norms:
        pts = [(row[field], row[norm]) for row in table if row[norm]["mean"] is not None]
        if not pts:
            continue
        colour = norm_colour(norm, norms)
        ax.errorbar(
            [p[0] for p in pts],
            [100 * p[1]["mean"] for p in pts],
            yerr=[100 * p[1]["std"] for p in pts],
            color=colour,
            marker="o",
            capsize=3,
            lw=2,
            label=norm_label(norm),
        )
        bad = [(lr, st) for lr, st in pts if st["diverged"]]
        if bad:
            ax.scatter(
                [lr for lr, _ in bad],
                [100 * st["mean"] for _, st in bad],
                s=110,
                marker="x",
                color="#c0392b",
                zorder=5,
                label=f"{norm_label(norm)}: some seeds diverged (loss not finite)",
            )
    ax.set_xscale("log", base=summary["log_base"])
    ax.set_xticks(summary["values"], [f"{v:g}" for v in summary["values"]])
    ax.set_xlabel(label)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"Final test accuracy per {label} (mean ± std over seeds)")
    ax.legend(loc="best")
    return save_figure(fig, path)


def sweep_section(name: str, exp: dict[str, Any], norms: list[str], out: Path) -> list[Block]:
    summ = exp["summary"]
    norms = summ.get("columns", norms)
    headers = [summ["label"], *(norm_label(n) for n in norms)]
    rows = []
    for row in summ["table"]:
        cells = [f"{row[summ['field']]:g}"]
        for n in norms:
            text = format_accuracy(row[n])
            if row[n]["diverged"]:
                text += f" ({row[n]['diverged']} diverged)"
            cells.append(text)
        rows.append(cells)
    blocks: list[Block] = [Table(headers, rows)]
    fig = plot_sweep(summ, norms, out / f"{name}.png")
    if fig is not None:
        blocks.append(
            Figure(fig, f"Final test accuracy per {summ['label']} (mean ± std over seeds).")
        )
    return blocks


SWEEP = Kind(schedule_sweep, summarize_sweep, sweep_section)
