"""Layouts: any tensor viewed as a contiguous (A_outer, A_inner, C, B) tensor in memory
order (NCHW is (N, 1, C, H·W), channels_last (N, H·W, C, 1)), and per-channel views of
(C,) vectors against it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# --- layout: any tensor as a contiguous (A, C, B) view ---------------------------------


@dataclass(frozen=True)
class _Layout:
    """How a tensor with channels at dim 1 maps to a contiguous (A, C, B) tensor: permute
    its dims to memory order (``perm``), then merge the dims before/after the channel."""

    perm: tuple[int, ...]
    permuted_shape: tuple[int, ...]
    a: int
    b: int
    a_outer: int  # A = a_outer · a_inner: the first dim, and the rest before the channel
    a_inner: int
    dense: bool  # the tensor is this (A, C, B) memory as it is: no copy to view it so

    @staticmethod
    def of(x: Tensor) -> _Layout:
        if torch.compiler.is_compiling():
            return _Layout.compute(x)
        key = (x.shape, x.stride())
        layout = _LAYOUTS.get(key)
        if layout is None:
            if len(_LAYOUTS) > 256:
                _LAYOUTS.clear()
            layout = _LAYOUTS[key] = _Layout.compute(x)
        return layout

    @staticmethod
    def compute(x: Tensor) -> _Layout:
        # Dims by decreasing stride, ties in dim order: an insertion sort of plain
        # comparisons, which Dynamo traces for symbolic strides (sorted() with a key not).
        stride = x.stride()
        order = list(range(x.dim()))
        for i in range(1, len(order)):
            j = i
            while j > 0 and stride[order[j - 1]] < stride[order[j]]:
                order[j - 1], order[j] = order[j], order[j - 1]
                j -= 1
        perm = tuple(order)
        dense = x.permute(perm).is_contiguous()
        if not dense:
            perm = tuple(range(x.dim()))
        shape = tuple(x.shape[d] for d in perm)
        p = perm.index(1)
        a = math.prod(shape[:p])
        a_outer = shape[0] if p >= 2 else a
        return _Layout(
            perm, shape, a, math.prod(shape[p + 1 :]), a_outer, a // max(a_outer, 1), dense
        )

    def to3d(self, t: Tensor) -> Tensor:
        """``t`` (x's logical shape, any layout) as the contiguous (A, C, B) tensor."""
        tp = t.permute(self.perm)
        if not tp.is_contiguous():
            tp = tp.contiguous()
        return tp.view(self.a, self.permuted_shape[self.perm.index(1)], self.b)

    def split(self, t3: Tensor) -> Tensor:
        """The (A, C, B) tensor as (A_outer, A_inner, C, B): for channels_last, one sample's
        rows per A_outer index, so the kernels' reductions work on cache-sized blocks."""
        return t3.view(self.a_outer, self.a_inner, t3.shape[1], self.b)

    def from3d(self, t3: Tensor) -> Tensor:
        inverse = [0] * len(self.perm)
        for i, d in enumerate(self.perm):
            inverse[d] = i
        return t3.view(self.permuted_shape).permute(inverse)


_LAYOUTS: dict[tuple[Any, ...], _Layout] = {}


# --- the kernels as torch functions ----------------------------------------------------


def _per_channel(v: Tensor) -> Tensor:
    """A (C,) vector for broadcasting against the kernels' (A_outer, A_inner, C, B) tensors."""
    return v[None, None, :, None]


def _per_channel3(v: Tensor) -> Tensor:
    """A (C,) vector for broadcasting against an (A, C, B) tensor."""
    return v[None, :, None]


# The kernels return their per-channel coefficients as extra outputs: a graph output is
# stored once, while an intermediate (C,) value would be recomputed for every element of
# the loop that uses it (Inductor inlines pointwise work into its consumers).


def _channel_sum(t: Tensor) -> Tensor:
    """Σ over every dim but the channel (2) of an (A_outer, A_inner, C, B) tensor, in two
    stages: the contiguous rows (B, or else A_inner) in the tensor's dtype, then the
    partial sums in float64 — as accurate as converting every element and much faster,
    and the first stage works on one cache-sized block at a time."""
    if t.shape[3] > 1:
        return t.sum(3).to(torch.float64).sum((0, 1))
    if t.shape[1] > 1:
        return t.sum(1).to(torch.float64).sum((0, 2))
    return t.to(torch.float64).sum((0, 1, 3))


def _split(layout: _Layout, *tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else layout.split(t) for t in tensors]
