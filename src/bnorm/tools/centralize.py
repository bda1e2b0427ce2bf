"""Weight centralization for the conv/linear layers before batch norm: the companion of
moving-average batch norm (Yan et al., ICLR 2020).

Reduced normalization (``moving_average=``) divides by √E[x²] and does not subtract a
mean; the paper makes the mean of its input small instead, by centering each output
channel's weights over its fan-in::

    W'[o] = W[o] − mean(W[o])      (mean over every axis but the output channel)

so that with inputs of similar mean across the fan-in, the conv's output has mean near 0.
The batch-norm layer cannot change the weight of the layer before it, so this is a
parametrization of that layer (:func:`torch.nn.utils.parametrize.register_parametrization`),
not an option of the batch-norm layer: the conv stays a ``Conv2d`` (fold, export and
``isinstance`` checks see the centered weight as ``conv.weight``), the optimizer keeps
updating the raw weight (``parametrizations.weight.original``), and the gradient reaching
it is the centered gradient — the projection of ∂L/∂W' onto zero-mean weights.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .layers import check_module, is_batch_norm

__all__ = ["CentralizedWeight", "centralize_weights"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class CentralizedWeight(nn.Module):
    """The parametrization W ↦ W − mean(W) per output channel (dim 0), the mean over
    every other axis (the fan-in). Register it with
    ``torch.nn.utils.parametrize.register_parametrization(layer, "weight",
    CentralizedWeight())`` on a conv (not transposed) or linear layer."""

    def forward(self, weight: Tensor) -> Tensor:
        if weight.dim() < 2:
            raise ValueError(
                f"expected a weight of at least 2 dimensions (got {weight.dim()}D weight)"
            )
        return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


def _centralized(layer: nn.Module) -> bool:
    if not parametrize.is_parametrized(layer, "weight"):
        return False
    chain = layer.parametrizations["weight"]  # type: ignore[index,union-attr]
    return any(isinstance(p, CentralizedWeight) for p in chain)


def centralize_weights(model: nn.Module, *, all_layers: bool = False) -> list[str]:
    """Register :class:`CentralizedWeight` on every ``Conv1d/2d/3d`` or ``Linear`` of
    ``model`` that is followed by a batch-norm layer — the next child registered in the
    same parent is a batch-norm layer with as many features as the layer has outputs (a
    ``Sequential``'s order, or a block's ``conv1``, ``bn1``, … attributes). With
    ``all_layers=True``, every such conv/linear layer (what the paper's reference code
    does with all its convolutions). Layers already centralized are left as they are.

    Returns the qualified names of the layers centralized now. In place; the model's
    state_dict then holds ``<layer>.parametrizations.weight.original`` instead of
    ``<layer>.weight`` (``torch.nn.utils.parametrize.remove_parametrizations(layer,
    "weight")`` bakes the centered weight back into a plain one).
    """
    check_module(model, "model")
    chosen: list[tuple[str, nn.Module]] = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if not isinstance(child, (*_CONVS, nn.Linear)) or _centralized(child):
                continue
            after = children[i + 1][1] if i + 1 < len(children) else None
            outputs = child.out_channels if isinstance(child, _CONVS) else child.out_features
            followed = (
                after is not None
                and is_batch_norm(after)
                and getattr(after, "num_features", None) == outputs
            )
            if all_layers or followed:
                chosen.append((f"{parent_name}.{name}" if parent_name else name, child))
    seen: set[int] = set()
    names = []
    for name, layer in chosen:
        if id(layer) in seen:  # (a layer shared by two parents)
            continue
        seen.add(id(layer))
        parametrize.register_parametrization(layer, "weight", CentralizedWeight())
        names.append(name)
    return names
