"""The small per-channel formulas shared by the eager ops and the compiled kernels, stated
once, as torch functions that torch.compile can trace: the moments (count, mean, M2) of a
set of values and their pooling, the running-statistics update, Batch
Renormalization's (r, d) and the window average of moving-average batch norm.
:mod:`bnorm.reference` states the same math in NumPy."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


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


def pool(count: Tensor, mean: Tensor, m2: Tensor, dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, M2) of the union of the groups along ``dim`` (law of total variance)::

        n = Σ_g m_g,  μ = Σ_g m_g μ_g / n,  M2 = Σ_g (M2_g + m_g (μ_g − μ)²)
    """
    total = count.sum(dim)
    mu = (count * mean).sum(dim) / total.clamp_min(1)
    spread = count * (mean - mu.unsqueeze(dim)).square()
    return total, mu, (m2 + spread).sum(dim)


def finite_stats(mean: Tensor, unbiased_var: Tensor) -> Tensor:
    """The rule of ``skip_nonfinite``: a batch counts (True, a bool scalar on the device)
    iff its mean and unbiased variance are finite in every channel, in the running
    statistics' dtype."""
    return torch.isfinite(mean).all() & torch.isfinite(unbiased_var).all()


def running_update(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: float | Tensor,
    alpha: float | Tensor,
    skip_nonfinite: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(new running_mean, new running_var, ok) for one batch with biased variance ``var``
    over ``count`` values and weight ``alpha``::

        running_mean ← (1 − α) · running_mean + α · μ_B
        running_var  ← (1 − α) · running_var  + α · m/(m − 1) · σ²_B

    With ``skip_nonfinite`` a batch with a NaN/inf mean or variance in any channel leaves
    both unchanged (ok = False), decided by a select on the device."""
    dtype = running_mean.dtype
    mean = mean.detach().to(dtype)
    var = var.detach().to(dtype)
    if isinstance(count, Tensor):
        count = count.detach().to(dtype)
        unbiased = var * (count / (count - 1).clamp_min(1))
    else:
        unbiased = var * (count / max(count - 1, 1))
    new_mean = torch.lerp(running_mean, mean, alpha)
    new_var = torch.lerp(running_var, unbiased, alpha)
    if not skip_nonfinite:
        return new_mean, new_var, torch.ones((), dtype=torch.bool, device=mean.device)
    ok = finite_stats(mean, unbiased)
    return torch.where(ok, new_mean, running_mean), torch.where(ok, new_var, running_var), ok


def renorm_rd(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    r_max: Tensor,
    d_max: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's r = clip(σ_B/σ, 1/r_max, r_max) and
    d = clip((μ_B − μ)/σ, −d_max, d_max), σ = √(running_var + ε), σ_B = √(var + ε)."""
    dtype = mean.dtype
    sigma = (running_var.to(dtype) + eps).sqrt()
    sigma_b = (var + eps).sqrt()
    r_hi = r_max.to(dtype)
    d_hi = d_max.to(dtype)
    r = torch.minimum(torch.maximum(sigma_b / sigma, 1.0 / r_hi), r_hi)
    d = torch.minimum(torch.maximum((mean - running_mean.to(dtype)) / sigma, -d_hi), d_hi)
    return r, d


def window_average(
    ring: Tensor, value: Tensor, steps: Tensor, warmup_steps: int
) -> tuple[Tensor, Tensor]:
    """Moving-average batch norm's simple moving average (``bnorm.MovingAverage``): the
    ring of the last m = ``ring.shape[0]`` per-channel batch statistics with ``value``
    recorded as batch t = ``steps`` (1-based, a long scalar tensor) at row (t − 1) mod m,
    and the mean of the last k = min(t, m) of them (k = 1, i.e. ``value`` itself, while
    t ≤ ``warmup_steps``)::

        s̄_t = (1/k) Σ_{j=0}^{k−1} s(t − j)

    Returns (average, new ring). Rows are filled in order from an all-zero ring (a new
    or reset layer), so before the ring is full the rows not yet filled are 0 and the
    sum of all rows is that of the last k. Device selects only: no host synchronization."""
    m = ring.shape[0]
    value = value.to(ring.dtype)
    slot = torch.remainder(steps - 1, m).reshape(1)
    new_ring = ring.index_copy(0, slot, value.unsqueeze(0))
    average = new_ring.sum(0) / torch.clamp(steps, 1, m)
    return torch.where(steps <= warmup_steps, value, average), new_ring


def population_statistics(
    moments: Moments, *, reduced: bool = False, unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    """The (mean, variance) that a layer's running statistics stand for, given the
    moments of its inputs (count m, mean μ, M2)::

        batch norm                          (μ, M2/(m − 1))   — (μ, M2/m) with ``unbiased=False``
        reduced normalization (moving-avg)  (0, χ),  χ = M2/m + μ²  (a second moment about 0)

    The reduced form is what moving-average batch norm normalizes with (no centering, no
    m/(m − 1)), so that evaluation, γ (x − 0)/√(χ + ε) + β, is batch norm's own formula.
    Callers check that m ≥ 2 (m ≥ 1 for the biased and reduced forms) first."""
    count, mean, m2 = moments
    if reduced:
        return torch.zeros_like(mean), m2 / count + mean * mean
    return mean, m2 / ((count - 1).clamp_min(1) if unbiased else count)


def moving_average_running(
    running_mean: Tensor, running_var: Tensor, chi_bar: Tensor, alpha: float | Tensor
) -> tuple[Tensor, Tensor]:
    """The running statistics of moving-average batch norm, for inference: EMAs of the
    normalizer χ̄_t and of the center 0 of reduced normalization::

        running_mean ← (1 − α) · running_mean,   running_var ← (1 − α) · running_var + α · χ̄_t

    (no m/(m − 1): χ is a second moment about 0, not a variance about an estimated mean)."""
    chi_bar = chi_bar.detach().to(running_var.dtype)
    return running_mean * (1.0 - alpha), torch.lerp(running_var, chi_bar, alpha)
