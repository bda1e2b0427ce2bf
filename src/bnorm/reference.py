"""The executable specification of batch normalization, in NumPy float64.

Everything else in bnorm is tested against this module. It states the math once,
imports nothing of torch or of the rest of the package, and favours clarity over speed.

Notation (Ioffe & Szegedy 2015, arXiv:1502.03167), per channel c, over the m values
x_1..x_m that share the channel (every axis of the input except the channel axis, so
m = N·H·W for an (N, C, H, W) input)::

    μ_B  = (1/m) Σ x_i
    σ²_B = (1/m) Σ (x_i − μ_B)²                       (biased: used to normalize)
    x̂_i  = (x_i − μ_B) / √(σ²_B + ε)
    y_i  = γ x̂_i + β
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "MovingAverageState",
    "backward",
    "forward",
    "moving_average_backward",
    "moving_average_forward",
    "moving_average_running",
    "population_statistics",
    "update_running",
]


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    if ndim < 2:
        raise ValueError(f"expected an input of rank >= 2 (got rank {ndim})")
    if not -ndim <= axis < ndim:
        raise ValueError(f"expected axis in [{-ndim}, {ndim - 1}] (got {axis})")
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def _per_channel(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Reshape a (C,) vector so that it broadcasts along ``axis`` of a rank-``ndim`` array."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def forward(
    x: Any,
    gamma: Any,
    beta: Any,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Training-mode batch normalization: ``y = γ (x − μ_B)/√(σ²_B + ε) + β``.

    The statistics are taken per channel (the entries along ``axis``) over every other
    axis, with the biased variance σ²_B = (1/m) Σ (x_i − μ_B)².

    Shape:
        x: any rank ≥ 2 with C channels at ``axis``; gamma, beta: (C,); y: like x.

    Returns ``(y, cache)``; ``cache`` holds what :func:`backward` needs and the batch
    statistics ``mean`` (μ_B), ``var`` (σ²_B) and ``count`` (m).
    """
    x = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x.ndim, axis)
    gamma = np.asarray(gamma, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    count = int(np.prod([x.shape[i] for i in axes]))
    mean = x.mean(axis=axes)
    var = ((x - _per_channel(mean, x.ndim, axis)) ** 2).mean(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - _per_channel(mean, x.ndim, axis)) * _per_channel(invstd, x.ndim, axis)
    y = _per_channel(gamma, x.ndim, axis) * xhat + _per_channel(beta, x.ndim, axis)
    cache = {
        "xhat": xhat,
        "gamma": gamma,
        "invstd": invstd,
        "mean": mean,
        "var": var,
        "count": count,
        "axis": axis,
    }
    return y, cache


def backward(dy: Any, cache: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of training-mode batch normalization, derived by hand.

    With g_i = ∂L/∂y_i and the sums over the m values of a channel::

        ∂L/∂β = Σ g_i
        ∂L/∂γ = Σ g_i x̂_i
        ∂L/∂x_i = γ / (m √(σ²_B + ε)) · (m g_i − ∂L/∂β − x̂_i ∂L/∂γ)

    (The batch statistics depend on every x_i; the two subtracted terms are the gradient
    flowing through μ_B and σ²_B.)

    Returns ``(dx, dgamma, dbeta)``.
    """
    dy = np.asarray(dy, dtype=np.float64)
    xhat = cache["xhat"]
    axis = cache["axis"]
    m = cache["count"]
    axes = _reduce_axes(dy.ndim, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    scale = cache["gamma"] * cache["invstd"] / m
    dx = _per_channel(scale, dy.ndim, axis) * (
        m * dy
        - _per_channel(dbeta, dy.ndim, axis)
        - xhat * _per_channel(dgamma, dy.ndim, axis)
    )
    return dx, dgamma, dbeta


def update_running(
    running_mean: Any,
    running_var: Any,
    batch_mean: Any,
    batch_var: Any,
    count: int,
    momentum: float | None,
    num_batches_tracked: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The running-statistics update of PyTorch's convention.

    ``batch_var`` is the biased σ²_B that normalized the batch; the running variance
    stores the unbiased estimate m/(m−1)·σ²_B::

        running_mean ← (1 − α) · running_mean + α · μ_B
        running_var  ← (1 − α) · running_var  + α · m/(m−1) · σ²_B

    with α = ``momentum`` (the weight of the new batch; Keras's momentum 0.99 is 0.01
    here). With ``momentum=None`` the update is the cumulative average over the batches
    seen so far: α = 1/t, where t = ``num_batches_tracked`` counts this batch
    (t = 1 for the first batch, which then replaces the initial values).

    Returns the new ``(running_mean, running_var)``; the inputs are not modified.
    """
    if count < 2:
        raise ValueError(f"expected more than 1 value per channel (got count={count})")
    if momentum is None:
        if num_batches_tracked is None or num_batches_tracked < 1:
            raise ValueError(
                "momentum=None (cumulative average) needs num_batches_tracked >= 1, "
                f"counting this batch (got {num_batches_tracked})"
            )
        alpha = 1.0 / num_batches_tracked
    else:
        alpha = float(momentum)
    rm = np.asarray(running_mean, dtype=np.float64)
    rv = np.asarray(running_var, dtype=np.float64)
    unbiased = np.asarray(batch_var, dtype=np.float64) * count / (count - 1)
    new_mean = (1.0 - alpha) * rm + alpha * np.asarray(batch_mean, dtype=np.float64)
    new_var = (1.0 - alpha) * rv + alpha * unbiased
    return new_mean, new_var


def population_statistics(batches: Iterable[Any], axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exact population statistics over a sequence of batches, for inference.

    Batch b has m_b values per channel, mean μ_b and biased variance σ²_b. The pooled
    statistics of all n = Σ m_b values are, by the law of total variance::

        E[x]   = (1/n) Σ_b m_b μ_b
        Var[x] = 1/(n − 1) · Σ_b m_b (σ²_b + (μ_b − E[x])²)     (unbiased)

    i.e. exactly the mean and unbiased variance of all the values concatenated, whatever
    the batch sizes. The paper (Ioffe & Szegedy 2015, Alg. 2) instead averages over
    batches of one fixed size m::

        E[x] = E_B[μ_B],  Var[x] = m/(m − 1) · E_B[σ²_B]

    The two agree on the mean whenever all batches have the same size; on the variance
    they differ by the between-batch spread of the means: the paper's form omits
    Σ_b m_b (μ_b − E[x])² and uses m/(m−1) rather than n/(n−1), so it matches only when
    every batch has the same mean (and then only up to the factor m(n−1)/((m−1)n) → 1
    as m grows). The pooled form is the one that equals the statistics of the data.

    Shape:
        each batch: rank ≥ 2 with the same C channels at ``axis``; returns two (C,) arrays.
    """
    total = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    for batch in batches:
        x = np.asarray(batch, dtype=np.float64)
        axes = _reduce_axes(x.ndim, axis)
        m_b = int(np.prod([x.shape[i] for i in axes]))
        if m_b == 0:
            continue
        mu_b = x.mean(axis=axes)
        m2_b = ((x - _per_channel(mu_b, x.ndim, axis)) ** 2).sum(axis=axes)
        if mean is None or m2 is None:
            total, mean, m2 = m_b, mu_b, m2_b
            continue
        if mu_b.shape != mean.shape:
            raise ValueError(
                f"expected {mean.shape[0]} channels in every batch (got {mu_b.shape[0]})"
            )
        n = total + m_b
        delta = mu_b - mean
        # Chan et al.: merging two groups' (count, mean, M2).
        mean = mean + delta * (m_b / n)
        m2 = m2 + m2_b + delta**2 * (total * m_b / n)
        total = n
    if mean is None or m2 is None or total < 2:
        raise ValueError(f"expected at least 2 values per channel in total (got {total})")
    return mean, m2 / (total - 1)


# --- moving-average batch normalization (MABN) ----------------------------------------


class MovingAverageState:
    """The history a moving-average layer carries from step to step: the per-channel
    statistics of every recorded batch, oldest first — ``chi`` (χ_B = mean of x²) and
    ``psi`` (ψ_B = mean of g·x̂) — and ``steps``, the number of recorded batches. A plain
    record, copied by the functions below (they never modify their arguments)."""

    def __init__(self) -> None:
        self.chi: list[np.ndarray] = []
        self.psi: list[np.ndarray] = []
        self.steps = 0

    def copy(self) -> MovingAverageState:
        new = MovingAverageState()
        new.chi, new.psi, new.steps = list(self.chi), list(self.psi), self.steps
        return new


def _recent_mean(history: list[np.ndarray], steps: int, window: int, warmup_steps: int) -> Any:
    """The simple moving average of the last k = min(steps, window) entries; k = 1 while
    steps ≤ warmup_steps (the batch's own statistic)."""
    k = 1 if steps <= warmup_steps else min(steps, window)
    return np.mean(np.stack(history[-k:]), axis=0)


def moving_average_forward(
    x: Any,
    gamma: Any,
    beta: Any,
    state: MovingAverageState,
    *,
    window: int = 16,
    warmup_steps: int = 100,
    eps: float = 1e-5,
    axis: int = 1,
    mask: Any = None,
) -> tuple[np.ndarray, dict[str, Any], MovingAverageState]:
    """One training step's forward of moving-average batch normalization (Yan et al.,
    ICLR 2020), with reduced (uncentered) normalization. Per channel, over the n values
    of the batch (those where ``mask`` is True, if given)::

        χ_B = (1/n) Σ x_i²
        χ̄_t = (1/k) Σ_{s=0}^{k−1} χ_B(t − s),   k = min(t, window)   (k = 1 for t ≤ warmup)
        x̂_i = x_i / √(χ̄_t + ε),   y_i = γ x̂_i + β                    (every position)

    t = ``state.steps`` + 1 counts this batch. Returns ``(y, cache, new_state)``: the
    cache holds what :func:`moving_average_backward` needs and ``chi`` (χ_B),
    ``chi_bar`` (χ̄_t); new_state has χ_B recorded.
    """
    x = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x.ndim, axis)
    gamma = np.asarray(gamma, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    valid = np.ones(x.shape, dtype=bool) if mask is None else np.expand_dims(
        np.asarray(mask, dtype=bool), axis % x.ndim
    ) & np.ones(x.shape, dtype=bool)
    count = valid.sum(axis=axes)
    if np.any(count < 1):
        raise ValueError(f"expected at least 1 value per channel (got {int(count.min())})")
    chi = np.where(valid, x * x, 0.0).sum(axis=axes) / count
    new = state.copy()
    new.chi.append(chi)
    new.steps += 1
    chi_bar = _recent_mean(new.chi, new.steps, window, warmup_steps)
    invstd = 1.0 / np.sqrt(chi_bar + eps)
    xhat = x * _per_channel(invstd, x.ndim, axis)
    y = _per_channel(gamma, x.ndim, axis) * xhat + _per_channel(beta, x.ndim, axis)
    cache = {
        "xhat": xhat,
        "gamma": gamma,
        "invstd": invstd,
        "valid": valid,
        "count": count,
        "chi": chi,
        "chi_bar": chi_bar,
        "axis": axis,
        "window": window,
        "warmup_steps": warmup_steps,
    }
    return y, cache, new


def moving_average_backward(
    dy: Any, cache: dict[str, Any], state: MovingAverageState
) -> tuple[np.ndarray, np.ndarray, np.ndarray, MovingAverageState]:
    """The hand-written backward of :func:`moving_average_forward` — not its gradient:
    the batch's gradient statistic is replaced by its moving average. With g_i = γ ∂L/∂y_i
    and the sums over every position of a channel (n: the valid values, as in forward)::

        ∂L/∂β = Σ ∂L/∂y_i,   ∂L/∂γ = Σ ∂L/∂y_i · x̂_i
        ψ_B = (1/n) Σ g_i x̂_i
        ψ̄_t = (1/k) Σ_{s=0}^{k−1} ψ_B(t − s)                     (same k as forward)
        ∂L/∂x_i = (g_i − [i valid] · x̂_i ψ̄_t) / √(χ̄_t + ε)

    ``state`` is the state after this step's forward (its ``steps`` counts this batch).
    With k = 1 this is the exact gradient of y = γ x/√(χ_B + ε) + β (padded positions are
    normalized with χ_B but do not enter it: they get no correction term). Returns
    ``(dx, dgamma, dbeta, new_state)``, new_state with ψ_B recorded.
    """
    dy = np.asarray(dy, dtype=np.float64)
    axis = cache["axis"]
    axes = _reduce_axes(dy.ndim, axis)
    xhat = cache["xhat"]
    gamma = cache["gamma"]
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    g = dy * _per_channel(gamma, dy.ndim, axis)
    psi = (g * xhat).sum(axis=axes) / cache["count"]
    new = state.copy()
    new.psi.append(psi)
    psi_bar = _recent_mean(new.psi, new.steps, cache["window"], cache["warmup_steps"])
    correction = np.where(cache["valid"], xhat * _per_channel(psi_bar, dy.ndim, axis), 0.0)
    dx = (g - correction) * _per_channel(cache["invstd"], dy.ndim, axis)
    return dx, dgamma, dbeta, new


def moving_average_running(
    running_mean: Any, running_var: Any, chi_bar: Any, momentum: float
) -> tuple[np.ndarray, np.ndarray]:
    """The running statistics of a moving-average layer, for inference: exponential
    moving averages of the normalizer χ̄_t and of the center 0 of reduced normalization::

        running_mean ← (1 − α) · running_mean            (→ 0)
        running_var  ← (1 − α) · running_var + α · χ̄_t   (no m/(m−1): χ is not centered)

    so that evaluation, y = γ (x − running_mean)/√(running_var + ε) + β, is batch norm's
    own inference formula (with running_mean 0 once the initial value has decayed).
    """
    alpha = float(momentum)
    rm = np.asarray(running_mean, dtype=np.float64)
    rv = np.asarray(running_var, dtype=np.float64)
    return (1.0 - alpha) * rm, (1.0 - alpha) * rv + alpha * np.asarray(chi_bar, np.float64)
