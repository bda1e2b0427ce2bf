"""``disagreement`` (no training): compares the final test predictions of the baseline and
each other norm in the experiment ``options["source"]``, seed by seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..blocks import (
    Block,
    Figure,
    Para,
    Table,
    format_percent,
    new_figure,
    norm_colour,
    norm_label,
    save_figure,
)
from .base import (
    Experiment,
    Kind,
    SummaryInputs,
    baseline,
    mean_std,
    schedule_nothing,
)

__all__ = ["DISAGREEMENT", "compare_predictions"]


def summarize_disagreement(
    exp: Experiment, runs: list[dict[str, Any]], norms: Sequence[str], given: SummaryInputs
) -> dict[str, Any]:
    source_name = exp.options.get("source", "curves")
    src_runs = [r for r in given.runs.get(source_name, []) if "predictions" in r]
    labels = given.test_labels
    base = baseline(norms)
    pairs: dict[str, list[dict[str, Any]]] = {}
    for norm in norms:
        if norm == base:
            continue
        pairs[norm] = []
        for r in src_runs:
            if r["norm"] != norm:
                continue
            b = next((x for x in src_runs if x["norm"] == base and x["seed"] == r["seed"]), None)
            if b is None or labels is None:
                continue
            pairs[norm].append(
                compare_predictions(b["predictions"], r["predictions"], labels, r["seed"])
            )
    values: dict[str, Any] = {}
    notes = []
    for norm, ps in pairs.items():
        values[base] = mean_std([p["baseline_accuracy_on_disagreements"] for p in ps])
        values[norm] = mean_std([p["accuracy_on_disagreements"] for p in ps])
        rate = mean_std([p["rate"] for p in ps])
        if rate["n"]:
            notes.append(
                f"{norm_label(norm)} and {norm_label(base)} disagree on {100 * rate['mean']:.1f} ± "
                f"{100 * rate['std']:.1f}% of the test examples"
            )
    if not pairs:
        notes.append(f"needs the baseline '{base}' and another norm in '{source_name}'")
    headline = {
        "measure": "accuracy on the test examples where the two disagree",
        "short": "acc where they disagree",
        "values": values,
        "speedup": {},
        "note": "; ".join(notes),
    }
    return {"source": source_name, "baseline": base, "pairs": pairs, "headline": headline}


def compare_predictions(
    pred_base: Sequence[int], pred_other: Sequence[int], labels: Sequence[int], seed: int
) -> dict[str, Any]:
    n = len(labels)
    where = [i for i in range(n) if pred_base[i] != pred_other[i]]
    k = len(where)
    base_right = sum(pred_base[i] == labels[i] for i in where)
    other_right = sum(pred_other[i] == labels[i] for i in where)
    return {
        "seed": seed,
        "test_examples": n,
        "disagreements": k,
        "rate": k / n if n else None,
        "baseline_accuracy_on_disagreements": base_right / k if k else None,
        "accuracy_on_disagreements": other_right / k if k else None,
        "both_wrong": k - base_right - other_right,
    }


def plot_disagreement(summary: dict[str, Any], norms: Sequence[str], path: Path) -> Path | None:
    pairs = {n: ps for n, ps in summary.get("pairs", {}).items() if ps}
    if not pairs:
        return None
    base = summary["baseline"]
    fig, (ax,) = new_figure(7, 3.6)
    width = 0.26
    ticks = []
    for i, (norm, ps) in enumerate(pairs.items()):
        total = sum(p["disagreements"] for p in ps)
        rate = 100 * total / max(sum(p["test_examples"] for p in ps), 1)
        parts = [
            (
                f"{norm_label(base)} right",
                sum(
                    p["disagreements"] * (p["baseline_accuracy_on_disagreements"] or 0) for p in ps
                ),
                norm_colour(base, norms),
            ),
            (
                f"{norm_label(norm)} right",
                sum(p["disagreements"] * (p["accuracy_on_disagreements"] or 0) for p in ps),
                norm_colour(norm, norms),
            ),
            ("both wrong", sum(p["both_wrong"] for p in ps), "#9a9a9a"),
        ]
        for j, (label, count, colour) in enumerate(parts):
            share = 100 * count / total if total else 0.0
            x = i + (j - 1) * width
            ax.bar(x, share, width * 0.92, color=colour, label=label if i == 0 else None)
            ax.annotate(
                f"{share:.0f}%",
                (x, share),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=8,
            )
        n_total = sum(p["test_examples"] for p in ps)
        ticks.append(
            f"{norm_label(norm)} vs {norm_label(base)}: {total} of {n_total} test predictions "
            "differ\n"
            f"({rate:.1f}%, {len(ps)} seeds)"
        )
    ax.set_xticks(range(len(pairs)), ticks, fontsize=8)
    ax.set_ylabel("% of the examples where they disagree")
    ax.set_ylim(0, 105)
    ax.set_title("Who is right where the networks disagree (all seeds pooled)")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def disagreement_section(
    name: str, exp: dict[str, Any], norms: list[str], out: Path
) -> list[Block]:
    summ = exp["summary"]
    base = summ["baseline"]
    blocks: list[Block] = []
    for norm, ps in summ["pairs"].items():
        if not ps:
            continue
        rows = [
            [
                str(p["seed"]),
                f"{p['disagreements']} / {p['test_examples']} ({100 * p['rate']:.1f}%)",
                format_percent(p["baseline_accuracy_on_disagreements"]),
                format_percent(p["accuracy_on_disagreements"]),
                str(p["both_wrong"]),
            ]
            for p in ps
        ]
        blocks.append(
            Table(
                [
                    "seed",
                    "disagreements",
                    f"{norm_label(base)} right",
                    f"{norm_label(norm)} right",
                    "both wrong",
                ],
                rows,
            )
        )
    fig = plot_disagreement(summ, norms, out / f"{name}.png")
    if fig is not None:
        blocks.append(
            Figure(
                fig, "How often the final networks disagree on the test set, and who is right then."
            )
        )
    if not blocks:
        blocks.append(Para(summ["headline"]["note"]))
    return blocks


DISAGREEMENT = Kind(schedule_nothing, summarize_disagreement, disagreement_section, trains=False)
