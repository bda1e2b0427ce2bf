"""``shift`` (no training): the final networks of ``options["source"]`` on corrupted test
sets (:mod:`bnorm.study.shift`, measured at the end of those runs, which the source
experiment does when ``shift`` is selected), as trained and after :func:`bnorm.adapt`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..blocks import (
    Block,
    Figure,
    Para,
    Table,
    format_accuracy,
    new_figure,
    norm_colour,
    norm_label,
    save_figure,
)
from .base import (
    Experiment,
    Kind,
    SummaryInputs,
    mean_std,
    schedule_nothing,
)

__all__ = ["SHIFT", "SHIFT_METHODS", "shift_columns"]


SHIFT_METHODS = {
    "source": "as trained",
    "bn": "adapt bn",
    "bn_online": "adapt bn per batch",
    "prior": "adapt prior",
    "tent": "Tent",
}


def shift_columns(norm: str, methods: Sequence[str]) -> list[tuple[str, str, str]]:
    """(key, norm, method) of the shift table's columns for ``norm``: as trained, then the
    adaptation methods it was measured with."""
    return [(f"{norm}:{m}", norm, m) for m in SHIFT_METHODS if m in methods]


def summarize_shift(
    exp: Experiment, runs: list[dict[str, Any]], norms: Sequence[str], given: SummaryInputs
) -> dict[str, Any]:
    """Per corruption and (norm, method): accuracy mean ± std over seeds; per column, the
    mean over the corrupted sets that adaptation should help (clean and inverted
    excluded; those are reported apart) per seed, then over seeds."""
    source_name = exp.options.get("source", "curves")
    src = [r for r in given.runs.get(source_name, []) if r.get("shift") and r["norm"] in norms]
    corruptions: list[dict[str, Any]] = src[0]["shift"]["corruptions"] if src else []
    columns: list[tuple[str, str, str]] = []
    for norm in norms:
        mine = [r for r in src if r["norm"] == norm]
        methods = {m for r in mine for acc in r["shift"]["accuracy"].values() for m in acc}
        columns += shift_columns(norm, sorted(methods))
    table = []
    for c in corruptions:
        row: dict[str, Any] = {"corruption": c["name"], "label": c["label"], "columns": {}}
        for key, norm, method in columns:
            row["columns"][key] = mean_std(
                [r["shift"]["accuracy"][c["name"]].get(method) for r in src if r["norm"] == norm]
            )
        table.append(row)
    shifted = [
        c["name"]
        for c in corruptions
        if c["name"] != "clean" and c.get("adaptation_should_help", True)
    ]
    means: dict[str, Any] = {}
    for key, norm, method in columns:
        per_seed = []
        for r in src:
            if r["norm"] != norm:
                continue
            values = [r["shift"]["accuracy"][name].get(method) for name in shifted]
            finite = [v for v in values if v is not None]
            per_seed.append(sum(finite) / len(finite) if finite else None)
        means[key] = mean_std(per_seed)
    labels = {key: f"{norm_label(norm)} {SHIFT_METHODS[method]}" for key, norm, method in columns}
    adapted = [key for key, _, method in columns if method != "source"]
    if not src:
        note = f"needs finished runs of '{source_name}'"
    else:
        note = f"mean over the {len(shifted)} corrupted test sets, " + ", ".join(
            f"{labels[key]} {100 * means[key]['mean']:.1f}%"
            for key in adapted
            if means[key]["mean"] is not None
        )
        failing = [c for c in corruptions if not c.get("adaptation_should_help", True)]
        for c in failing:
            row = next(t for t in table if t["corruption"] == c["name"])
            note += f"; {c['label']}: " + ", ".join(
                f"{labels[key]} {100 * row['columns'][key]['mean']:.1f}%"
                for key, _, _ in columns
                if row["columns"][key]["mean"] is not None
            )
    headline = {
        "measure": f"mean test accuracy over {len(shifted)} corrupted test sets "
        f"({', '.join(shifted)}), as trained",
        "short": f"mean acc, {len(shifted)} corruptions",
        "values": {norm: means[f"{norm}:source"] for norm in norms if f"{norm}:source" in means},
        "speedup": {},
        "note": note,
    }
    return {
        "source": source_name,
        "columns": [{"key": k, "norm": n, "method": m, "label": labels[k]} for k, n, m in columns],
        "corruptions": corruptions,
        "table": table,
        "mean_over_corruptions": means,
        "averaged_over": shifted,
        "settings": {
            k: v
            for k, v in (src[0]["shift"].items() if src else [])
            if k not in ("accuracy", "corruptions", "wall_s")
        },
        "wall_s": sum(r["shift"].get("wall_s", 0.0) for r in src),
        "headline": headline,
    }


def plot_shift(summary: dict[str, Any], norms: Sequence[str], path: Path) -> Path | None:
    """Grouped bars: per corruption, the accuracy of each (norm, method) column."""
    columns = summary.get("columns", [])
    table = summary.get("table", [])
    if not columns or not table:
        return None
    method_alpha = {"source": 1.0, "bn": 0.8, "bn_online": 0.65, "prior": 0.5, "tent": 0.35}
    method_hatch = {"source": "", "bn": "//", "bn_online": "\\\\", "prior": "..", "tent": "xx"}
    fig, (ax,) = new_figure(max(7.0, 1.3 * len(table) + 2), 3.8)
    width = 0.84 / len(columns)
    for j, col in enumerate(columns):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(table))]
        stats = [row["columns"][col["key"]] for row in table]
        means = [100 * s["mean"] if s["mean"] is not None else math.nan for s in stats]
        errs = [100 * (s["std"] or 0.0) if s["mean"] is not None else 0.0 for s in stats]
        ax.bar(
            xs, means, width * 0.92, yerr=errs, capsize=2, label=col["label"],
            color=norm_colour(col["norm"], norms), alpha=method_alpha.get(col["method"], 1.0),
            hatch=method_hatch.get(col["method"], ""), edgecolor="white", linewidth=0.4,
        )  # fmt: skip
    ax.set_xticks(range(len(table)), [row["label"] for row in table], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Corrupted test sets: as trained and after bnorm.adapt (mean ± std over seeds)")
    ncol = min(len(columns), 6)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=ncol, fontsize=8)
    return save_figure(fig, path)


def shift_section(name: str, exp: dict[str, Any], norms: list[str], out: Path) -> list[Block]:
    summ = exp["summary"]
    columns = summ.get("columns", [])
    if not columns:
        return [Para(summ["headline"]["note"])]
    settings = summ.get("settings", {})
    tent = settings.get("tent", {})
    blocks: list[Block] = [
        Para(
            f"Online methods run over test batches of {settings.get('adapt_batch')} "
            "in the test set's order; "
            f"prior strength N = {settings.get('prior_strength')} samples; Tent: "
            f"{tent.get('optimizer', 'sgd').upper()} lr {tent.get('lr')}, "
            f"momentum {tent.get('momentum')}, "
            "one step per batch, each batch predicted before its step."
        )
    ]
    rows = [
        [row["label"], *(format_accuracy(row["columns"][c["key"]]) for c in columns)]
        for row in summ["table"]
    ]
    rows.append(
        [
            f"mean over {', '.join(summ.get('averaged_over', []))}",
            *(format_accuracy(summ["mean_over_corruptions"][c["key"]]) for c in columns),
        ]
    )
    blocks.append(Table(["test set", *(c["label"] for c in columns)], rows))
    fig = plot_shift(summ, norms, out / f"{name}.png")
    if fig is not None:
        caption = "Test accuracy per corruption, as trained and after test-time adaptation."
        blocks.append(Figure(fig, caption))
    return blocks


SHIFT = Kind(schedule_nothing, summarize_shift, shift_section, trains=False)
