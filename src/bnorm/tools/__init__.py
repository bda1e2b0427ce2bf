"""Train ↔ test tools for the batch-norm layers of a whole model.

* :mod:`~bnorm.tools.convert` — swap the batch-norm layers for another family
  (bnorm's, torch's, frozen, synchronized, fused with an activation).
* :mod:`~bnorm.tools.calibrate` — exact population statistics (precise BN).
* :mod:`~bnorm.tools.diagnose` — running statistics vs the data, layer by layer; a
  recorder of per-layer input statistics during training.
* :mod:`~bnorm.tools.fold` — fold eval-mode batch norm into a neighbouring conv/linear.
* :mod:`~bnorm.tools.adapt` — test-time adaptation (BN statistics, prior, Tent).
* :mod:`~bnorm.tools.accumulate` — one running-statistics update per optimizer step
  under gradient accumulation.
* :mod:`~bnorm.tools.centralize` — weight centralization of the conv/linear layers before
  batch norm (the companion of moving-average batch norm).

They share :mod:`~bnorm.tools.layers` (what a batch-norm layer is: one predicate, one walk),
``_inputs`` (argument checks, feeding batches, collecting the moments of each layer's
input, also across ranks) and ``_state`` (putting a model back as it was).
"""

from .accumulate import Accumulation, accumulate
from .adapt import AdaptationReport, adapt
from .calibrate import CalibrationReport, recalibrate
from .centralize import CentralizedWeight, centralize_weights
from .convert import ConversionReport, convert
from .diagnose import DiagnosisReport, StatisticsRecorder, diagnose
from .fold import FoldReport, fold
from .layers import batch_norm_layers, is_batch_norm, is_frozen_batch_norm

__all__ = [
    "Accumulation",
    "AdaptationReport",
    "CalibrationReport",
    "CentralizedWeight",
    "ConversionReport",
    "DiagnosisReport",
    "FoldReport",
    "StatisticsRecorder",
    "accumulate",
    "adapt",
    "batch_norm_layers",
    "centralize_weights",
    "convert",
    "diagnose",
    "fold",
    "is_batch_norm",
    "is_frozen_batch_norm",
    "recalibrate",
]
