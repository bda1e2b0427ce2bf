"""The study's report: PNG figures, a self-contained ``report.html`` (figures embedded as
base64 PNG data, inline CSS, no external assets) and ``report.md`` (the same tables, the
PNG files beside it).

The document is built once as a list of blocks (headings, paragraphs, tables, figures)
and rendered twice, so the HTML and Markdown reports cannot drift apart.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["format_accuracy", "format_speedup", "summary_rows", "write_report"]

_COLOURS = {
    "none": "#d9730d",
    "bn": "#1f6fb2",
    "renorm": "#2e9e4f",
    "ghost": "#8e44ad",
    "syncbn": "#16a085",
}
_FALLBACK = ["#c0392b", "#16a085", "#7f8c8d", "#b7950b"]


def _label(norm: str) -> str:
    from .models import NORM_LABELS

    return NORM_LABELS.get(norm, norm)


def _colour(norm: str, norms: Sequence[str]) -> str:
    if norm in _COLOURS:
        return _COLOURS[norm]
    return _FALLBACK[list(norms).index(norm) % len(_FALLBACK)] if norm in norms else _FALLBACK[0]


def format_accuracy(stats: dict[str, Any] | None) -> str:
    """``{"mean": 0.9712, "std": 0.0041}`` → ``97.1 ± 0.4%``; missing → ``—``."""
    if not stats or stats.get("mean") is None:
        return "—"
    return f"{100 * stats['mean']:.1f} ± {100 * (stats.get('std') or 0.0):.1f}%"


def format_speedup(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "—"
    return f"{stats['mean']:.1f}× ± {stats.get('std') or 0.0:.1f}"


def _geo_mean(vectors: list[list[float | None]]) -> list[float]:
    """Per-position geometric mean over the vectors (missing/non-positive values skipped)."""
    out = []
    for i in range(max((len(v) for v in vectors), default=0)):
        values = [v[i] for v in vectors if i < len(v)]
        logs = [math.log(x) for x in values if x is not None and x > 0]
        out.append(math.exp(sum(logs) / len(logs)) if logs else math.nan)
    return out


def _nan(values: Sequence[float | None]) -> list[float]:
    """Plot-ready values: None (no number, e.g. after a divergence) becomes NaN (a gap)."""
    return [math.nan if v is None else float(v) for v in values]


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


# --------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    css: str = ""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    path: Path
    caption: str


Block = Heading | Para | Table | Figure


def summary_rows(
    metrics: dict[str, Any], compact: bool = False
) -> tuple[list[str], list[list[str]]]:
    """The summary table: one row per experiment (the experiment's headline). ``compact``
    (for a terminal): experiment names, short measures, no note column."""
    norms: list[str] = list(metrics.get("norms", []))
    base = "none" if "none" in norms else (norms[0] if norms else "")
    # A speed-up column only for the norms some experiment measured one for.
    measured = {n for row in metrics.get("summary", []) for n in row.get("speedup", {})}
    speed_norms = [n for n in norms if n != base and n in measured]
    headers = ["Experiment", "Measured", *(_label(n) for n in norms)]
    headers += [f"Speed-up {_label(n)} vs {_label(base)}" for n in speed_norms]
    if compact:
        headers = [h.replace("Speed-up ", "") if h.startswith("Speed-up") else h for h in headers]
    else:
        headers.append("Note")
    rows = []
    for row in metrics.get("summary", []):
        if compact:
            cells = [row["experiment"], row.get("short", row["measure"])]
        else:
            cells = [row["title"], row["measure"]]
        cells += [format_accuracy(row["values"].get(n)) for n in norms]
        cells += [format_speedup(row["speedup"].get(n)) for n in speed_norms]
        if not compact:
            cells.append(row.get("note") or "")
        rows.append(cells)
    return headers, rows


# -------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float, panels: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Mean over runs of ``curve[key]`` at each evaluated step, over the runs that have a
    number there (a diverged run stops early)."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for step, value in zip(r["curve"]["step"], r["curve"][key]):
            if value is not None:
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def plot_curves(runs: list[dict[str, Any]], norms: Sequence[str], path: Path, title: str) -> Path:
    fig, (acc_ax, loss_ax) = _new_figure(10, 3.6, 2)
    for norm in norms:
        mine = [r for r in runs if r["norm"] == norm]
        colour = _colour(norm, norms)
        for r in mine:
            acc = [100 * a for a in _nan(r["curve"]["test_accuracy"])]
            acc_ax.plot(r["curve"]["step"], acc, color=colour, alpha=0.25, lw=0.8)
        steps, acc_mean = _mean_curve(mine, "test_accuracy")
        acc_ax.plot(
            steps,
            [100 * a for a in acc_mean],
            color=colour,
            lw=2,
            label=f"{_label(norm)} (mean of {len(mine)})",
        )
        steps, loss_mean = _mean_curve(mine, "train_loss")
        loss_ax.plot(steps, loss_mean, color=colour, lw=2, label=_label(norm))
    acc_ax.set_xlabel("training step")
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title("Test accuracy (thin: single seeds)")
    acc_ax.legend(loc="lower right")
    loss_ax.set_xlabel("training step")
    loss_ax.set_ylabel("training loss (mean since last point)")
    loss_ax.set_yscale("log")
    loss_ax.set_title("Training loss")
    loss_ax.legend(loc="upper right")
    fig.suptitle(title)
    return _save(fig, path)


def plot_percentiles(runs: list[dict[str, Any]], norms: Sequence[str], path: Path) -> Path | None:
    shown = [next((r for r in runs if r["norm"] == n and "probe" in r), None) for n in norms]
    pairs = [(n, r) for n, r in zip(norms, shown) if r is not None]
    if not pairs:
        return None
    fig, axes = _new_figure(5 * len(pairs), 3.4, len(pairs))
    for ax, (norm, r) in zip(axes, pairs):
        p = r["probe"]
        colour = _colour(norm, norms)
        p15, p50, p85 = _nan(p["p15"]), _nan(p["p50"]), _nan(p["p85"])
        ax.fill_between(p["step"], p15, p85, color=colour, alpha=0.18)
        ax.plot(p["step"], p50, color=colour, lw=2, label="50th")
        ax.plot(p["step"], p15, color=colour, lw=1, ls="--", label="15th / 85th")
        ax.plot(p["step"], p85, color=colour, lw=1, ls="--")
        ax.set_title(f"{_label(norm)} (seed {r['seed']})")
        ax.set_xlabel("training step")
    axes[0].legend(loc="best", framealpha=0.9)
    axes[0].set_ylabel("input to a last-hidden-layer unit")
    fig.suptitle(
        "Distribution over the test set of one last-hidden-layer unit's input (percentiles)"
    )
    return _save(fig, path)


def plot_grad_norms(runs: list[dict[str, Any]], norms: Sequence[str], path: Path) -> Path | None:
    with_norms = [r for r in runs if r.get("grad_norms", {}).get("final")]
    if not with_norms:
        return None
    fig, (ax,) = _new_figure(7, 3.8)
    for norm in norms:
        mine = [r for r in with_norms if r["norm"] == norm]
        if not mine:
            continue
        colour = _colour(norm, norms)
        for when, style in (("init", "--"), ("final", "-")):
            vectors = [r["grad_norms"][when] for r in mine if r["grad_norms"][when]]
            geo = _geo_mean(vectors)
            layers = len(geo)
            label = f"{_label(norm)}, {'at initialization' if when == 'init' else 'after training'}"
            ax.plot(
                range(1, layers + 1),
                geo,
                style,
                color=colour,
                marker="o",
                ms=3,
                lw=1.8,
                label=label,
            )
    ax.set_yscale("log")
    ax.set_xlabel("layer (1 = first hidden layer, last = classifier)")
    ax.set_ylabel("‖∂L/∂W‖ (geometric mean over seeds)")
    ax.set_title("Gradient norm per layer")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_sweep(summary: dict[str, Any], norms: Sequence[str], path: Path) -> Path | None:
    table = summary.get("table", [])
    if not table:
        return None
    field, label = summary["field"], summary["label"]
    fig, (ax,) = _new_figure(7, 3.8)
    for norm in norms:
        pts = [(row[field], row[norm]) for row in table if row[norm]["mean"] is not None]
        if not pts:
            continue
        colour = _colour(norm, norms)
        ax.errorbar(
            [p[0] for p in pts],
            [100 * p[1]["mean"] for p in pts],
            yerr=[100 * p[1]["std"] for p in pts],
            color=colour,
            marker="o",
            capsize=3,
            lw=2,
            label=_label(norm),
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
                label=f"{_label(norm)}: some seeds diverged (loss not finite)",
            )
    ax.set_xscale("log", base=summary["log_base"])
    ax.set_xticks(summary["values"], [f"{v:g}" for v in summary["values"]])
    ax.set_xlabel(label)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"Final test accuracy per {label} (mean ± std over seeds)")
    ax.legend(loc="best")
    return _save(fig, path)


def plot_disagreement(summary: dict[str, Any], norms: Sequence[str], path: Path) -> Path | None:
    pairs = {n: ps for n, ps in summary.get("pairs", {}).items() if ps}
    if not pairs:
        return None
    base = summary["baseline"]
    fig, (ax,) = _new_figure(7, 3.6)
    width = 0.26
    ticks = []
    for i, (norm, ps) in enumerate(pairs.items()):
        total = sum(p["disagreements"] for p in ps)
        rate = 100 * total / max(sum(p["test_examples"] for p in ps), 1)
        parts = [
            (
                f"{_label(base)} right",
                sum(
                    p["disagreements"] * (p["baseline_accuracy_on_disagreements"] or 0) for p in ps
                ),
                _colour(base, norms),
            ),
            (
                f"{_label(norm)} right",
                sum(p["disagreements"] * (p["accuracy_on_disagreements"] or 0) for p in ps),
                _colour(norm, norms),
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
            f"{_label(norm)} vs {_label(base)}: {total} of {n_total} test predictions differ\n"
            f"({rate:.1f}%, {len(ps)} seeds)"
        )
    ax.set_xticks(range(len(pairs)), ticks, fontsize=8)
    ax.set_ylabel("% of the examples where they disagree")
    ax.set_ylim(0, 105)
    ax.set_title("Who is right where the networks disagree (all seeds pooled)")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_shift(summary: dict[str, Any], norms: Sequence[str], path: Path) -> Path | None:
    """Grouped bars: per corruption, the accuracy of each (norm, method) column."""
    columns = summary.get("columns", [])
    table = summary.get("table", [])
    if not columns or not table:
        return None
    method_alpha = {"source": 1.0, "bn": 0.8, "bn_online": 0.65, "prior": 0.5, "tent": 0.35}
    method_hatch = {"source": "", "bn": "//", "bn_online": "\\\\", "prior": "..", "tent": "xx"}
    fig, (ax,) = _new_figure(max(7.0, 1.3 * len(table) + 2), 3.8)
    width = 0.84 / len(columns)
    for j, col in enumerate(columns):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(table))]
        stats = [row["columns"][col["key"]] for row in table]
        means = [100 * s["mean"] if s["mean"] is not None else math.nan for s in stats]
        errs = [100 * (s["std"] or 0.0) if s["mean"] is not None else 0.0 for s in stats]
        ax.bar(
            xs, means, width * 0.92, yerr=errs, capsize=2, label=col["label"],
            color=_colour(col["norm"], norms), alpha=method_alpha.get(col["method"], 1.0),
            hatch=method_hatch.get(col["method"], ""), edgecolor="white", linewidth=0.4,
        )  # fmt: skip
    ax.set_xticks(range(len(table)), [row["label"] for row in table], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Corrupted test sets: as trained and after bnorm.adapt (mean ± std over seeds)")
    ncol = min(len(columns), 6)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=ncol, fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------- the document


def _spec_text(spec: dict[str, Any], options: dict[str, Any] | None = None) -> str:
    options = options or {}
    model = spec.get("model", "?")
    if model in ("mlp", "deep-mlp"):
        hidden = spec.get("hidden")
        act = spec.get("activation")
        widths = "×".join(str(h) for h in hidden) if hidden else "default"
        model = f"{model} (hidden {widths}, {act or 'default'} units)"
    epochs = spec.get("epochs")
    length = (
        f"{spec['steps']} steps"
        if spec.get("steps")
        else f"{epochs} epoch{'' if epochs == 1 else 's'}"
    )
    init = (
        "N(0, {:g}²)".format(spec["init_std"]) if spec.get("init") == "normal" else spec.get("init")
    )
    parts = [
        f"model {model}",
        f"init {init}",
        _batch_text(spec, options),
        length,
        (
            "SGD at each learning rate of the grid"
            if options.get("lrs")
            else f"SGD lr {spec.get('lr'):g}"
        )
        + (f", momentum {spec['momentum']:g}" if spec.get("momentum") else ""),
    ]
    if spec.get("weight_decay"):
        parts.append(f"weight decay {spec['weight_decay']:g}")
    if spec.get("lr_milestones"):
        parts.append(
            f"lr ×{spec['lr_gamma']:g} at "
            f"{', '.join(f'{m:g}' for m in spec['lr_milestones'])} of training"
        )
    if spec.get("augment"):
        parts.append("crop + flip augmentation")
    return "; ".join(parts) + "."


def _batch_text(spec: dict[str, Any], options: dict[str, Any]) -> str:
    if options.get("batch_sizes"):
        return "each batch size of the grid"
    if spec.get("micro_batches", 1) > 1:
        return (
            f"{spec['micro_batches']} micro-batches of {spec.get('batch_size')} per SGD step "
            "(gradient accumulation)"
        )
    return f"batch {spec.get('batch_size')}"


def _curves_blocks(name: str, exp: dict[str, Any], norms: list[str], out: Path) -> list[Block]:
    runs = exp["runs"]
    summ = exp["summary"]
    blocks: list[Block] = [_curves_table(summ, norms)]
    blocks += _speedup_blocks(summ, exp["spec"].get("eval_every"))
    fig = plot_curves(runs, norms, out / f"{name}-accuracy.png", exp["title"])
    blocks.append(Figure(fig, "Test accuracy and training loss against training steps."))
    pct = plot_percentiles(runs, norms, out / f"{name}-percentiles.png")
    if pct is not None:
        blocks.append(
            Figure(
                pct,
                "15th, 50th and 85th percentiles over the test set of the input to one unit's "
                "nonlinearity in the last hidden layer (after the normalization, "
                "when there is one), "
                "as training goes on — the BN paper's Fig. 1(b, c).",
            )
        )
    blocks += _inference_blocks(summ, norms)
    grads = plot_grad_norms(runs, norms, out / f"{name}-gradnorms.png")
    if grads is not None:
        blocks.append(_grad_table(runs, norms))
        blocks.append(
            Figure(
                grads,
                "Gradient norm of each layer's weights for one batch of 500 training examples, at "
                "initialization (dashed) and after training (solid).",
            )
        )
    return blocks


def _curves_table(summ: dict[str, Any], norms: list[str]) -> Table:
    """Final and best accuracy, final loss and finished runs, per normalization."""
    per_norm = summ["per_norm"]
    headers = ["", *(_label(n) for n in norms)]
    rows = [
        [
            "final test accuracy",
            *(format_accuracy(per_norm[n]["final_accuracy"]) for n in norms),
        ],
        [
            "best test accuracy",
            *(format_accuracy(per_norm[n]["best_accuracy"]) for n in norms),
        ],
        ["final test loss", *(_loss(per_norm[n]["final_loss"]) for n in norms)],
        [
            "runs finished (diverged)",
            *(f"{per_norm[n]['runs']} ({per_norm[n]['diverged']})" for n in norms),
        ],
    ]
    return Table(headers, rows)


def _speedup_blocks(summ: dict[str, Any], eval_every: Any) -> list[Block]:
    """Per normalization, the BN paper's speed-up over the baseline, seed by seed."""
    blocks: list[Block] = []
    base = summ["baseline"]
    for norm, s in summ["speedup"].items():
        if not s["per_seed"]:
            continue
        blocks.append(
            Para(
                f"Speed-up of {_label(norm)} over {_label(base)}, as the BN paper measures it: "
                f"the steps {_label(base)} needed to reach its best test accuracy, divided by the "
                f"steps {_label(norm)} needed to reach that same accuracy (evaluated every "
                f"{eval_every} steps)."
            )
        )
        rows = [
            [
                str(p["seed"]),
                format_accuracy({"mean": p["target_accuracy"], "std": 0}).split(" ±")[0] + "%",
                _num(p["baseline_steps"]),
                _num(p["steps"]),
                f"{p['factor']:.1f}×" if p["factor"] is not None else f"— ({p['reason']})",
            ]
            for p in s["per_seed"]
        ]
        blocks.append(
            Table(
                [
                    "seed",
                    f"{_label(base)} best accuracy",
                    f"{_label(base)} steps",
                    f"{_label(norm)} steps",
                    "speed-up",
                ],
                rows,
            )
        )
    return blocks


def _inference_blocks(summ: dict[str, Any], norms: list[str]) -> list[Block]:
    """From training to inference: EMA vs recalibrated statistics, and the folded net."""
    checked = [n for n in norms if "inference" in summ["per_norm"][n]]
    if not checked:
        return []
    inf = {n: summ["per_norm"][n]["inference"] for n in checked}
    sizes = list(inf[checked[0]]["latency_ratio"])
    rows = [
        [
            "test accuracy, running (EMA) statistics",
            *(format_accuracy(inf[n]["ema_accuracy"]) for n in checked),
        ],
        [
            "test accuracy after bnorm.recalibrate",
            *(format_accuracy(inf[n]["recalibrated_accuracy"]) for n in checked),
        ],
        [
            "batch-norm layers folded by bnorm.fold",
            *(str(inf[n]["folded_layers"]) for n in checked),
        ],
        [
            "largest change of a test logit after folding",
            *(f"{inf[n]['fold_max_abs_logit_diff']:.1e}" for n in checked),
        ],
    ]
    for size in sizes:
        rows.append(
            [
                f"folded / unfolded latency, {size.replace('_', ' ')}",
                *(f"{inf[n]['latency_ratio'][size]['mean']:.2f}×" for n in checked),
            ]
        )
    return [
        Para(
            "From training to inference: the running statistics are an exponential moving average "
            "of batch statistics taken while the weights moved; bnorm.recalibrate replaces them by "
            "the exact statistics of the training set under the final weights. bnorm.fold then "
            "folds each batch norm into the layer before it (inference latency: median of "
            "alternated runs, this machine)."
        ),
        Table(["", *(_label(n) for n in checked)], rows),
    ]


def _loss(stats: dict[str, Any]) -> str:
    if stats.get("mean") is None:
        return "—"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _grad_table(runs: list[dict[str, Any]], norms: list[str]) -> Table:
    headers = ["layer"]
    columns: list[list[float]] = []
    for norm in norms:
        mine = [r for r in runs if r["norm"] == norm and r.get("grad_norms", {}).get("final")]
        for when in ("init", "final"):
            vecs = [r["grad_norms"][when] for r in mine]
            if not vecs:
                continue
            headers.append(f"{_label(norm)} {'init' if when == 'init' else 'trained'}")
            columns.append(_geo_mean(vecs))
    layers = max((len(c) for c in columns), default=0)
    rows = [
        [
            str(i + 1),
            *(f"{c[i]:.2e}" if i < len(c) and math.isfinite(c[i]) else "—" for c in columns),
        ]
        for i in range(layers)
    ]
    return Table(headers, rows)


def _sweep_blocks(name: str, exp: dict[str, Any], norms: list[str], out: Path) -> list[Block]:
    summ = exp["summary"]
    headers = [summ["label"], *(_label(n) for n in norms)]
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


def _disagreement_blocks(
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
                _pct(p["baseline_accuracy_on_disagreements"]),
                _pct(p["accuracy_on_disagreements"]),
                str(p["both_wrong"]),
            ]
            for p in ps
        ]
        blocks.append(
            Table(
                [
                    "seed",
                    "disagreements",
                    f"{_label(base)} right",
                    f"{_label(norm)} right",
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


def _shift_blocks(name: str, exp: dict[str, Any], norms: list[str], out: Path) -> list[Block]:
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


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


_ARM_COLOURS = {"per_micro": "#1f6fb2", "accumulate": "#c0392b"}


def plot_accumulation(exp: dict[str, Any], norms: Sequence[str], path: Path) -> Path | None:
    """Left: test accuracy (running statistics) against the SGD step, per arm, mean over
    seeds. Right: each layer's drift from the training-set statistics, per arm."""
    from .kinds import ACCUMULATION_ARMS, ACCUMULATION_LABELS

    runs, summ = exp["runs"], exp["summary"]
    if not runs:
        return None
    fig, (acc_ax, drift_ax) = _new_figure(10, 3.6, 2)
    width = 0.8 / max(len(norms) * len(ACCUMULATION_ARMS), 1)
    bar = 0
    for norm in norms:
        for arm, merged in ACCUMULATION_ARMS.items():
            mine = [
                r for r in runs if r["norm"] == norm and bool(r.get("accumulate_stats")) == merged
            ]
            label = f"{_label(norm)}, {ACCUMULATION_LABELS[arm]}"
            colour = _ARM_COLOURS[arm]
            steps, acc = _mean_curve(mine, "test_accuracy")
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
    return _save(fig, path)


def _accumulation_blocks(
    name: str, exp: dict[str, Any], norms: list[str], out: Path
) -> list[Block]:
    from .kinds import ACCUMULATION_LABELS

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
                _label(norm),
                text,
                format_accuracy(e["final_accuracy"]),
                "—" if drift["mean"] is None else f"{drift['mean']:.3g} ± {drift['std']:.2g}",
                ", ".join(
                    f"{layer} {_num(d['mean'])}" for layer, d in zip(e["layers"], e["layer_drift"])
                ),
                format_accuracy(e["recalibrated_accuracy"]),
            ])
    blocks: list[Block] = [Table(headers, rows)]
    for norm in norms:
        gap = summ["per_norm"].get(norm, {}).get("train_loss_max_abs_diff")
        if gap is not None:
            same = "are identical" if gap == 0 else f"differ by at most {gap:.2g}"
            blocks.append(Para(
                f"{_label(norm)}: the two arms' recorded training losses {same} (the same "
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


_SECTION_BUILDERS = {
    "curves": _curves_blocks,
    "lr_sweep": _sweep_blocks,
    "batch_sweep": _sweep_blocks,
    "disagreement": _disagreement_blocks,
    "shift": _shift_blocks,
    "accumulation": _accumulation_blocks,
}
_NO_TRAINING = ("disagreement", "shift")  # kinds that measure another experiment's networks


def build_document(config: dict[str, Any], metrics: dict[str, Any], out: Path) -> list[Block]:
    """Every block of the report, in order; writes the figures into ``out``."""
    norms: list[str] = list(metrics["norms"])
    ds = metrics["dataset"]
    blocks: list[Block] = [Heading("What batch normalization does — measured", 1)]
    intro = (
        f"Dataset {ds['name']} ({ds['train']} training, {ds['test']} test images of "
        f"{'×'.join(map(str, ds['shape']))}, {ds['classes']} classes); seeds "
        f"{', '.join(map(str, metrics['seeds']))}; every network trained with and without "
        "normalization from the same initial weights on the same batches. "
        f"Wall time {metrics['wall_s']:.0f} s on {metrics['device']} "
        f"({metrics['threads']} thread(s))."
    )
    blocks.append(Para(intro))
    if metrics.get("interrupted"):
        blocks.append(
            Para(
                f"Interrupted: {metrics['runs_finished']} of {metrics['runs_planned']} "
                "runs finished; "
                "this report covers those. Resume with `bnorm study --resume "
                + str(metrics.get("out_dir", "DIR"))
                + "`.",
                "warn",
            )
        )
    headers, rows = summary_rows(metrics)
    blocks += [Heading("Summary"), Table(headers, rows)]
    for name, exp in metrics["experiments"].items():
        blocks.append(Heading(exp["title"]))
        if exp.get("about"):
            blocks.append(Para(exp["about"]))
        if exp["kind"] not in _NO_TRAINING:
            blocks.append(Para("Setup: " + _spec_text(exp["spec"], exp["options"])))
        builder = _SECTION_BUILDERS.get(exp["kind"])
        if not exp["runs"] and exp["kind"] not in _NO_TRAINING:
            blocks.append(Para("No run of this experiment finished."))
        elif builder is not None:
            blocks += builder(name, exp, list(exp.get("norms", norms)), out)
    return blocks


# ------------------------------------------------------------------------ renderers

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1.5em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.8em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.35em 0.7em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; }
td.num { white-space: nowrap; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
p.warn { background: #fff4e5; border-left: 4px solid #d9730d; padding: 0.6em 0.9em; }
details { margin-top: 2em; } \
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


_NUMBER = re.compile(r"^[\d—.]+[^a-z]*$")


def _td(cell: str) -> str:
    """A table cell; numbers (``97.1 ± 0.4%``, ``12.0×``) do not wrap."""
    css = ' class="num"' if _NUMBER.match(cell) else ""
    return f"<td{css}>{html.escape(cell)}</td>"


def render_html(blocks: list[Block], config: dict[str, Any]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>bnorm study report</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = f' class="{b.css}"' if b.css else ""
            parts.append(f"<p{cls}>{html.escape(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = "".join(
                "<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in b.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
            )
    parts.append("<details><summary>Resolved configuration (config.json)</summary><pre>")
    parts.append(html.escape(json.dumps(config, indent=2)))
    parts.append("</pre></details></body></html>")
    return "\n".join(parts)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [("> **" + b.text + "**") if b.css == "warn" else b.text, ""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" for _ in b.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Figure):
            lines += [f"![{b.caption}]({b.path.name})", "", f"*{b.caption}*", ""]
    lines.append("The resolved configuration is in `config.json`, every number in `metrics.json`.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, config: dict[str, Any], metrics: dict[str, Any]) -> list[Path]:
    """Write the PNGs, ``report.html`` and ``report.md`` into ``out``; returns the paths."""
    from .checkpoint import atomic_write

    out = Path(out)
    blocks = build_document(config, metrics, out)
    html_path = out / "report.html"
    md_path = out / "report.md"
    atomic_write(html_path, render_html(blocks, config).encode())
    atomic_write(md_path, render_markdown(blocks).encode())
    return [html_path, md_path, *(b.path for b in blocks if isinstance(b, Figure))]
