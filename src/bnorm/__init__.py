"""bnorm: batch normalization for PyTorch."""

from . import functional, kernels, reference
from .functional import MovingAverage, Renorm
from .kernels.memory import memory_saving
from .modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    SyncBatchNorm,
)
from .tools import (
    Accumulation,
    AdaptationReport,
    CalibrationReport,
    ConversionReport,
    DiagnosisReport,
    FoldReport,
    StatisticsRecorder,
    accumulate,
    adapt,
    convert,
    diagnose,
    fold,
    recalibrate,
)

__version__ = "0.1.0"

__all__ = [
    "Accumulation",
    "AdaptationReport",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "CalibrationReport",
    "ConversionReport",
    "DiagnosisReport",
    "FoldReport",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "MovingAverage",
    "Renorm",
    "StatisticsRecorder",
    "SyncBatchNorm",
    "__version__",
    "accumulate",
    "adapt",
    "convert",
    "diagnose",
    "fold",
    "functional",
    "kernels",
    "memory_saving",
    "recalibrate",
    "reference",
]
