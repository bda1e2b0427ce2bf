"""Fold eval-mode batch norm into a neighbouring convolution or linear layer.

* :mod:`.weights` — the math: the batch norm as ``s ⊙ x + t``, composed into the layer
  after or before it (pure tensor functions).
* :mod:`.rules` — what can fold into what: one pair check for every graph source, and the
  channel axis followed through ops that only move data.
* graph sources, each returning its findings: :mod:`.fx` (each parent's forward traced
  symbolically), :mod:`.export` (the whole model captured by ``torch.export`` from an
  example input), :mod:`.sequential` (the order of a plain ``nn.Sequential``).
* :mod:`.api` — :func:`fold`, :func:`fold_conv_bn`, :func:`fold_bn_conv`, :class:`Folded`
  and the report; :mod:`.program` folds an ``ExportedProgram``.
"""

from .api import (
    Folded,
    FoldedLayer,
    FoldReport,
    NotFoldedLayer,
    fold,
    fold_bn_conv,
    fold_conv_bn,
)
from .weights import batch_norm_scale_shift, fold_bn_conv_weights, fold_conv_bn_weights

__all__ = [
    "FoldReport",
    "Folded",
    "FoldedLayer",
    "NotFoldedLayer",
    "batch_norm_scale_shift",
    "fold",
    "fold_bn_conv",
    "fold_bn_conv_weights",
    "fold_conv_bn",
    "fold_conv_bn_weights",
]
