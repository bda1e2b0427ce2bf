"""Experiment kinds: how an experiment's runs are scheduled and how they are summarized.

An *experiment* (an entry of :data:`bnorm.study.experiments.EXPERIMENTS`) names a *kind* from
:data:`KINDS` and gives it a training spec and options. Five kinds exist:

* ``curves`` — one run per (seed, norm): test accuracy/loss against steps, the probe
  unit's percentiles, per-layer gradient norms if the spec asks for them, and the
  speed-up of each norm over the baseline (see :func:`speedup`).
* ``lr_sweep`` / ``batch_sweep`` (:data:`SWEEPS`) — one run per (grid value, seed, norm)
  on the grid ``options["lrs"]`` / ``options["batch_sizes"]``: final accuracy per value.
* ``disagreement`` — no training: compares the final test predictions of the baseline
  and each other norm in the experiment ``options["source"]``, seed by seed.
* ``shift`` — no training: the final networks of ``options["source"]`` on corrupted test
  sets (:mod:`bnorm.study.shift`, measured at the end of those runs, which the source
  experiment does when ``shift`` is selected), as trained and after :func:`bnorm.adapt`.
* ``accumulation`` — gradient accumulation (``micro_batches`` per step): two runs per
  (seed, norm), identical but for the running statistics — updated by the layers per
  micro-batch (torch's behaviour) or once per step by :func:`bnorm.accumulate` — with
  their final test accuracy and the drift of their running statistics from the exact
  training-set statistics (``stats_check``).

Every summary works on whatever runs have finished (an interrupted study reports what
it has), and every experiment summary carries a ``headline`` — the row of the report's
summary table.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .models import NORM_LABELS
from .train import TrainSpec

__all__ = [
    "ACCUMULATION_ARMS",
    "KINDS",
    "SWEEPS",
    "Experiment",
    "Kind",
    "PlannedRun",
    "SummaryInputs",
    "Sweep",
    "mean_std",
    "speedup",
    "steps_to_reach",
]


@dataclass(frozen=True)
class Experiment:
    """One entry of the study. ``spec`` overrides :class:`TrainSpec`'s defaults;
    ``options`` are the kind's (``lrs``, ``batch_sizes``, ``source``, ``norms``); ``follows_model``:
    ``--model``/``--preset`` replace this experiment's network and recipe."""

    name: str
    kind: str
    title: str
    spec: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    follows_model: bool = False
    about: str = ""


@dataclass(frozen=True)
class SummaryInputs:
    """What a summary may need besides its own runs: every experiment's runs (by name),
    the chance accuracy 1/classes and the test labels."""

    runs: dict[str, list[dict[str, Any]]]
    chance: float
    test_labels: list[int]


@dataclass(frozen=True)
class PlannedRun:
    """A run to do: its checkpoint tag, norm, seed and full training spec."""

    tag: str
    norm: str
    seed: int
    spec: TrainSpec


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1) of the finite values; std 0 for one."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "n": len(finite)}


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


def _label(norm: str) -> str:
    return NORM_LABELS.get(norm, norm)


def _baseline(norms: Sequence[str]) -> str:
    return "none" if "none" in norms else norms[0]


def _final_accuracy(run: dict[str, Any]) -> float | None:
    acc = run["curve"]["test_accuracy"]
    return acc[-1] if acc else None


# -------------------------------------------------------------------------- planning


def plan_curves(
    exp: Experiment, spec: TrainSpec, norms: Sequence[str], seeds: Sequence[int]
) -> list[PlannedRun]:
    """Seeds outer, norms inner: an interrupted study has complete pairs."""
    return [PlannedRun(f"{norm}-seed{seed}", norm, seed, spec) for seed in seeds for norm in norms]


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


def plan_sweep(
    exp: Experiment, spec: TrainSpec, norms: Sequence[str], seeds: Sequence[int]
) -> list[PlannedRun]:
    sweep = SWEEPS[exp.kind]
    return [
        PlannedRun(
            f"{norm}-{sweep.field}{v:g}-seed{seed}",
            norm,
            seed,
            replace(spec, **{sweep.field: sweep.cast(v)}),
        )
        for v in exp.options.get(sweep.option, [])
        for seed in seeds
        for norm in norms
    ]


def plan_nothing(
    exp: Experiment, spec: TrainSpec, norms: Sequence[str], seeds: Sequence[int]
) -> list[PlannedRun]:
    return []


# ------------------------------------------------------------------------- summaries


def summarize_curves(
    exp: Experiment, runs: list[dict[str, Any]], norms: Sequence[str], given: SummaryInputs
) -> dict[str, Any]:
    base = _baseline(norms)
    per_norm = {}
    for norm in norms:
        mine = [r for r in runs if r["norm"] == norm]
        per_norm[norm] = {
            "final_accuracy": mean_std([_final_accuracy(r) for r in mine]),
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
            first = _geometric_mean([g[0] for g in grads])
            last = _geometric_mean([g[-1] for g in grads])
            per_norm[norm]["grad_norm_init_first_layer"] = first
            per_norm[norm]["grad_norm_init_last_layer"] = last
            if first is not None and last is not None:
                gradients.append(f"{_label(norm)} {first:.1e} → {last:.1e}")
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


def _geometric_mean(values: Sequence[float | None]) -> float | None:
    logs = [math.log(v) for v in values if v is not None and v > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None


def _speedup_note(speedups: dict[str, Any], base: str) -> str:
    notes = []
    for norm, s in speedups.items():
        reasons = sorted(
            {p["reason"] for p in s["per_seed"] if p["factor"] is None and p["reason"]}
        )
        if reasons:
            undefined = len(s["per_seed"]) - s["n"]
            notes.append(
                f"{_label(norm)} vs {_label(base)}: no speed-up for {undefined} of "
                f"{len(s['per_seed'])} seed(s): "
                + "; ".join(reasons)
                + "."
            )
    return " ".join(notes)


def summarize_sweep(
    exp: Experiment, runs: list[dict[str, Any]], norms: Sequence[str], given: SummaryInputs
) -> dict[str, Any]:
    sweep = SWEEPS[exp.kind]
    values = [sweep.cast(v) for v in exp.options.get(sweep.option, [])]
    table = []
    for v in values:
        row: dict[str, Any] = {sweep.field: v}
        for norm in norms:
            mine = [r for r in runs if r["norm"] == norm and r.get(sweep.field) == v]
            row[norm] = {
                **mean_std([_final_accuracy(r) for r in mine]),
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
            accs = [_final_accuracy(r) for r in runs if r["norm"] == norm and r["seed"] == seed]
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
            f"{_label(norm)} {100 * smallest[norm]['mean']:.1f}%"
            for norm in norms
            if smallest[norm]["mean"] is not None
        )
    else:
        note = "trains (final accuracy ≥ 90% of the best) at " + ", ".join(
            f"{len(per_norm[norm]['values_that_train'])} of {len(values)} {sweep.label}s "
            f"with {_label(norm)}"
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
        "values": values,
        "table": table,
        "per_norm": per_norm,
        "best_mean_accuracy": best,
        "headline": headline,
    }


def summarize_disagreement(
    exp: Experiment, runs: list[dict[str, Any]], norms: Sequence[str], given: SummaryInputs
) -> dict[str, Any]:
    source_name = exp.options.get("source", "curves")
    src_runs = [r for r in given.runs.get(source_name, []) if "predictions" in r]
    labels = given.test_labels
    base = _baseline(norms)
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
            pairs[norm].append(_disagreement(b["predictions"], r["predictions"], labels, r["seed"]))
    values: dict[str, Any] = {}
    notes = []
    for norm, ps in pairs.items():
        values[base] = mean_std([p["baseline_accuracy_on_disagreements"] for p in ps])
        values[norm] = mean_std([p["accuracy_on_disagreements"] for p in ps])
        rate = mean_std([p["rate"] for p in ps])
        if rate["n"]:
            notes.append(
                f"{_label(norm)} and {_label(base)} disagree on {100 * rate['mean']:.1f} ± "
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


def _disagreement(
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
    labels = {key: f"{_label(norm)} {SHIFT_METHODS[method]}" for key, norm, method in columns}
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
# ------------------------------------------------------------------- accumulation

# The two arms of an accumulation experiment: how the running statistics are updated.
ACCUMULATION_ARMS: dict[str, bool] = {"per_micro": False, "accumulate": True}
ACCUMULATION_LABELS = {
    "per_micro": "per micro-batch (torch)",
    "accumulate": "once per step (bnorm.accumulate)",
}


def plan_accumulation(
    exp: Experiment, spec: TrainSpec, norms: Sequence[str], seeds: Sequence[int]
) -> list[PlannedRun]:
    """Two runs per (seed, norm), identical but for the running statistics: updated by
    the layers per micro-batch (torch's behaviour), or once per step by bnorm.accumulate."""
    return [
        PlannedRun(
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
                "final_accuracy": mean_std([_final_accuracy(r) for r in mine]),
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
                f"{_label(norm)}: drift of the running statistics from the training set's (KL, "
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


@dataclass(frozen=True)
class Kind:
    plan: Callable[[Experiment, TrainSpec, Sequence[str], Sequence[int]], list[PlannedRun]]
    summarize: Callable[
        [Experiment, list[dict[str, Any]], Sequence[str], SummaryInputs], dict[str, Any]
    ]
    trains: bool = True


KINDS: dict[str, Kind] = {
    "curves": Kind(plan_curves, summarize_curves),
    **{name: Kind(plan_sweep, summarize_sweep) for name in SWEEPS},
    "disagreement": Kind(plan_nothing, summarize_disagreement, trains=False),
    "shift": Kind(plan_nothing, summarize_shift, trains=False),
    "accumulation": Kind(plan_accumulation, summarize_accumulation),
}
