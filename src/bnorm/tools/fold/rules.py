"""The pairing rules of folding: what can fold into what, checked once for every graph
source (``torch.fx``, ``torch.export``, ``nn.Sequential`` order).

A source finds a candidate pair — a batch norm and the Conv/ConvTranspose/Linear whose
output it reads ("after" it: ``bn(layer(x))``) or that reads its output ("before" it:
``layer(bn(x))``) — and proves that neither has another use. :func:`pair_problem` then
says whether the math of :mod:`.weights` computes the same thing: channel counts, the
channel axis, zero padding, devices. Between the two there may be ops that only move data
without mixing channels (reshape/flatten/view/permute with the channel axis kept whole,
averages over other axes): :func:`axes_through_reshape` and friends follow the channel
axis through them, from shapes, so that a source can prove the axis the batch norm
normalizes is the layer's channel axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct,
    FrozenBatchNorm,
    SyncBatchNorm,
    input_ranks,
)
from ..layers import channel_axis, has_running_stats, is_batch_norm, is_frozen_batch_norm
from .weights import fold_bn_conv_weights, fold_conv_bn_weights

Side = Literal["after", "before"]

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# --------------------------------------------------------------------------------------
# What a source proposes, and what it found


@dataclass(frozen=True)
class ProvenPair:
    """Fold batch norm ``bn`` into ``layer`` (qualified names); ``position`` "after"
    (``bn(layer(x))``) or "before" (``layer(bn(x))``); ``proof``: the source that proved
    single use ("torch.fx", "torch.export", "nn.Sequential")."""

    bn: str
    layer: str
    position: str
    proof: str


@dataclass
class Findings:
    """What one source found: the pairs by batch-norm name, and why the others are kept."""

    pairs: dict[str, ProvenPair] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def note(self, bn_name: str, reason: str) -> None:
        reasons = self.reasons.setdefault(bn_name, [])
        if reason not in reasons:
            reasons.append(reason)

    def add(self, pair: ProvenPair) -> None:
        self.pairs[pair.bn] = pair

    def absorbs_before(self, layer_name: str) -> bool:
        """Whether ``layer_name`` already absorbs a batch norm on its input side."""
        return any(p.layer == layer_name and p.position == "before" for p in self.pairs.values())

    def merge(self, other: Findings) -> None:
        self.pairs.update(other.pairs)
        for name, reasons in other.reasons.items():
            for reason in reasons:
                self.note(name, reason)


# --------------------------------------------------------------------------------------
# The two layers of a pair, as the math sees them


@dataclass(frozen=True)
class NormView:
    """An eval-mode batch norm: ``running_mean``/``running_var``/γ/β/ε, the channel axis
    of its input, and the input ranks its class accepts (None: any)."""

    kind: str
    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    axis: int = 1
    ranks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class LayerView:
    """A convolution (``transposed`` or not) or linear layer: its weight and bias, groups,
    and whether it zero-pads its input."""

    kind: str
    weight: Tensor
    bias: Tensor | None
    linear: bool = False
    transposed: bool = False
    groups: int = 1
    zero_pads: bool = False

    def channels(self, side: Side) -> int:
        """Output channels (the batch norm is "after" the layer) or input channels."""
        w = self.weight
        if self.linear:
            return int(w.shape[0] if side == "after" else w.shape[1])
        if self.transposed:
            return int(w.shape[1] * self.groups if side == "after" else w.shape[0])
        return int(w.shape[0] if side == "after" else w.shape[1] * self.groups)

    def channel_axis(self, rank: int) -> int:
        """The channel axis of its input/output of rank ``rank``: the last for a Linear,
        1 for a convolution (N, C, *spatial)."""
        return rank - 1 if self.linear else 1


def folded_weights(norm: NormView, layer: LayerView, side: Side) -> tuple[Tensor, Tensor]:
    """The (weight, bias) of ``layer`` with ``norm`` folded in on ``side``."""
    tensors = (norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
    if side == "after":
        return fold_conv_bn_weights(
            layer.weight, layer.bias, *tensors, transposed=layer.transposed, groups=layer.groups
        )
    return fold_bn_conv_weights(layer.weight, layer.bias, *tensors, groups=layer.groups)


def norm_view(bn: Any) -> NormView:
    return NormView(
        type(bn).__name__,
        bn.running_mean,
        bn.running_var,
        getattr(bn, "weight", None),
        getattr(bn, "bias", None),
        float(bn.eps),
        channel_axis(bn),
        input_ranks(bn),
    )


def _zero_pads(conv: Any) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular pad with copies of (normalized) values
    return not padding_is_zero(conv.padding, conv.kernel_size, conv.dilation)


def padding_is_zero(padding: Any, kernel_size: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether a convolution's ``padding`` ("valid", "same" or ints) adds no border."""
    if padding == "valid":
        return True
    if padding == "same":
        return all(d * (k - 1) == 0 for d, k in zip(dilation, kernel_size))
    if isinstance(padding, int):
        return padding == 0
    return all(p == 0 for p in padding)


def layer_view(layer: Any) -> LayerView:
    return LayerView(
        type(layer).__name__,
        layer.weight,
        layer.bias,
        linear=isinstance(layer, nn.Linear),
        transposed=isinstance(layer, CONV_T),
        groups=int(getattr(layer, "groups", 1)),
        zero_pads=isinstance(layer, CONV) and _zero_pads(layer),
    )


# --------------------------------------------------------------------------------------
# The rules


def _stock_forward(module: nn.Module, *bases: Any) -> bool:
    return any(isinstance(module, base) and type(module).forward is base.forward for base in bases)


def is_producer(module: nn.Module) -> bool:
    """A plain Conv*/ConvTranspose*/Linear (forward not overridden)."""
    return _stock_forward(module, *CONV, *CONV_T, nn.Linear)


def is_consumer(module: nn.Module) -> bool:
    """A plain Conv*/Linear: mixes its input channels linearly (ConvTranspose does not
    see a constant input the same way at every output position)."""
    return _stock_forward(module, *CONV, nn.Linear)


def is_any_batch_norm(module: nn.Module) -> bool:
    return is_batch_norm(module) or is_frozen_batch_norm(module)


# The forwards of plain batch norm (torch's and bnorm's classes): a trainable batch-norm
# layer that runs one of them is a fixed per-channel affine map in eval mode.
_PLAIN_FORWARDS = {
    cls.forward
    for cls in (
        _BatchNorm,
        nn.SyncBatchNorm,
        BatchNorm,
        BatchNorm1d,
        BatchNorm2d,
        BatchNorm3d,
        SyncBatchNorm,
    )
}


def bn_problem(bn: Any) -> str | None:
    """Why the batch-norm module ``bn`` cannot fold anywhere, or None."""
    if is_frozen_batch_norm(bn):
        if isinstance(bn, FrozenBatchNorm) and not _stock_forward(bn, FrozenBatchNorm):
            return f"{type(bn).__name__} overrides forward (not a plain batch norm)"
        return None  # a fixed affine map
    if isinstance(bn, BatchNormAct):
        return f"{type(bn).__name__} applies an activation (not a plain batch norm)"
    if not is_batch_norm(bn) or type(bn).forward not in _PLAIN_FORWARDS:
        return f"{type(bn).__name__} overrides forward (not a plain batch norm)"
    if not has_running_stats(bn) or not getattr(bn, "track_running_stats", True):
        return "it normalizes with batch statistics in eval mode (track_running_stats=False)"
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return "it is a lazy layer that has not been initialized yet"
    return None


def layer_problem(layer: Any, side: Side) -> str | None:
    """Why the module ``layer`` cannot take a batch norm on ``side``, or None."""
    kind = type(layer).__name__
    if side == "after" and not is_producer(layer):
        return f"expected a Conv/ConvTranspose/Linear (got {kind})"
    if side == "before" and not is_consumer(layer):
        return f"expected a Conv/Linear (got {kind})"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"{kind} is lazy and not initialized yet"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return f"{kind} has parametrized weights"
    return None


def has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _normalizes_channel_axis(norm: NormView, layer: LayerView) -> bool:
    """Without shapes: whether ``norm`` normalizes the axis ``layer`` produces/consumes
    channels on: axis 1 of (N, C, *spatial) for a convolution, the last axis for a Linear.
    A batch norm with channel axis 1 that accepts 2D input is taken to normalize a
    Linear's features: the (N, features) input is the only one on which that is so."""
    axis, ranks = norm.axis, norm.ranks
    if layer.linear:
        if axis == -1:
            return True
        return axis in (1, -1) and (ranks is None or 2 in ranks)
    conv_rank = layer.weight.dim()  # (N, C, *spatial) has as many dims as the weight
    if axis % conv_rank != 1:
        return False
    return ranks is None or conv_rank in ranks


def pair_problem(
    norm: NormView, layer: LayerView, side: Side, *, axis_proven: bool = False
) -> str | None:
    """Why ``norm`` cannot fold into ``layer`` on ``side`` — "after" (``bn(layer(x))``) or
    "before" (``layer(bn(x))``) — or None. ``axis_proven``: the source followed the
    channel axis through the shapes (else the classes decide, see
    :func:`_normalizes_channel_axis`)."""
    kind = layer.kind
    if not axis_proven and not _normalizes_channel_axis(norm, layer):
        role = "output" if side == "after" else "input"
        return f"its channel axis is not the {role}-channel axis of {kind}"
    channels = layer.channels(side)
    if norm.running_mean.numel() != channels:
        verb = "outputs" if side == "after" else "takes"
        return f"it has {norm.running_mean.numel()} channels, {kind} {verb} {channels}"
    if side == "before" and layer.zero_pads:
        return (
            f"the {kind} after it zero-pads its input (the border would see 0 "
            "instead of the batch norm's shift), so folding into it is not exact"
        )
    if norm.running_mean.device != layer.weight.device:
        return "it is on another device than its neighbour"
    return None


def module_pair_problem(
    bn: Any, layer: Any, side: Side, *, axis_proven: bool = False
) -> str | None:
    """The check of a pair of modules: every source's last word before a pair is proven."""
    return (
        bn_problem(bn)
        or layer_problem(layer, side)
        or pair_problem(norm_view(bn), layer_view(layer), side, axis_proven=axis_proven)
    )


# --------------------------------------------------------------------------------------
# Following the channel axis through ops that only move data


def axes_through_reshape(
    before: Sequence[int], after: Sequence[int], axes: frozenset[int]
) -> frozenset[int]:
    """Where an axis of shape ``before`` is, whole, in shape ``after`` of a row-major
    reshape (view, flatten, unflatten, squeeze...): axis a maps to b when as many elements
    precede it (∏ before[:a] = ∏ after[:b]) and it keeps its size. An axis merged with or
    split into others maps nowhere (empty set)."""
    out: set[int] = set()
    for a in axes:
        prefix = math.prod(before[:a])
        for b in range(len(after)):
            if math.prod(after[:b]) == prefix and after[b] == before[a]:
                out.add(b)
    return frozenset(out)


def axes_through_permute(dims: Sequence[int], axes: frozenset[int]) -> frozenset[int]:
    """Where an axis goes under ``permute(dims)`` (output axis j is input axis dims[j])."""
    rank = len(dims)
    order = [d % rank for d in dims]
    return frozenset(order.index(a) for a in axes if a in order)


def axes_through_reduce(
    rank: int, reduced: Sequence[int], keepdim: bool, axes: frozenset[int]
) -> frozenset[int]:
    """Where an axis goes when ``reduced`` axes are averaged away (``keepdim``: kept with
    size 1); an axis that is itself averaged maps nowhere."""
    gone = {d % rank for d in reduced}
    out = set()
    for a in axes:
        if a in gone:
            continue
        out.add(a if keepdim else a - sum(1 for d in gone if d < a))
    return frozenset(out)
