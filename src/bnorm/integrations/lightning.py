"""Lightning's ``LayerSync`` plugin with bnorm's :class:`~bnorm.SyncBatchNorm`.

``Trainer(sync_batchnorm=True)`` converts batch norms with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: bnorm's layers are torch batch norms,
so they are converted too, to torch's SyncBatchNorm, which drops bnorm's options (``axis``,
``renorm``, ``skip_nonfinite``, masks) and refuses CPU tensors (gloo). This plugin
converts to bnorm's SyncBatchNorm instead — every option kept, every backend::

    from bnorm.integrations.lightning import BnormSyncBatchNorm

    trainer = Trainer(strategy="ddp", plugins=[BnormSyncBatchNorm()])   # not sync_batchnorm=True

Lightning applies it when a multi-process strategy sets up (single-device runs leave the
model alone) and reverts it at teardown: the original layer objects come back, holding
the trained parameters and statistics. It subclasses ``lightning.pytorch``'s
``LayerSync``; with the older ``pytorch_lightning`` package (no ``lightning`` installed)
it subclasses that one's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..modules import SyncBatchNorm
from ..tools.convert import convert

try:
    from lightning.pytorch.plugins import LayerSync
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning.plugins import LayerSync  # type: ignore[no-redef,assignment]
    except ImportError:
        raise ImportError(
            "bnorm.integrations.lightning needs Lightning: pip install lightning"
        ) from None

__all__ = ["BnormSyncBatchNorm"]


class BnormSyncBatchNorm(LayerSync):  # type: ignore[misc]
    """Synchronize every batch-norm layer with :class:`bnorm.SyncBatchNorm` (statistics of
    the global batch over ``process_group``, default the whole world).

    ``apply`` converts with :func:`bnorm.convert` (parameters and buffers shared, options
    kept; the conversion report is kept as ``self.report``); ``revert`` puts the original
    layers back, with the synchronized layers' current parameters and buffers.
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.report: Any = None
        self._originals: dict[nn.Module, nn.Module] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        originals = {name: m for name, m in model.named_modules()}
        converted, self.report = convert(model, SyncBatchNorm, process_group=self.process_group)
        for name, _, _ in self.report.converted:
            new = converted.get_submodule(name) if name else converted
            self._originals[new] = originals[name]
        return converted

    def revert(self, model: nn.Module) -> nn.Module:
        if model in self._originals:
            return self._restore(model)
        for name, m in list(model.named_modules()):
            if m in self._originals:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, self._restore(m))
        return model

    def _restore(self, synced: nn.Module) -> nn.Module:
        original = self._originals.pop(synced)
        for name, parameter in synced.named_parameters(recurse=False):
            setattr(original, name, parameter)
        for name, buffer in synced.named_buffers(recurse=False):
            if name in original._buffers:
                original._buffers[name] = buffer
        original.train(synced.training)
        return original
