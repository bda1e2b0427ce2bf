"""``accumulation``: gradient accumulation (``micro_batches`` per step). Two runs per
(seed, norm), identical but for the running statistics — updated by the layers per
micro-batch (torch's behaviour) or once per step by :func:`bnorm.accumulate` — with
their final test accuracy and the drift of their running statistics from the exact
training-set statistics (``stats_check``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..blocks import (
    Block,
    Figure,
    Para,
    Table,
    format_accuracy,
    format_number,
    mean_curve,
    new_figure,
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

__all__ = ["ACCUMULATION", "ACCUMULATION_ARMS", "ACCUMULATION_LABELS"]


# The two arms of an accumulation experiment: how the running statistics are updated.
ACCUMULATION_ARMS: dict[str, bool] = {"per_micro": False, "accumulate": True}


ACCUMULATION_LABELS = {
    "per_micro": "per micro-batch (torch)",
    "accumulate": "once per step (bnorm.accumulate)",
}


def schedule_accumulation(
    exp: Experiment, spec: TrainSpec, norms: Sequence[str], seeds: Sequence[int]
) -> list[ScheduledRun]:
    """Two runs per (seed, norm), identical but for the running statistics: updated by
    the layers per micro-batch (torch's behaviour), or once per step by bnorm.accumulate."""
    return [
        ScheduledRun(
            f"{norm}-{arm.replace('_', '-')}-seed{seed}",
            norm,
            seed,
            replace(spec, accumulate_stats=merged),
        )
        for seed in seeds
        for norm in norms
        for arm, merged in ACCUMULATION_ARMS.items()
    ]


def _arm_runs(runs: list[dict[str, Any]], norm: str, merged: bool) -> list[dict[str, Any]]:
    return [r for r in runs if r["norm"] == norm and bool(r.get("accumulate_stats")) == merged]


def _train_loss_gap(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Largest difference between two runs' recorded training losses (None if none)."""
    pairs = zip(a["curve"]["train_loss"], b["curve"]["train_loss"])
    gaps = [abs(x - y) for x, y in pairs if x is not None and y is not None]
    return max(gaps, default=None)


def summarize_accumulation(
    exp: Experiment, runs: list[dict[str, Any]], norms: Sequence[str], given: SummaryInputs
) -> dict[str, Any]:
    per_norm: dict[str, Any] = {}
    values: dict[str, Any] = {}
    notes = []
    spec = exp.spec
    for norm in norms:
        entry: dict[str, Any] = {}
        for arm, merged in ACCUMULATION_ARMS.items():
            mine = _arm_runs(runs, norm, merged)
            checks = [r["running_stats"] for r in mine if r.get("running_stats")]
            layers = checks[0]["layers"] if checks else []
            entry[arm] = {
                "final_accuracy": mean_std([final_accuracy(r) for r in mine]),
                "mean_drift": mean_std([c["mean_drift"] for c in checks]),
                "layer_drift": [
                    mean_std([c["drift"][i] for c in checks]) for i, _ in enumerate(layers)
                ],
                "recalibrated_accuracy": mean_std([c["recalibrated_accuracy"] for c in checks]),
                "layers": layers,
                "runs": len(mine),
            }
        gaps = []
        for r in _arm_runs(runs, norm, False):
            partner = next((b for b in _arm_runs(runs, norm, True) if b["seed"] == r["seed"]), None)
            if partner is not None:
                gaps.append(_train_loss_gap(r, partner))
        entry["train_loss_max_abs_diff"] = max((g for g in gaps if g is not None), default=None)
        per_norm[norm] = entry
        values[norm] = entry["per_micro"]["final_accuracy"]
        values[f"{norm}+accumulate"] = entry["accumulate"]["final_accuracy"]
        drift = [entry[a]["mean_drift"]["mean"] for a in ACCUMULATION_ARMS]
        if all(d is not None for d in drift):
            notes.append(
                f"{norm_label(norm)}: drift of the running statistics from the training set's (KL, "
                f"mean over layers) {drift[0]:.3g} updated per micro-batch vs {drift[1]:.3g} "
                "once per step"
            )
        recal = entry["accumulate"]["recalibrated_accuracy"]["mean"]
        if recal is not None:
            notes.append(f"recalibrated statistics give {100 * recal:.1f}%")
    micro = f"{spec.get('micro_batches', 1)}×{spec.get('batch_size')}"
    headline = {
        "measure": f"final test accuracy (running statistics), {micro} micro-batches per step",
        "short": f"final acc, {micro} micro-batches",
        "values": values,
        "speedup": {},
        "note": "; ".join(notes),
    }
    return {"arms": dict(ACCUMULATION_LABELS), "per_norm": per_norm, "headline": headline}


_ARM_COLOURS = {"per_micro": "#1f6fb2", "accumulate": "#c0392b"}


def plot_accumulation(exp: dict[str, Any], norms: Sequence[str], path: Path) -> Path | None:
    """Left: test accuracy (running statistics) against the SGD step, per arm, mean over
    seeds. Right: each layer's drift from the training-set statistics, per arm."""
    runs, summ = exp["runs"], exp["summary"]
    if not runs:
        return None
    fig, (acc_ax, drift_ax) = new_figure(10, 3.6, 2)
    width = 0.8 / max(len(norms) * len(ACCUMULATION_ARMS), 1)
    bar = 0
    for norm in norms:
        for arm, merged in ACCUMULATION_ARMS.items():
            mine = [
                r for r in runs if r["norm"] == norm and bool(r.get("accumulate_stats")) == merged
            ]
            label = f"{norm_label(norm)}, {ACCUMULATION_LABELS[arm]}"
            colour = _ARM_COLOURS[arm]
            steps, acc = mean_curve(mine, "test_accuracy")
            acc_ax.plot(steps, [100 * a for a in acc], color=colour, lw=2, label=label)
            entry = summ["per_norm"].get(norm, {}).get(arm, {})
            layers = entry.get("layers", [])
            means = [d["mean"] for d in entry.get("layer_drift", [])]
            if layers and all(m is not None for m in means):
                offset = (bar - (len(norms) * len(ACCUMULATION_ARMS) - 1) / 2) * width
                xs = [i + offset for i, _ in enumerate(layers)]
                stds = [d["std"] or 0.0 for d in entry["layer_drift"]]
                drift_ax.bar(xs, means, width, yerr=stds, color=colour, label=label, capsize=3)
                drift_ax.set_xticks(range(len(layers)), layers)
            bar += 1
    acc_ax.set_xlabel("SGD step")
    acc_ax.set_ylabel("test accuracy (%), eval mode")
    acc_ax.set_title("Test accuracy with the running statistics")
    acc_ax.legend(loc="lower right")
    drift_ax.set_xlabel("batch-norm layer")
    drift_ax.set_ylabel("drift KL (worst channel)")
    drift_ax.set_yscale("log")
    low, high = drift_ax.get_ylim()
    drift_ax.set_ylim(low, high * 6)  # room for the legend above the bars
    drift_ax.set_title("Running vs exact training-set statistics")
    drift_ax.legend(loc="best")
    return save_figure(fig, path)


def accumulation_section(
    name: str, exp: dict[str, Any], norms: list[str], out: Path
) -> list[Block]:
    summ = exp["summary"]
    headers = ["network", "running statistics updated", "final test acc (running stats)",
               "drift KL, mean over layers", "drift KL per layer", "test acc, recalibrated"]
    rows = []
    for norm in norms:
        entry = summ["per_norm"].get(norm)
        if entry is None:
            continue
        for arm, text in ACCUMULATION_LABELS.items():
            e = entry[arm]
            drift = e["mean_drift"]
            rows.append([
                norm_label(norm),
                text,
                format_accuracy(e["final_accuracy"]),
                "—" if drift["mean"] is None else f"{drift['mean']:.3g} ± {drift['std']:.2g}",
                ", ".join(
                    f"{layer} {format_number(d['mean'])}"
                    for layer, d in zip(e["layers"], e["layer_drift"])
                ),
                format_accuracy(e["recalibrated_accuracy"]),
            ])
    blocks: list[Block] = [Table(headers, rows)]
    for norm in norms:
        gap = summ["per_norm"].get(norm, {}).get("train_loss_max_abs_diff")
        if gap is not None:
            same = "are identical" if gap == 0 else f"differ by at most {gap:.2g}"
            blocks.append(Para(
                f"{norm_label(norm)}: the two arms' recorded training losses {same} (the same "
                "gradients: normalization is per micro-batch in both)."
            ))
    fig = plot_accumulation(exp, norms, out / f"{name}.png")
    if fig is not None:
        caption = (
            "Gradient accumulation: running statistics updated per micro-batch vs once per "
            "step (mean ± std over seeds)."
        )
        blocks.append(Figure(fig, caption))
    return blocks


ACCUMULATION = Kind(schedule_accumulation, summarize_accumulation, accumulation_section)
