"""bnorm: batch normalization for PyTorch."""

from . import functional, reference
from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "__version__",
    "functional",
    "reference",
]
