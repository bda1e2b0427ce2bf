"""Which modules are batch-norm layers: the one predicate and the one walk every tool uses.

A *trainable* batch-norm layer is a ``torch.nn.modules.batchnorm._BatchNorm``: torch's
``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and lazy layers, and every bnorm layer but the
frozen ones (bnorm's layers subclass torch's). A *frozen* batch norm is bnorm's
:class:`~bnorm.FrozenBatchNorm` or a look-alike such as torchvision's ``FrozenBatchNorm2d``:
fixed statistics, nothing to recompute. The two predicates and the walk are defined with
the layers in :mod:`bnorm.modules` (layer conversion uses them too) and exported here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._math import Moments, population_statistics
from ..modules import batch_norm_layers, is_batch_norm, is_frozen_batch_norm

__all__ = [
    "batch_norm_layers",
    "channel_axis",
    "check_module",
    "has_running_stats",
    "is_batch_norm",
    "is_frozen_batch_norm",
    "layer_statistics",
]


def check_module(module: object, name: str = "module") -> None:
    """Raise a TypeError unless ``module`` is a ``torch.nn.Module``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected {name} to be a torch.nn.Module (got {type(module).__name__})")


def channel_axis(layer: nn.Module) -> int:
    """The channel axis of a batch-norm layer's input (bnorm's ``axis``; 1 for torch's)."""
    return int(getattr(layer, "axis", 1))


def has_running_stats(layer: nn.Module) -> bool:
    """Whether ``layer`` holds ``running_mean`` and ``running_var`` tensors."""
    return isinstance(getattr(layer, "running_mean", None), Tensor) and isinstance(
        getattr(layer, "running_var", None), Tensor
    )


def layer_statistics(
    layer: Any, moments: Moments, *, unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    """The (mean, variance) ``layer``'s running statistics stand for, from the moments of
    its inputs (:func:`bnorm._math.population_statistics`): the inputs' mean and variance
    for batch norm; (0, the second moment) for a moving-average layer, which normalizes
    with the uncentered second moment. Every tool that writes or compares running
    statistics asks this."""
    reduced = getattr(layer, "moving_average", None) is not None
    return population_statistics(moments, reduced=reduced, unbiased=unbiased)
