"""Stateless batch-normalization ops on torch tensors.

The pipeline (see DESIGN.md): per-channel moments (count, mean, M2) → normalize →
affine, and the running-statistics update. The math is stated in :mod:`bnorm.reference`;
this module computes the same thing with torch, differentiably.

Two ways to the same numbers:

* the **native path** — PyTorch's ATen kernel (``aten::native_batch_norm``) computes the
  batch statistics, the normalization and the backward pass in one fused pass each. It
  is used whenever the batch statistics are those of the whole input (no mask), for any
  channel axis (the channel axis is moved to position 1 as a view: an NHWC tensor is an
  NCHW tensor in channels_last layout, which the kernel handles natively);
* the **moments path** — :func:`moments`, :func:`merge_moments`, :func:`normalize` —
  used where the statistics are not those of the whole input (masked positions). Moments
  are carried as (count, mean, M2) so that groups, masks and processes merge exactly
  (Chan et al.), without the E[x²] − E[x]² cancellation.

Statistics are computed in float32 (or float64 for float64 inputs) for half-precision
inputs; the output keeps the input's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "batch_norm",
    "merge_moments",
    "moments",
    "normalize",
    "update_running_stats",
]


class Moments(NamedTuple):
    """Per-channel moments of a set of values: ``count`` m, ``mean`` μ and
    ``m2`` = Σ (x_i − μ)² (so the biased variance is m2/count). Each is a (C,) tensor."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count on purpose
    mean: Tensor
    m2: Tensor

    @property
    def var(self) -> Tensor:
        """Biased variance m2/count (what normalizes the batch)."""
        return self.m2 / self.count


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_axis(ndim: int, axis: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"expected a channel axis in [{-ndim}, {ndim - 1}] for a {ndim}D input (got axis={axis})"
        )
    return axis % ndim


def _broadcast_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def moments(x: Tensor, axis: int = 1, mask: Tensor | None = None) -> Moments:
    """Per-channel (count, mean, M2) of ``x`` over every axis but ``axis``.

    With a boolean ``mask`` (the shape of ``x`` without the channel axis; True = valid),
    only valid positions count: m = Σ mask, μ = Σ_valid x / m, M2 = Σ_valid (x − μ)².
    Invalid positions may hold anything, NaN included. Computed in float32 or wider.

    Shape:
        x: (*, C, *) with C at ``axis``; mask: x's shape without ``axis``; returns (C,) each.
    """
    axis = _channel_axis(x.dim(), axis)
    dims = [d for d in range(x.dim()) if d != axis]
    xs = x.to(_stats_dtype(x.dtype))
    channels = x.shape[axis]
    if mask is None:
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        n = x.numel() // channels if channels else 0
        count = torch.full_like(mean, float(n))
        return Moments(count, mean, var * n)
    valid = mask.unsqueeze(axis)
    zero = xs.new_zeros(())
    count = valid.sum(dim=dims).to(xs.dtype).expand(channels)
    mean = torch.where(valid, xs, zero).sum(dim=dims) / count
    centered = torch.where(valid, xs - mean.view(_broadcast_shape(x.dim(), axis)), zero)
    m2 = centered.square().sum(dim=dims)
    return Moments(count, mean, m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint sets (Chan, Golub & LeVeque)::

        m = m_a + m_b,  δ = μ_b − μ_a,
        μ = μ_a + δ · m_b/m,  M2 = M2_a + M2_b + δ² · m_a m_b / m

    An empty side (count 0) leaves the other unchanged.
    """
    count = a.count + b.count
    safe = torch.where(count > 0, count, torch.ones_like(count))
    delta = b.mean.nan_to_num() - a.mean.nan_to_num()
    frac_b = b.count / safe
    mean = torch.where(b.count > 0, a.mean.nan_to_num() + delta * frac_b, a.mean)
    mean = torch.where(a.count > 0, mean, b.mean)
    m2 = a.m2 + b.m2 + delta.square() * (a.count * frac_b)
    return Moments(count, mean, m2)


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    axis: int = 1,
) -> Tensor:
    """``y = (x − mean) · invstd · γ + β`` per channel, in the statistics' precision,
    returned in ``x``'s dtype. ``weight``/``bias`` None mean γ = 1 / β = 0."""
    axis = _channel_axis(x.dim(), axis)
    shape = _broadcast_shape(x.dim(), axis)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    y = (x.to(mean.dtype) - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(mean.dtype).view(shape)
    return y.to(x.dtype)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    skip_nonfinite: bool = True,
) -> None:
    """Update the running statistics in place from one batch (PyTorch's convention)::

        running_mean ← (1 − α) · running_mean + α · μ_B
        running_var  ← (1 − α) · running_var  + α · m/(m − 1) · σ²_B

    ``var`` is the biased σ²_B; α = ``momentum``, or 1/t for ``momentum=None`` (cumulative
    average; t = ``num_batches_tracked`` after counting this batch). With
    ``skip_nonfinite``, a batch whose mean or variance has a NaN/inf in any channel leaves
    the statistics and ``num_batches_tracked`` unchanged and adds one to
    ``num_batches_skipped`` instead. The decision is a select on the tensors' device: no
    host synchronization.
    """
    dtype = running_mean.dtype
    mean = mean.detach().to(dtype)
    var = var.detach().to(dtype)
    if isinstance(count, Tensor):
        count = count.detach().to(dtype)
        unbiased = var * (count / (count - 1).clamp_min(1))
    else:
        unbiased = var * (count / max(count - 1, 1))
    if skip_nonfinite:
        ok = torch.isfinite(mean).all() & torch.isfinite(unbiased).all()
    else:
        ok = torch.ones((), dtype=torch.bool, device=mean.device)
    alpha: float | Tensor
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        alpha = (1.0 / (num_batches_tracked + 1)).to(dtype)
    else:
        alpha = momentum
    new_mean = torch.lerp(running_mean, mean, alpha)
    new_var = torch.lerp(running_var, unbiased, alpha)
    if skip_nonfinite:
        new_mean = torch.where(ok, new_mean, running_mean)
        new_var = torch.where(ok, new_var, running_var)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
    if num_batches_skipped is not None:
        num_batches_skipped.add_((~ok).to(num_batches_skipped.dtype))


def _check_vector(name: str, v: Tensor | None, channels: int) -> None:
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"expected {name} to be a Tensor or None (got {type(v).__name__})")
    if v.dim() != 1 or v.shape[0] != channels:
        raise ValueError(
            f"expected {name} of shape ({channels},) to match the input's {channels} channels "
            f"(got shape {tuple(v.shape)})"
        )


def check_input(
    input: Tensor,
    axis: int,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
) -> int:
    """Validate the arguments of :func:`batch_norm`; returns the channel axis, normalized."""
    if not isinstance(input, Tensor):
        raise TypeError(f"expected input to be a Tensor (got {type(input).__name__})")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input (got dtype {input.dtype})")
    if input.dim() < 2:
        raise ValueError(f"expected an input of at least 2 dimensions (got {input.dim()}D input)")
    ax = _channel_axis(input.dim(), axis)
    channels = input.shape[ax]
    for name, v in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_vector(name, v, channels)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"expected mask to be a bool Tensor or None (got {type(mask).__name__})")
        if mask.dtype != torch.bool:
            raise TypeError(f"expected a bool mask (got dtype {mask.dtype})")
        expected = tuple(s for d, s in enumerate(input.shape) if d != ax)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"expected a mask of shape {expected} (the input's shape without the channel "
                f"axis {ax}) (got {tuple(mask.shape)})"
            )
    return ax


def _values_per_channel(input: Tensor, ax: int, mask: Tensor | None) -> int:
    if mask is not None:
        # Needs the host: raising on too few valid values cannot be a device select.
        return int(mask.sum())
    channels = input.shape[ax]
    return input.numel() // channels if channels else 0


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    mask: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    skip_nonfinite: bool = True,
) -> Tensor:
    """Batch normalization, ``y = γ (x − μ)/√(σ² + ε) + β`` per channel.

    Same results as :func:`torch.nn.functional.batch_norm` for ``axis=1``; any channel
    axis otherwise (``axis=-1`` for NHWC). In training (or when no running statistics are
    given), μ and σ² are the batch's mean and biased variance over every axis but
    ``axis`` — over the positions where ``mask`` is True if a mask is given — and the
    running statistics, if given, are updated as in :func:`update_running_stats`
    (``momentum=None``: cumulative average, which needs ``num_batches_tracked``). In
    evaluation the running statistics normalize every position.

    ``num_batches_tracked``/``num_batches_skipped`` (long scalars), if given, are
    incremented in place in training; see :func:`update_running_stats` for
    ``skip_nonfinite``.

    Shape:
        input: (N, C, *) with C at ``axis``; mask: input's shape without ``axis``;
        running_mean, running_var, weight, bias: (C,); output: like input.
    """
    ax = check_input(
        input,
        axis,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
        mask=mask,
    )
    if (running_mean is None) != (running_var is None):
        raise ValueError("expected running_mean and running_var both given or both None")
    use_batch_stats = training or running_mean is None
    update = training and running_mean is not None and running_var is not None
    if momentum is None and update and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if use_batch_stats:
        count = _values_per_channel(input, ax, mask)
        if count == 1 or (mask is not None and count < 2 and input.numel() > 0):
            raise ValueError(
                "expected more than 1 value per channel when training "
                f"(got {count} for input of shape {tuple(input.shape)}"
                + (" with its mask)" if mask is not None else ")")
            )
    if input.numel() == 0:
        # Nothing to normalize, nothing learned: torch's convention (counts the batch).
        if update and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        out = input.clone()
        if weight is not None:
            out = out * weight.reshape(-1)[:1].sum()
        if bias is not None:
            out = out + bias.reshape(-1)[:1].sum()
        return out
    if not use_batch_stats:
        x = input.movedim(ax, 1) if ax != 1 else input
        out = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, False, 0.0, eps
        )[0]
        return out.movedim(1, ax) if ax != 1 else out
    if mask is None:
        x = input.movedim(ax, 1) if ax != 1 else input
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, None, None, True, 0.0, eps
        )
        out = out.movedim(1, ax) if ax != 1 else out
        if update:
            var = invstd.detach().to(_stats_dtype(input.dtype)).pow(-2) - eps
            update_running_stats(
                running_mean,  # type: ignore[arg-type]
                running_var,  # type: ignore[arg-type]
                mean,
                var,
                count,
                momentum,
                num_batches_tracked,
                num_batches_skipped,
                skip_nonfinite,
            )
        return out
    mom = moments(input, ax, mask)
    var = mom.var
    out = normalize(input, mom.mean, torch.rsqrt(var + eps), weight, bias, ax)
    if update:
        update_running_stats(
            running_mean,  # type: ignore[arg-type]
            running_var,  # type: ignore[arg-type]
            mom.mean,
            var,
            mom.count,
            momentum,
            num_batches_tracked,
            num_batches_skipped,
            skip_nonfinite,
        )
    return out
