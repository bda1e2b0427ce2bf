"""Experiment kinds: how an experiment's runs are scheduled, summarized and reported.

An *experiment* (an entry of :data:`bnorm.study.experiments.EXPERIMENTS`) names a *kind*
from :data:`KINDS` and gives it a training spec and options. Each kind is one module of
this package and one :class:`~bnorm.study.kinds.base.Kind` — its schedule, its summary
and its section of the report — registered here:

* ``curves`` (:mod:`~bnorm.study.kinds.curves`) — one run per (seed, norm): test
  accuracy/loss against steps, the probe unit's percentiles, per-layer gradient norms if
  the spec asks for them, and the speed-up of each norm over the baseline.
* ``lr_sweep`` / ``batch_sweep`` (:mod:`~bnorm.study.kinds.sweeps`) — one run per (grid
  value, seed, norm) on the grid ``options["lrs"]`` / ``options["batch_sizes"]``: final
  accuracy per value.
* ``disagreement`` (:mod:`~bnorm.study.kinds.disagreement`) — no training: compares the
  final test predictions of the baseline and each other norm in the experiment
  ``options["source"]``, seed by seed.
* ``shift`` (:mod:`~bnorm.study.kinds.shift`) — no training: the final networks of
  ``options["source"]`` on corrupted test sets, as trained and after :func:`bnorm.adapt`.
* ``accumulation`` (:mod:`~bnorm.study.kinds.accumulation`) — gradient accumulation:
  two runs per (seed, norm), identical but for how the running statistics are updated.

Every summary works on whatever runs have finished (an interrupted study reports what
it has), and carries a ``headline`` — the row of the report's summary table. A new kind
is a module with its three functions and one entry in :data:`KINDS`.
"""

from __future__ import annotations

from .accumulation import ACCUMULATION
from .base import Experiment, Kind, ScheduledRun, SummaryInputs, mean_std
from .curves import CURVES
from .disagreement import DISAGREEMENT
from .shift import SHIFT
from .sweeps import SWEEP, SWEEPS, Sweep

__all__ = [
    "KINDS",
    "SWEEPS",
    "Experiment",
    "Kind",
    "ScheduledRun",
    "SummaryInputs",
    "Sweep",
    "mean_std",
]

KINDS: dict[str, Kind] = {
    "curves": CURVES,
    **{name: SWEEP for name in SWEEPS},
    "disagreement": DISAGREEMENT,
    "shift": SHIFT,
    "accumulation": ACCUMULATION,
}
