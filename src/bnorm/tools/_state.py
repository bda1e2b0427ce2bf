"""Put a model back as it was: the one save/restore of the state a tool changes while it
runs (training flags, momentum, buffers, requires_grad and gradients, parameter values,
hooks), used by recalibrate, diagnose, adapt and accumulate."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["COUNTERS", "SavedState"]

#: The counting buffers of a batch-norm layer (torch's and bnorm's).
COUNTERS = ("num_batches_tracked", "num_batches_skipped")


class SavedState:
    """A snapshot, taken on construction, of what a tool may change in a model:

    * ``module``: the ``training`` flag of each of its modules;
    * ``layers``: each layer's ``momentum`` (if it has one) and a copy of its buffers;
    * ``parameters``: each one's ``requires_grad`` and ``grad``;
    * ``values``: a copy of each tensor's values (e.g. γ, β that the tool trains);
    * hooks handed to :meth:`add_hook` (removed on restore).

    As a context manager it restores everything on exit — the values only when an
    exception leaves the block (a tool that trains them keeps its result) — also when an
    exception leaves it. The ``restore_*`` methods put back one part each, for tools
    whose exit restores selectively (:func:`bnorm.accumulate`).
    """

    def __init__(
        self,
        module: nn.Module | None = None,
        layers: Iterable[nn.Module] = (),
        *,
        parameters: Iterable[nn.Parameter] = (),
        values: Iterable[Tensor] = (),
    ) -> None:
        self.training = [(m, m.training) for m in module.modules()] if module is not None else []
        self.layers: list[tuple[nn.Module, dict[str, Tensor]]] = []
        self.momenta: list[tuple[nn.Module, Any]] = []
        for layer in layers:
            self.layers.append(
                (layer, {k: v.detach().clone() for k, v in layer._buffers.items() if v is not None})
            )
            if hasattr(layer, "momentum"):
                self.momenta.append((layer, layer.momentum))
        self.parameters = [(p, p.requires_grad, p.grad) for p in parameters]
        self.values = [(t, t.detach().clone()) for t in values]
        self.hooks: list[Any] = []

    def buffers(self, layer: nn.Module) -> dict[str, Tensor]:
        """The saved copies of ``layer``'s buffers, by name."""
        for saved, buffers in self.layers:
            if saved is layer:
                return buffers
        raise KeyError(f"no saved state for {type(layer).__name__}")

    def add_hook(self, handle: Any) -> None:
        """Remove the hook of ``handle`` (a ``RemovableHandle``) on restore."""
        self.hooks.append(handle)

    def __enter__(self) -> SavedState:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore(values=exc_type is not None)

    def restore(self, *, values: bool = True) -> None:
        """Put everything back (the values too unless ``values=False``)."""
        self.remove_hooks()
        self.restore_training()
        self.restore_momenta()
        self.restore_buffers()
        if values:
            self.restore_values()
        self.restore_parameters()

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()

    def restore_training(self) -> None:
        for m, flag in self.training:
            m.training = flag

    def restore_momenta(self) -> None:
        for layer, momentum in self.momenta:
            layer.momentum = momentum

    def restore_buffers(self, keys: Iterable[str] | None = None) -> None:
        """Copy the saved buffers back (only those named in ``keys`` if given)."""
        wanted = None if keys is None else set(keys)
        with torch.no_grad():
            for layer, buffers in self.layers:
                for key, value in buffers.items():
                    buffer = layer._buffers.get(key)
                    if buffer is not None and (wanted is None or key in wanted):
                        buffer.copy_(value)

    def restore_values(self) -> None:
        with torch.no_grad():
            for tensor, value in self.values:
                tensor.copy_(value)

    def restore_parameters(self) -> None:
        for p, flag, _ in self.parameters:
            p.requires_grad_(flag)
        for p, _, grad in self.parameters:
            p.grad = grad
