"""Fused training kernels for the moments path: ghost batches, masks, SyncBatchNorm.

Where the statistics are not those of the whole local input — one set per group of
``k`` consecutive samples (ghost batch norm), over the positions a mask marks valid, or
over the batches of every rank (sync) — ATen's fused batch-norm kernel does not apply.
Built from elementwise autograd ops, these paths cost 2.5–3× plain batch norm on CPU:
every op writes a tensor-sized temporary (a fresh allocation: page faults on CPU) and
autograd saves most of them. Here the whole layer is one :class:`torch.autograd.Function`
with an analytic backward, each pass a torch function compiled with :func:`torch.compile`
(see :mod:`bnorm.kernels` for the compilation policy, ``BNORM_NO_COMPILE`` and the
eager fallback, which runs the same functions with ATen ops)::

    forward   per (group, channel): m = Σ v,  μ = Σ v·x / m,  M2 = Σ v·(x − μ)²
              (two passes over x: the mean, then the centered squares — no
              E[x²] − E[x]² cancellation; partial sums per sample row in the statistics'
              dtype, accumulated in float64)
              y = act(x·scale + shift + r),  scale = γ·r_B·invstd,  shift = β + γ·d_B − μ·scale
    backward  dz = dy · act'(z);  S1 = Σ dz,  S2 = Σ dz·(x − μ)    over *all* positions
              dx = dz·scale + v·((x − μ)·k + c),  k = −scale·invstd²·S2/m,  c = −scale·S1/m
              dγ = Σ_groups (r_B·invstd·S2 + d_B·S1),  dβ = Σ_groups S1,  dr = dz

with v the mask (1 where valid), invstd = 1/√(M2/m + ε) and (r_B, d_B) Batch
Renormalization's constants (1 and 0 without renorm). Padded positions are normalized
with the valid positions' statistics, so their outputs depend on μ and σ: that is why the
sums S1, S2 run over every position while the correction term applies to valid ones only.

**Sync.** With a process group the forward is two kernels around one ``all_gather`` of
the local (m, μ, M2) (merged exactly, :func:`bnorm.functional.pool_moments`), and the
backward two kernels around one ``all_reduce`` of (S1, S2); dγ and dβ stay local sums
(DistributedDataParallel averages them, as for any parameter).

**Layout.** Tensors are viewed as a contiguous (G, K, I, C, B) tensor in memory order —
G groups of K samples, I the positions between sample and channel in memory, B those
after the channel: NCHW is (G, K, 1, C, H·W), channels_last (G, K, H·W, C, 1).

**Double backward** (``create_graph=True``) recomputes the layer with differentiable
eager ops and differentiates that: exact, at the eager path's cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._math import pool, renorm_rd, running_update
from ..distributed import all_gather_tensor, all_reduce_sum
from ..ops import _moments_composite, _stats_dtype
from ..options import IDENTITY, Activation
from .compile import _run
from .layout import _Layout
from .running import Running, RunningState, store_running

__all__ = ["batch_norm_moments_train"]


# --- the kernels as torch functions (eager, or compiled by kernels._run) ---------------


def _gc(v: Tensor) -> Tensor:
    """A (G, C) tensor for broadcasting against the kernels' (G, K, I, C, B) tensors."""
    return v[:, None, None, :, None]


def _sum_rows(t: Tensor) -> Tensor:
    """Σ over every dim but G and C of a (G, K, I, C, B) tensor: per-sample partial sums
    in the tensor's dtype, then those in float64."""
    return t.sum((2, 4)).to(torch.float64).sum(1)


def _stats(x5: Tensor, v5: Tensor | None, sd: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per (group, channel) (count, mean, M2) in ``sd``, counting where v5 > 0."""
    xs = x5.to(sd)
    g, c = x5.shape[0], x5.shape[3]
    if v5 is None:
        n = x5.shape[1] * x5.shape[2] * x5.shape[4]
        count = torch.full((g, c), n, dtype=torch.float64, device=x5.device)
        mean = _sum_rows(xs) / count.clamp_min(1)
        centered = xs - _gc(mean.to(sd))
        m2 = _sum_rows(centered * centered)
    else:
        valid = v5 > 0
        count = v5.to(torch.float64).sum((1, 2, 3, 4))[:, None].expand(g, c)
        mean = _sum_rows(torch.where(valid, xs, 0.0)) / count.clamp_min(1)
        centered = xs - _gc(mean.to(sd))
        m2 = _sum_rows(torch.where(valid, centered * centered, 0.0))
    return count.to(sd), mean.to(sd), m2.to(sd)


def _coefficients(
    count: Tensor,
    mean: Tensor,
    m2: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    renorm: tuple[Tensor, Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(invstd, scale, shift, r, d) per (group, channel) for y = x·scale + shift."""
    var = m2 / count.clamp_min(1)
    invstd = torch.rsqrt(var + eps)
    if renorm is None:
        r = torch.ones_like(invstd)
        d = torch.zeros_like(invstd)
    else:
        r, d = renorm_rd(mean, var, *renorm, eps)
    scale = weight * invstd * r
    shift = bias + weight * d - mean * scale
    return invstd, scale, shift, r, d


def _normalize(
    x5: Tensor, r5: Tensor | None, scale: Tensor, shift: Tensor, act: Activation
) -> Tensor:
    """act(x·scale + shift + r) in x's dtype."""
    z = x5.to(scale.dtype) * _gc(scale) + _gc(shift)
    if r5 is not None:
        z = z + r5.to(scale.dtype)
    return act.forward(z).to(x5.dtype)


def _grad_z(
    dy5: Tensor, x5: Tensor, r5: Tensor | None, scale: Tensor, shift: Tensor, act: Activation
) -> Tensor:
    """dz = dy · act'(z), z recomputed as in the forward."""
    sd = scale.dtype
    if act.name == "identity":
        return dy5.to(sd)
    z = x5.to(sd) * _gc(scale) + _gc(shift)
    if r5 is not None:
        z = z + r5.to(sd)
    return act.grad(dy5.to(sd), z)


def _grad_sums(
    dy5: Tensor,
    x5: Tensor,
    r5: Tensor | None,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor,
    act: Activation,
) -> tuple[Tensor, Tensor]:
    """(S1, S2) = (Σ dz, Σ dz·(x − μ)) per (group, channel), in float64."""
    dz = _grad_z(dy5, x5, r5, scale, shift, act)
    centered = x5.to(scale.dtype) - _gc(mean)
    return _sum_rows(dz), _sum_rows(dz * centered)


def _grad_coefficients(
    s1: Tensor, s2: Tensor, count: Tensor, invstd: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """(k, c) of dx = dz·scale + v·((x − μ)·k + c)."""
    sd = scale.dtype
    n = count.to(torch.float64).clamp_min(1)
    scale64 = scale.to(torch.float64)
    k = -scale64 * invstd.to(torch.float64).square() * s2 / n
    c = -scale64 * s1 / n
    return k.to(sd), c.to(sd)


def _grad_input(
    dy5: Tensor,
    x5: Tensor,
    r5: Tensor | None,
    v5: Tensor | None,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor,
    k: Tensor,
    c: Tensor,
    act: Activation,
) -> tuple[Tensor, Tensor | None]:
    """(dx, dr) in the input's (residual's) dtype."""
    dz = _grad_z(dy5, x5, r5, scale, shift, act)
    correction = (x5.to(scale.dtype) - _gc(mean)) * _gc(k) + _gc(c)
    if v5 is not None:
        correction = torch.where(v5 > 0, correction, 0.0)
    dx = dz * _gc(scale) + correction
    return dx.to(x5.dtype), None if r5 is None else dz.to(r5.dtype)


def _running(
    count: Tensor, mean: Tensor, m2: Tensor, running: Running, skip_nonfinite: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(new running_mean, new running_var, ok) from the (G, C) moments, pooled over the
    groups: the running statistics see the whole batch."""
    n, mu, pooled_m2 = pool(count, mean, m2)
    rm, rv, alpha = running
    return running_update(rm, rv, mu, pooled_m2 / n.clamp_min(1), n, alpha, skip_nonfinite)


def _forward_kernel(
    x5: Tensor,
    v5: Tensor | None,
    r5: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    act: Activation,
    renorm: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    running: Running | None,
    skip_nonfinite: bool,
) -> tuple[Tensor, ...]:
    """The whole local forward: (y, count, mean, invstd, scale, shift, r, d) and, with
    ``running``, the running-statistics update (new mean, new var, ok)."""
    count, mean, m2 = _stats(x5, v5, weight.dtype)
    invstd, scale, shift, r, d = _coefficients(count, mean, m2, weight, bias, eps, renorm)
    y = _normalize(x5, r5, scale, shift, act)
    update = () if running is None else _running(count, mean, m2, running, skip_nonfinite)
    return (y, count, mean, invstd, scale, shift, r, d, *update)


def _param_grads(
    s1: Tensor, s2: Tensor, invstd: Tensor, r: Tensor, d: Tensor
) -> tuple[Tensor, Tensor]:
    """(dγ, dβ) = (Σ_groups r·invstd·S2 + d·S1, Σ_groups S1)."""
    f64 = torch.float64
    dw = (r.to(f64) * invstd.to(f64) * s2 + d.to(f64) * s1).sum(0)
    return dw.to(invstd.dtype), s1.sum(0).to(invstd.dtype)


def _backward_kernel(
    dy5: Tensor,
    x5: Tensor,
    r5: Tensor | None,
    v5: Tensor | None,
    count: Tensor,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    shift: Tensor,
    r: Tensor,
    d: Tensor,
    act: Activation,
) -> tuple[Tensor | None, ...]:
    """The whole local backward: (dx, dr, dγ, dβ)."""
    s1, s2 = _grad_sums(dy5, x5, r5, mean, scale, shift, act)
    k, c = _grad_coefficients(s1, s2, count, invstd, scale)
    dx, dr = _grad_input(dy5, x5, r5, v5, mean, scale, shift, k, c, act)
    return (dx, dr, *_param_grads(s1, s2, invstd, r, d))


# --- the autograd Function --------------------------------------------------------------


def _view5(layout: _Layout, t: Tensor, groups: int, is_mask: bool = False) -> Tensor:
    """``t`` (x's logical shape; a mask: with channel size 1) as (G, K, I, C, B)."""
    t3 = (
        layout.to3d(t)
        if not is_mask
        else t.permute(layout.perm).contiguous().view(layout.a, 1, layout.b)
    )
    return t3.view(groups, layout.a_outer // groups, layout.a_inner, t3.shape[1], layout.b)


class _MomentsBatchNorm(torch.autograd.Function):
    """act(BN(x) + r) with per-group / masked / cross-rank statistics, updating the
    running statistics in place (see the module docstring and
    :func:`batch_norm_moments_train`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        mask: Tensor | None,
        options: _Options,
        _join: Tensor | None,
    ) -> Tensor:
        sd = _stats_dtype(x.dtype)
        channels = x.shape[1]
        w = torch.ones(channels, dtype=sd, device=x.device) if weight is None else weight.to(sd)
        b = torch.zeros(channels, dtype=sd, device=x.device) if bias is None else bias.to(sd)
        o = options
        xk = x
        layout = _Layout.of(xk)
        if o.groups > 1 and layout.perm[0] != 0:  # the samples must be outermost in memory
            # (a clone: contiguous() keeps a tensor whose size-1 dim has the largest stride)
            xk = xk.clone(memory_format=torch.contiguous_format)
            layout = _Layout.of(xk)
        x5 = _view5(layout, xk, o.groups)
        r5 = None if residual is None else _view5(layout, residual, o.groups)
        v5 = (
            None
            if mask is None
            else _view5(layout, mask.unsqueeze(1).to(sd), o.groups, is_mask=True)
        )
        # Which of G, I, B are 1 (NCHW vs channels_last vs 2D input, ghost or not) is part of
        # the key: Dynamo specializes size 1, and each variant gets its own recompile budget.
        shape_kind = tuple(x5.shape[d] > 1 for d in (0, 2, 4))
        key = (
            o.act.name,
            o.act.param,
            r5 is not None,
            v5 is not None,
            o.renorm is not None,
            x.dtype,
            shape_kind,
        )
        # Empty tensors (a rank without samples) run eagerly: nothing to gain, and Dynamo
        # would specialize a recompile on the zero size.
        run = _run if x.numel() else _eager
        running = None if o.running is None else o.running[:3]
        if not o.distributed:
            out = run(
                "mfwd", _forward_kernel, (*key, running is not None, o.skip_nonfinite),
                x5, v5, r5, w, b, o.eps, o.act, o.renorm, running, o.skip_nonfinite,
            )  # fmt: skip
            y5, count, mean, invstd, scale, shift, r, d = out[:8]
            update = out[8:]
        else:
            count, mean, m2 = run("mstats", _stats, key, x5, v5, sd)
            gathered = all_gather_tensor(torch.stack((count[0], mean[0], m2[0])), o.process_group)
            count, mean, m2 = (
                t[None] for t in pool(gathered[:, 0], gathered[:, 1], gathered[:, 2])
            )
            invstd, scale, shift, r, d = _coefficients(count, mean, m2, w, b, o.eps, o.renorm)
            y5 = run("mnorm", _normalize, key, x5, r5, scale, shift, o.act)
            update = () if running is None else _running(count, mean, m2, running, o.skip_nonfinite)
        if o.running is not None:
            store_running(o.running, *update)
        ctx.layout = layout
        ctx.options = options
        ctx.key = key
        ctx.shape = xk.shape
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (weight, bias, residual))
        ctx.save_for_backward(
            x, weight, bias, residual, mask, x5, r5, v5, count, mean, invstd, scale, shift, r, d
        )
        return layout.from3d(y5.view(layout.a, channels, layout.b))

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, bias, residual, mask, x5, r5, v5, count, mean, invstd, scale, shift, r, d = (
            ctx.saved_tensors
        )
        o: _Options = ctx.options
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the layer rebuilt from differentiable ops.
            originals = (x, weight, bias, residual)
            inputs = [t for t in originals if t is not None and t.requires_grad]
            if not inputs and o.distributed:
                # A rank that only joined (nothing of its own needs grad) must still run the
                # rebuilt layer's collectives with its peers: differentiate a stand-in.
                x = x.detach().requires_grad_()
                inputs = [x]
            with torch.enable_grad():
                y = _moments_composite(
                    x, weight, bias, residual, mask, r, d, eps=o.eps,
                    groups=None if o.groups == 1 else o.groups, act=o.act,
                    distributed=o.distributed, process_group=o.process_group,
                )[0]  # fmt: skip
                grads = iter(
                    torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True)
                )
            out = [next(grads) if t is not None and t.requires_grad else None for t in originals]
            return (*out, None, None, None)
        layout: _Layout = ctx.layout
        dy5 = _view5(layout, dy, o.groups)
        run = _run if x5.numel() else _eager
        if not o.distributed:
            dx5, dr5, dw, db = run(
                "mbwd", _backward_kernel, ctx.key,
                dy5, x5, r5, v5, count, mean, invstd, scale, shift, r, d, o.act,
            )  # fmt: skip
        else:
            s1, s2 = run("mred", _grad_sums, ctx.key, dy5, x5, r5, mean, scale, shift, o.act)
            total = all_reduce_sum(torch.stack((s1, s2)), o.process_group)
            k, c = _grad_coefficients(total[0], total[1], count, invstd, scale)
            dx5, dr5 = run(
                "mdx", _grad_input, ctx.key, dy5, x5, r5, v5, mean, scale, shift, k, c, o.act
            )
            dw, db = _param_grads(s1, s2, invstd, r, d)
        wdt, bdt, rdt = ctx.dtypes
        shape3 = (layout.a, ctx.shape[1], layout.b)
        dx = layout.from3d(dx5.view(shape3))
        dr = None if rdt is None or dr5 is None else layout.from3d(dr5.view(shape3))
        return (
            dx,
            None if wdt is None else dw.to(wdt),
            None if bdt is None else db.to(bdt),
            dr,
            None,
            None,
            None,
        )


@dataclass(frozen=True)
class _Options:
    eps: float
    groups: int
    act: Activation
    renorm: tuple[Tensor, Tensor, Tensor, Tensor] | None
    running: RunningState | None
    skip_nonfinite: bool
    distributed: bool
    process_group: Any


def _eager(kind: str, fn: Callable[..., Any], key: tuple[Any, ...], *args: Any) -> Any:
    return fn(*args)


def batch_norm_moments_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    groups: int = 1,
    mask: Tensor | None = None,
    residual: Tensor | None = None,
    activation: Activation | None = None,
    renorm: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    running: RunningState | None = None,
    skip_nonfinite: bool = True,
    process_group: Any = None,
    distributed: bool = False,
) -> Tensor:
    """Training-mode ``act(BN(x) + residual)`` with statistics per group of N/``groups``
    consecutive samples, over the positions where ``mask`` is True, and (``distributed``)
    over every rank of ``process_group``; one fused forward and backward (module
    docstring).

    ``renorm`` = (running_mean, running_var, r_max, d_max) applies Batch Renormalization's
    correction. ``running`` = (running_mean, running_var, α, num_batches_tracked,
    num_batches_skipped) are updated in place from the moments of all groups (and ranks)
    pooled, as :func:`bnorm.functional.update_running_stats` states (``skip_nonfinite``
    likewise). Double backward differentiates the same layer rebuilt from differentiable ops
    (:func:`bnorm.ops._moments_composite`), given Batch Renorm's (G, C) constants r and d.

    Shape:
        x: (N, C, *) any memory layout; mask: (N, *) bool; residual: like x;
        weight, bias: (C,); returns y like x.
    """
    act = activation if activation is not None else IDENTITY
    join = None
    if distributed and torch.is_grad_enabled():
        # Every rank must join the backward all_reduce, also one whose input (e.g. an
        # empty batch) needs no gradient: this makes the Function part of the graph.
        join = torch.zeros((), device=x.device, requires_grad=True)
    options = _Options(
        eps, groups, act, renorm, running, skip_nonfinite, distributed, process_group
    )
    return _MomentsBatchNorm.apply(x, weight, bias, residual, mask, options, join)
