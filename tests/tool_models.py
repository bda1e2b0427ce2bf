"""The small conv model that the tests of recalibrate, adapt and diagnose run, and the
inputs its batch norms see computed without bnorm (torch's functional batch norm)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bnorm


def conv_bn_model(out_channels: int = 5) -> nn.Sequential:
    """conv → bnorm's BatchNorm2d(6) → ReLU → 1×1 conv → torch's BatchNorm2d
    (``out_channels``), from seed 0, for 3-channel inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        bnorm.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, out_channels, 1),
        nn.BatchNorm2d(out_channels),
    )


def reference_inputs(
    model: nn.Sequential, batches: list[torch.Tensor]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The inputs each batch norm of a :func:`conv_bn_model` sees, batch by batch
    (float64), computed without bnorm: the first layer normalizes with its batch
    statistics (training mode) via torch's functional."""
    first, second = [], []
    with torch.no_grad():
        for x in batches:
            a = model[0](x)
            bn = model[1]
            normalized = F.batch_norm(a, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
            first.append(a.double().numpy())
            second.append(model[3](F.relu(normalized)).double().numpy())
    return first, second
