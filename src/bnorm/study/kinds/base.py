"""What every kind of experiment is made of: the :class:`Experiment` entry, the runs a
kind schedules (:class:`ScheduledRun`), what its summary may read (:class:`SummaryInputs`),
and :class:`Kind` itself — how it schedules, summarizes and reports.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..blocks import Block
from ..spec import TrainSpec

__all__ = [
    "Experiment",
    "Kind",
    "ScheduledRun",
    "Section",
    "SummaryInputs",
    "baseline",
    "final_accuracy",
    "mean_std",
    "schedule_nothing",
]


@dataclass(frozen=True)
class Experiment:
    """One entry of the study. ``spec`` overrides :class:`TrainSpec`'s defaults;
    ``options`` are the kind's (``lrs``, ``batch_sizes``, ``source``, ``norms``, a sweep's
    ``recalibrated``);
    ``follows_model``: ``--model``/``--preset`` replace this experiment's network and
    recipe; ``seeds``: this experiment's own seeds (None: the study's), used unless seeds
    are given (``--seeds``, or ``seeds`` in a config file)."""

    name: str
    kind: str
    title: str
    spec: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    follows_model: bool = False
    about: str = ""
    seeds: list[int] | None = None


@dataclass(frozen=True)
class SummaryInputs:
    """What a summary may need besides its own runs: every experiment's runs (by name),
    the chance accuracy 1/classes and the test labels."""

    runs: dict[str, list[dict[str, Any]]]
    chance: float
    test_labels: list[int]


@dataclass(frozen=True)
class ScheduledRun:
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


def baseline(norms: Sequence[str]) -> str:
    return "none" if "none" in norms else norms[0]


def final_accuracy(run: dict[str, Any]) -> float | None:
    acc = run["curve"]["test_accuracy"]
    return acc[-1] if acc else None


def schedule_nothing(
    exp: Experiment, spec: TrainSpec, norms: Sequence[str], seeds: Sequence[int]
) -> list[ScheduledRun]:
    return []


Schedule = Callable[[Experiment, TrainSpec, Sequence[str], Sequence[int]], list[ScheduledRun]]
Summarize = Callable[
    [Experiment, list[dict[str, Any]], Sequence[str], SummaryInputs], dict[str, Any]
]
# (experiment name, its entry of metrics.json, its norms, the run directory) -> blocks;
# figures are written into the run directory.
Section = Callable[[str, dict[str, Any], list[str], Path], list[Block]]


@dataclass(frozen=True)
class Kind:
    """A kind of experiment: ``schedule`` lists its runs (none for a kind that does not
    train), ``summarize`` turns the finished runs into its summary (with a ``headline``:
    its row of the report's summary table), ``section`` writes its part of the report
    (tables, figures) from its entry of metrics.json. ``trains``: False for a kind that
    measures another experiment's networks (it has no training spec)."""

    schedule: Schedule
    summarize: Summarize
    section: Section
    trains: bool = True
