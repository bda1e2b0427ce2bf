"""bnorm: batch normalization for PyTorch."""

from . import functional, reference
from .convert import ConversionReport, convert
from .functional import Renorm
from .modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    SyncBatchNorm,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ConversionReport",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "Renorm",
    "SyncBatchNorm",
    "__version__",
    "convert",
    "functional",
    "reference",
]
