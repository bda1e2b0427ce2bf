"""Differentiable eager ops on torch tensors, channels at any axis: per-channel moments,
their pooling, normalization, Batch Renormalization's correction, the activation tail
act(y + residual), and the moments path built from them (its composite form, which the
fused moments kernel's double backward differentiates and an enclosing torch.compile
traces). Statistics are computed in float32 (float64 for float64 inputs)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._math import Moments, pool, renorm_rd
from .distributed import all_gather_differentiable
from .options import Activation

__all__ = [
    "activation_tail",
    "merge_moments",
    "moments",
    "normalize",
    "pool_moments",
    "renorm_correction",
]

def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in for an input of ``dtype``: float32, float64
    for float64 inputs. (The mixed-dtype rule: statistics in this dtype, the output in the
    input's; see ``bnorm.functional._check_dtypes``.)"""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_axis(ndim: int, axis: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"expected a channel axis in [{-ndim}, {ndim - 1}] for a {ndim}D input "
            f"(got axis={axis})"
        )
    return axis % ndim


def _expand(v: Tensor, ndim: int, dims: tuple[int, ...]) -> Tensor:
    """View ``v`` (whose dimensions are ``dims`` of a rank-``ndim`` tensor) for broadcasting."""
    shape = [1] * ndim
    for d, size in zip(dims, v.shape):
        shape[d] = size
    return v.reshape(shape)


def _moments_keep(xs: Tensor, keep: tuple[int, ...], valid: Tensor | None) -> Moments:
    """(count, mean, M2) over every dimension of ``xs`` not in ``keep`` (sorted);
    ``valid`` broadcasts against ``xs`` (True = counts)."""
    dims = [d for d in range(xs.dim()) if d not in keep]
    out_shape = [xs.shape[d] for d in keep]
    if valid is None:
        n = 1
        for d in dims:
            n *= xs.shape[d]
        if n == 0:
            zeros = xs.new_zeros(out_shape)
            return Moments(zeros, zeros, zeros)
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        return Moments(torch.full_like(mean, float(n)), mean, var * n)
    zero = xs.new_zeros(())
    count = valid.to(xs.dtype).sum(dim=dims, keepdim=True)
    safe = count.clamp_min(1)
    mean = torch.where(valid, xs, zero).sum(dim=dims, keepdim=True) / safe
    centered = torch.where(valid, xs - mean, zero)
    # One correction step (the corrected two-pass algorithm): the rounding error of the
    # first mean, Σ(x − μ̃)/m, moves the mean and comes off M2 as m·shift².
    shift = centered.sum(dim=dims, keepdim=True) / safe
    # (Non-negative in exact arithmetic; clamp the rounding of a near-constant channel.)
    m2 = (centered.square().sum(dim=dims, keepdim=True) - count * shift.square()).clamp_min(0)
    mean = mean + shift
    # The mask has no channel axis: expand the count over the channels.
    count = count.expand_as(mean)
    return Moments(count.reshape(out_shape), mean.reshape(out_shape), m2.reshape(out_shape))


def moments(
    x: Tensor, axis: int = 1, mask: Tensor | None = None, groups: int | None = None
) -> Moments:
    """Per-channel (count, mean, M2) of ``x`` over every axis but ``axis``.

    With a boolean ``mask`` (the shape of ``x`` without the channel axis; True = valid),
    only valid positions count: m = Σ mask, μ = Σ_valid x / m, M2 = Σ_valid (x − μ)².
    Invalid positions may hold anything, NaN included. A channel with no valid value has
    count 0, mean 0 and M2 0. With ``groups=G`` the samples (dimension 0) are split into
    G consecutive groups of equal size, each with its own moments (ghost batches).
    Computed in float32 or wider.

    Shape:
        x: any rank ≥ 2 with C channels at ``axis`` (not 0 with ``groups``); mask: x's
        shape without ``axis``; returns (C,) tensors, or (G, C) with ``groups``.
    """
    axis = _channel_axis(x.dim(), axis)
    xs = x.to(_stats_dtype(x.dtype))
    valid = None if mask is None else mask.unsqueeze(axis)
    if groups is None:
        return _moments_keep(xs, (axis,), valid)
    if axis == 0:
        raise ValueError("expected the channel axis not to be the sample axis 0 with groups")
    n = x.shape[0]
    if groups < 1 or n % groups:
        raise ValueError(f"expected {n} samples to split into {groups} equal groups")
    xs = xs.reshape(groups, n // groups, *x.shape[1:])
    if valid is not None:
        valid = valid.reshape(groups, n // groups, *valid.shape[1:])
    return _moments_keep(xs, (0, axis + 1), valid)


def pool_moments(m: Moments, dim: int = 0) -> Moments:
    """Moments of the union of the groups along ``dim`` (law of total variance)::

        n = Σ_g m_g,  μ = Σ_g m_g μ_g / n,  M2 = Σ_g (M2_g + m_g (μ_g − μ)²)

    Exact for any group sizes; empty groups (m_g = 0) contribute nothing.
    """
    return Moments(*pool(m.count, m.mean, m.m2, dim))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint sets (Chan, Golub & LeVeque)::

        m = m_a + m_b,  δ = μ_b − μ_a,
        μ = μ_a + δ · m_b/m,  M2 = M2_a + M2_b + δ² · m_a m_b / m

    (the two-group case of :func:`pool_moments`, which computes it). An empty side
    (count 0) leaves the other unchanged.
    """
    return pool_moments(Moments(*(torch.stack(pair) for pair in zip(a, b))))


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    axis: int = 1,
    groups: int | None = None,
) -> Tensor:
    """``y = (x − mean) · invstd · γ + β`` per channel, in the statistics' precision,
    returned in ``x``'s dtype. ``weight``/``bias`` None mean γ = 1 / β = 0.

    Shape:
        x: (N, *) with C at ``axis``; mean, invstd: (C,), or (G, C) with ``groups=G``
        (one row per group of N/G consecutive samples); weight, bias: (C,).
    """
    axis = _channel_axis(x.dim(), axis)
    xs = x.to(mean.dtype)
    if groups is not None:
        xs = xs.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        axis += 1
        stat_dims: tuple[int, ...] = (0, axis)
    else:
        stat_dims = (axis,)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(mean.dtype)
    y = torch.addcmul(_expand(shift, xs.dim(), stat_dims), xs, _expand(scale, xs.dim(), stat_dims))
    return y.reshape(x.shape).to(x.dtype)


@torch.no_grad()
def renorm_correction(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    r_max: float | Tensor,
    d_max: float | Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's (r, d) (see :class:`Renorm`), detached.

    Shape:
        mean, var: the batch's (C,) or (G, C) mean and biased variance; running_*: (C,).
    """
    r_hi = torch.as_tensor(r_max, dtype=mean.dtype, device=mean.device)
    d_hi = torch.as_tensor(d_max, dtype=mean.dtype, device=mean.device)
    return renorm_rd(mean, var, running_mean, running_var, r_hi, d_hi, eps)


def _moments_composite(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    mask: Tensor | None,
    r: Tensor | None,
    d: Tensor | None,
    *,
    eps: float,
    groups: int | None,
    act: Activation | None,
    distributed: bool,
    process_group: Any,
    renorm_args: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Moments]:
    """The moments path from differentiable eager ops (channels at dim 1): local moments →
    (all ranks) → normalize → act(· + residual). Batch Renorm's constants are (r, d), or
    computed from ``renorm_args`` = (running_mean, running_var, r_max, d_max) when None.
    Returns the output and the batch's moments ((G, C) with groups)."""
    local = moments(x, 1, mask, groups)
    if distributed:
        stacked = torch.stack(tuple(local))
        if torch.is_grad_enabled() and not stacked.requires_grad:
            # Every rank must join the backward all_reduce, including one whose (e.g.
            # empty) input does not require grad: make the gather differentiable everywhere.
            stacked = stacked.detach().requires_grad_()
        gathered = all_gather_differentiable(stacked, process_group)
        batch = pool_moments(Moments(gathered[:, 0], gathered[:, 1], gathered[:, 2]))
    else:
        batch = local
    var = batch.m2 / batch.count.clamp_min(1)
    invstd = torch.rsqrt(var + eps)
    mean = batch.mean
    if r is None and renorm_args is not None:
        r, d = renorm_correction(mean, var, *renorm_args, eps)
    elif r is not None and groups is None:
        r, d = r[0], d[0]  # type: ignore[index]
    if r is not None and d is not None:
        # x̂ = (x − μ_B)·invstd·r + d  =  (x − (μ_B − d/(invstd·r)))·(invstd·r)
        invstd = invstd * r
        mean = mean - d / invstd
    out = normalize(x, mean, invstd, weight, bias, 1, groups)
    return activation_tail(out, residual, act), batch


def activation_tail(out: Tensor, residual: Tensor | None, activation: Activation | None) -> Tensor:
    """``act(out + residual)`` with torch's differentiable ops (the activation's
    :meth:`~bnorm.options.Activation.eager`), where the tail is not inside a fused kernel:
    evaluation, an empty batch, the fused BN + activation Function's eager fallback,
    training inside an enclosing torch.compile (ATen's batch norm and this tail, for
    Inductor to fuse) and the moments path's differentiable twin (enclosing
    torch.compile, double backward). ``out`` must be a fresh tensor: when no gradient is
    recorded it is updated in place."""
    if residual is None and (activation is None or activation.name == "identity"):
        return out
    inplace = not (
        torch.is_grad_enabled()
        and (out.requires_grad or (residual is not None and residual.requires_grad))
    )
    if residual is not None:
        out = out.add_(residual) if inplace else out + residual
    if activation is None:
        return out
    return activation.eager(out, inplace)
