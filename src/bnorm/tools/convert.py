"""Swap the batch-norm layers of a model for another family, keeping their state:
:func:`convert` (see its docstring). It is defined with the layers in :mod:`bnorm.modules`,
since torch's API puts a model-level conversion on a layer class too
(``SyncBatchNorm.convert_sync_batchnorm``), and imports only go down."""

from __future__ import annotations

from ..modules import ConversionReport, convert

__all__ = ["ConversionReport", "convert"]
