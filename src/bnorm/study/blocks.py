"""The report's building blocks, shared by every kind's section: the blocks a document
is made of (:class:`Heading`, :class:`Para`, :class:`Table`, :class:`Figure`), how
numbers are written (``97.1 ± 0.4%``), and the figures' common parts (a norm's colour
and label, a blank figure, the mean curve over runs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import NORM_LABELS

__all__ = [
    "Block",
    "Figure",
    "Heading",
    "Para",
    "Table",
    "format_accuracy",
    "format_loss",
    "format_number",
    "format_percent",
    "format_speedup",
    "mean_curve",
    "nan_gaps",
    "new_figure",
    "norm_colour",
    "norm_label",
    "save_figure",
]

_COLOURS = {
    "none": "#d9730d",
    "bn": "#1f6fb2",
    "renorm": "#2e9e4f",
    "ghost": "#8e44ad",
    "syncbn": "#16a085",
    "ln": "#c0392b",
    "gn": "#b7950b",
    "mabn": "#222222",
    "bn+recalibrated": "#5dade2",
}
_FALLBACK = ["#c0392b", "#16a085", "#7f8c8d", "#b7950b"]


def norm_label(norm: str) -> str:
    """How ``norm`` is named in reports (:data:`bnorm.study.models.NORM_LABELS`); a
    column ``"norm+measure"`` not listed there is ``"<norm's label>, measure"``."""
    if norm in NORM_LABELS:
        return NORM_LABELS[norm]
    base, plus, measure = norm.partition("+")
    return f"{NORM_LABELS.get(base, base)}, {measure}" if plus else norm


def norm_colour(norm: str, norms: Sequence[str]) -> str:
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


def format_loss(stats: dict[str, Any]) -> str:
    if stats.get("mean") is None:
        return "—"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def format_percent(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def nan_gaps(values: Sequence[float | None]) -> list[float]:
    """Plot-ready values: None (no number, e.g. after a divergence) becomes NaN (a gap)."""
    return [math.nan if v is None else float(v) for v in values]


def format_number(v: Any, digits: int = 3) -> str:
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


# -------------------------------------------------------------------------- figures


def new_figure(width: float, height: float, panels: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def save_figure(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Mean over runs of ``curve[key]`` at each evaluated step, over the runs that have a
    number there (a diverged run stops early)."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for step, value in zip(r["curve"]["step"], r["curve"][key]):
            if value is not None:
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]
