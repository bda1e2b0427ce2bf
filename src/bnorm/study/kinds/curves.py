"""``curves``: one run per (seed, norm); test accuracy/loss against steps, the probe
unit's percentiles, per-layer gradient norms if the spec asks for them, the inference
check, and the speed-up of each norm over the baseline (:func:`speedup`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnorm.testing import geometric_mean

from ..blocks import (
    Block,
    Figure,
    Para,
    Table,
    format_accuracy,
    format_loss,
    format_number,
    mean_curve,
    nan_gaps,
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
    baseline,
    final_accuracy,
    mean_std,
)

__all__ = ["CURVES", "speedup", "steps_to_reach"]


def steps_to_reach(
    steps: Sequence[int], accuracy: Sequence[float | None], target: float
) -> int | None:
    """First evaluated step whose accuracy is ≥ ``target`` (None if never)."""
    for s, a in zip(steps, accuracy):
        if a is not None and a >= target:
            return int(s)
    return None


def speedup(
    baseline: dict[str, Any], other: dict[str, Any], chance: float
) -> dict[str, Any]:
    """The BN paper's speed-up for one seed: the baseline's best test accuracy A and the
    first step s_base where it reached A; the first step s_other where ``other`` reached
    A; speed-up = s_base / s_other.

    Undefined (``factor`` None, with a ``reason``) when the baseline never rose clearly
    above chance (A < 2 × chance: nothing to catch up with), or ``other`` never reached A.
    """
    b_steps, b_acc = baseline["curve"]["step"], baseline["curve"]["test_accuracy"]
    finite = [a for a in b_acc if a is not None]
    target = max(finite) if finite else 0.0
    base_steps = steps_to_reach(b_steps, b_acc, target)
    other_steps = steps_to_reach(other["curve"]["step"], other["curve"]["test_accuracy"], target)
    out: dict[str, Any] = {
        "seed": baseline["seed"],
        "target_accuracy": target,
        "baseline_steps": base_steps,
        "steps": other_steps,
        "factor": None,
        "reason": None,
    }
    if target < 2 * chance:
        out["reason"] = (
            f"the baseline never learned (best {100 * target:.1f}%, chance {100 * chance:.0f}%)"
        )
    elif other_steps is None:
        out["reason"] = f"never reached the baseline's best {100 * target:.1f}%"
    elif other_steps == 0 or base_steps is None:
        out["reason"] = "reached at initialization"
    else:
        out["factor"] = base_steps / other_steps
    return out


def schedule_curves(
    exp: Experiment, spec: TrainSpec, norms: Sequence[str], seeds: Sequence[int]
) -> list[ScheduledRun]:
    """Seeds outer, norms inner: an interrupted study has complete pairs."""
    return [
        ScheduledRun(f"{norm}-seed{seed}", norm, seed, spec) for seed in seeds for norm in norms
    ]


def summarize_curves(
    exp: Experiment, runs: list[dict[str, Any]], norms: Sequence[str], given: SummaryInputs
) -> dict[str, Any]:
    base = baseline(norms)
    per_norm = {}
    for norm in norms:
        mine = [r for r in runs if r["norm"] == norm]
        per_norm[norm] = {
            "final_accuracy": mean_std([final_accuracy(r) for r in mine]),
            "best_accuracy": mean_std(
                [
                    max((a for a in r["curve"]["test_accuracy"] if a is not None), default=None)
                    for r in mine
                ]
            ),
            "final_loss": mean_std(
                [r["curve"]["test_loss"][-1] if r["curve"]["test_loss"] else None for r in mine]
            ),
            "diverged": sum(r["diverged_at"] is not None for r in mine),
            "runs": len(mine),
        }
    speedups: dict[str, Any] = {}
    for norm in norms:
        if norm == base:
            continue
        pairs = []
        for r in runs:
            if r["norm"] != norm:
                continue
            partner = next((b for b in runs if b["norm"] == base and b["seed"] == r["seed"]), None)
            if partner is not None:
                pairs.append(speedup(partner, r, given.chance))
        factors = [p["factor"] for p in pairs]
        speedups[norm] = {"per_seed": pairs, **mean_std(factors)}
    for norm in norms:
        checks = [r["inference"] for r in runs if r["norm"] == norm and r.get("inference")]
        if checks:
            per_norm[norm]["inference"] = {
                "ema_accuracy": mean_std([c["ema_accuracy"] for c in checks]),
                "recalibrated_accuracy": mean_std([c["recalibrated_accuracy"] for c in checks]),
                "fold_max_abs_logit_diff": max(c["fold_max_abs_logit_diff"] for c in checks),
                "folded_layers": checks[0]["folded_layers"],
                "latency_ratio": {
                    k: mean_std([c["latency"][k]["ratio"] for c in checks])
                    for k in checks[0]["latency"]
                },
            }
    notes = [_speedup_note(speedups, base)]
    gradients = []
    for norm in norms:
        grads = [
            r["grad_norms"]["init"]
            for r in runs
            if r["norm"] == norm and r.get("grad_norms", {}).get("init")
        ]
        if grads:
            first = geometric_mean([g[0] for g in grads])
            last = geometric_mean([g[-1] for g in grads])
            per_norm[norm]["grad_norm_init_first_layer"] = first
            per_norm[norm]["grad_norm_init_last_layer"] = last
            if first is not None and last is not None:
                gradients.append(f"{norm_label(norm)} {first:.1e} → {last:.1e}")
    if gradients:
        notes.append(
            "Gradient norm at initialization, first layer → classifier: "
            + ", ".join(gradients)
            + "."
        )
    headline = {
        "measure": "final test accuracy",
        "short": "final test acc",
        "values": {n: per_norm[n]["final_accuracy"] for n in norms},
        "speedup": {n: {k: s[k] for k in ("mean", "std", "n")} for n, s in speedups.items()},
        "note": " ".join(n for n in notes if n),
    }
    return {"baseline": base, "per_norm": per_norm, "speedup": speedups, "headline": headline}


def _speedup_note(speedups: dict[str, Any], base: str) -> str:
    notes = []
    for norm, s in speedups.items():
        reasons = sorted(
            {p["reason"] for p in s["per_seed"] if p["factor"] is None and p["reason"]}
        )
        if reasons:
            undefined = len(s["per_seed"]) - s["n"]
            notes.append(
                f"{norm_label(norm)} vs {norm_label(base)}: no speed-up for {undefined} of "
                f"{len(s['per_seed'])} seed(s): "
                + "; ".join(reasons)
                + "."
            )
    return " ".join(notes)


def plot_curves(runs: list[dict[str, Any]], norms: Sequence[str], path: Path, title: str) -> Path:
    fig, (acc_ax, loss_ax) = new_figure(10, 3.6, 2)
    for norm in norms:
        mine = [r for r in runs if r["norm"] == norm]
        colour = norm_colour(norm, norms)
        for r in mine:
            acc = [100 * a for a in nan_gaps(r["curve"]["test_accuracy"])]
            acc_ax.plot(r["curve"]["step"], acc, color=colour, alpha=0.25, lw=0.8)
        steps, acc_mean = mean_curve(mine, "test_accuracy")
        acc_ax.plot(
            steps,
            [100 * a for a in acc_mean],
            color=colour,
            lw=2,
            label=f"{norm_label(norm)} (mean of {len(mine)})",
        )
        steps, loss_mean = mean_curve(mine, "train_loss")
        loss_ax.plot(steps, loss_mean, color=colour, lw=2, label=norm_label(norm))
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
    return save_figure(fig, path)


def plot_percentiles(runs: list[dict[str, Any]], norms: Sequence[str], path: Path) -> Path | None:
    shown = [next((r for r in runs if r["norm"] == n and "probe" in r), None) for n in norms]
    pairs = [(n, r) for n, r in zip(norms, shown) if r is not None]
    if not pairs:
        return None
    fig, axes = new_figure(5 * len(pairs), 3.4, len(pairs))
    for ax, (norm, r) in zip(axes, pairs):
        p = r["probe"]
        colour = norm_colour(norm, norms)
        p15, p50, p85 = nan_gaps(p["p15"]), nan_gaps(p["p50"]), nan_gaps(p["p85"])
        ax.fill_between(p["step"], p15, p85, color=colour, alpha=0.18)
        ax.plot(p["step"], p50, color=colour, lw=2, label="50th")
        ax.plot(p["step"], p15, color=colour, lw=1, ls="--", label="15th / 85th")
        ax.plot(p["step"], p85, color=colour, lw=1, ls="--")
        ax.set_title(f"{norm_label(norm)} (seed {r['seed']})")
        ax.set_xlabel("training step")
    axes[0].legend(loc="best", framealpha=0.9)
    axes[0].set_ylabel("input to a last-hidden-layer unit")
    fig.suptitle(
        "Distribution over the test set of one last-hidden-layer unit's input (percentiles)"
    )
    return save_figure(fig, path)


def plot_grad_norms(runs: list[dict[str, Any]], norms: Sequence[str], path: Path) -> Path | None:
    with_norms = [r for r in runs if r.get("grad_norms", {}).get("final")]
    if not with_norms:
        return None
    fig, (ax,) = new_figure(7, 3.8)
    for norm in norms:
        mine = [r for r in with_norms if r["norm"] == norm]
        if not mine:
            continue
        colour = norm_colour(norm, norms)
        for when, style in (("init", "--"), ("final", "-")):
            vectors = [r["grad_norms"][when] for r in mine if r["grad_norms"][when]]
            geo = _geometric_mean_per_layer(vectors)
            layers = len(geo)
            when_text = "at initialization" if when == "init" else "after training"
            label = f"{norm_label(norm)}, {when_text}"
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
    return save_figure(fig, path)


def _geometric_mean_per_layer(vectors: list[list[float | None]]) -> list[float]:
    """Per layer, the geometric mean over the vectors (NaN where none has a positive value)."""
    layers = max((len(v) for v in vectors), default=0)
    means = [geometric_mean(v[i] for v in vectors if i < len(v)) for i in range(layers)]
    return [math.nan if m is None else m for m in means]


def curves_section(name: str, exp: dict[str, Any], norms: list[str], out: Path) -> list[Block]:
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
    headers = ["", *(norm_label(n) for n in norms)]
    rows = [
        [
            "final test accuracy",
            *(format_accuracy(per_norm[n]["final_accuracy"]) for n in norms),
        ],
        [
            "best test accuracy",
            *(format_accuracy(per_norm[n]["best_accuracy"]) for n in norms),
        ],
        ["final test loss", *(format_loss(per_norm[n]["final_loss"]) for n in norms)],
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
                f"Speed-up of {norm_label(norm)} over {norm_label(base)}, as the BN paper "
                f"measures it: the steps {norm_label(base)} needed to reach its best test "
                f"accuracy, divided by the steps {norm_label(norm)} needed to reach that same "
                "accuracy (evaluated every "
                f"{eval_every} steps)."
            )
        )
        rows = [
            [
                str(p["seed"]),
                format_accuracy({"mean": p["target_accuracy"], "std": 0}).split(" ±")[0] + "%",
                format_number(p["baseline_steps"]),
                format_number(p["steps"]),
                f"{p['factor']:.1f}×" if p["factor"] is not None else f"— ({p['reason']})",
            ]
            for p in s["per_seed"]
        ]
        blocks.append(
            Table(
                [
                    "seed",
                    f"{norm_label(base)} best accuracy",
                    f"{norm_label(base)} steps",
                    f"{norm_label(norm)} steps",
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
        Table(["", *(norm_label(n) for n in checked)], rows),
    ]


def _grad_table(runs: list[dict[str, Any]], norms: list[str]) -> Table:
    headers = ["layer"]
    columns: list[list[float]] = []
    for norm in norms:
        mine = [r for r in runs if r["norm"] == norm and r.get("grad_norms", {}).get("final")]
        for when in ("init", "final"):
            vecs = [r["grad_norms"][when] for r in mine]
            if not vecs:
                continue
            headers.append(f"{norm_label(norm)} {'init' if when == 'init' else 'trained'}")
            columns.append(_geometric_mean_per_layer(vecs))
    layers = max((len(c) for c in columns), default=0)
    rows = [
        [
            str(i + 1),
            *(f"{c[i]:.2e}" if i < len(c) and math.isfinite(c[i]) else "—" for c in columns),
        ]
        for i in range(layers)
    ]
    return Table(headers, rows)


CURVES = Kind(schedule_curves, summarize_curves, curves_section)
