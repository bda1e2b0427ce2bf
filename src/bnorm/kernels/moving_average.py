"""Moving-average batch normalization (MABN) as one autograd Function with its own
backward (the method's backward is not the gradient of its forward; see
:class:`bnorm.MovingAverage` and :func:`bnorm.reference.moving_average_backward`).

Channels at dim 1, any rank ≥ 2, any memory layout. Per channel::

    forward   χ_B = Σ v·x² / n          (one statistics pass; v the mask, n = Σ v)
              χ̄ = window average of χ_B (ring ``chi``, :func:`bnorm._math.window_average`)
              y = x·(γ/√(χ̄ + ε)) + β     (one pass)
    backward  S_γ = Σ dy·x̂, S_β = Σ dy  (one pass over dy and x: dγ, dβ)
              ψ_B = γ·S_γ / n, ψ̄ = window average of ψ_B (ring ``psi``)
              dx = γ·dy/√(χ̄ + ε) − v·x·ψ̄/(χ̄ + ε)

Σ x² is a squared 2-norm (``torch.linalg.vector_norm``: one read, no temporary). Eagerly,
for float32/float64 without a mask, the output is ATen's batch norm in evaluation mode
with running mean 0 and running variance χ̄ (one pass), and (dγ, dβ) come from its
evaluation-mode backward (one pass over dy and x), then dx = dy·γ/√(χ̄ + ε) and one
in-place ``addcmul_`` for the correction term. Elsewhere (a mask, half precision, inside
torch.compile) the same formulas are plain torch ops, which Inductor fuses. Per call
the state's small (C,)-vector updates add a fixed cost of ~0.1-0.2 ms on CPU.

**State.** The rings and the step counter are updated in place on their device (selects,
no host synchronization): χ_B and the running statistics in forward, ψ_B in backward —
a training forward whose backward never runs leaves that step's ψ row as it was. A batch
whose χ_B is not finite (``skip_nonfinite``) records nothing: neither ring row, nor the
step count, nor the running statistics (it counts in ``num_batches_skipped``).

**Sync.** Across processes χ_B and ψ_B are those of the global batch: one all_reduce of
(Σ v·x², n) in forward and one of Σ γ·dy·x̂ in backward; every rank then holds the same
rings. dγ and dβ stay local sums, as for any parameter under DistributedDataParallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._math import moving_average_running, window_average
from ..distributed import all_reduce_sum
from .running import RunningState, store_running

__all__ = ["MovingState", "batch_norm_moving_average_train"]

MovingState = tuple[Tensor, Tensor, Tensor]
"""(chi ring (window, C), psi ring (window, C), recorded steps (long scalar)): the state a
moving-average layer carries from one training step to the next."""


@dataclass(frozen=True)
class _Spec:
    eps: float
    warmup_steps: int
    skip_nonfinite: bool
    distributed: bool
    process_group: Any


def _dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _channel(v: Tensor, ndim: int) -> Tensor:
    return v.reshape([1, -1] + [1] * (ndim - 2))


def _fast(x: Tensor, valid: Tensor | None) -> bool:
    """ATen's batch-norm kernels apply: eager, float32/float64, no mask, not empty (an
    empty local batch under sync: ATen's CPU kernels divide by its size)."""
    return (
        valid is None
        and x.numel() > 0
        and x.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
    )


def _second_moment_sum(x: Tensor, valid: Tensor | None, sd: torch.dtype) -> tuple[Tensor, Tensor]:
    """(Σ v·x² per channel, n = Σ v) in the statistics' dtype ``sd``."""
    channels = x.shape[1]
    per_channel = x.numel() // max(channels, 1)
    # Σ x² as a squared 2-norm: one read of x and no temporary, 2-3x faster on CPU than
    # ATen's batch-norm statistics pass (Welford) and than x.square().sum().
    xv = x if valid is None else torch.where(valid, x, 0.0)
    total = torch.linalg.vector_norm(xv, 2, _dims(x), dtype=sd).square()
    if valid is not None:
        return total, valid.sum().to(sd)
    if not torch.compiler.is_compiling():
        return total, torch.tensor(float(per_channel), dtype=sd, device=x.device)
    # (A product, not torch.tensor(n): under torch.compile n is a symbolic size.)
    return total, torch.ones((), dtype=sd, device=x.device) * per_channel


class _MovingAverageNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        valid: Tensor | None,
        chi_ring: Tensor,
        psi_ring: Tensor,
        steps: Tensor,
        spec: _Spec,
        running: RunningState | None,
    ) -> Tensor:
        sd = chi_ring.dtype
        total, n = _second_moment_sum(x, valid, sd)
        if spec.distributed:
            reduced = all_reduce_sum(torch.cat([total, n.reshape(1)]), spec.process_group)
            total, n = reduced[:-1], reduced[-1]
        chi = total / n
        t = steps + 1
        chi_bar, new_ring = window_average(chi_ring, chi, t, spec.warmup_steps)
        if spec.skip_nonfinite:
            ok = torch.isfinite(chi).all()
            chi_ring.copy_(torch.where(ok, new_ring, chi_ring))
        else:
            ok = torch.ones((), dtype=torch.bool, device=x.device)
            chi_ring.copy_(new_ring)
        steps.add_(ok.to(steps.dtype))
        if running is not None:
            running_mean, running_var, alpha = running[0], running[1], running[2]
            new_mean, new_var = moving_average_running(running_mean, running_var, chi_bar, alpha)
            new_mean = torch.where(ok, new_mean, running_mean)
            new_var = torch.where(ok, new_var, running_var)
            store_running(running, new_mean, new_var, ok)
        invstd = torch.rsqrt(chi_bar + spec.eps)
        if _fast(x, valid):
            zeros = torch.zeros_like(chi_bar, dtype=x.dtype)
            y = torch.nn.functional.batch_norm(
                x, zeros, chi_bar.to(x.dtype), weight, bias, False, 0.0, spec.eps
            )
        else:
            scale = invstd if weight is None else invstd * weight.to(sd)
            y = x.to(sd) * _channel(scale, x.dim())
            if bias is not None:
                y = y + _channel(bias.to(sd), x.dim())
            y = y.to(x.dtype)
        ctx.spec = spec
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.psi_ring = psi_ring  # (updated in backward: not saved, which would pin its version)
        ctx.save_for_backward(x, weight, valid, chi_bar, invstd, n, t, ok)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "expected no double backward through moving-average batch norm: its backward "
                "is not the gradient of its forward (got create_graph=True)"
            )
        x, weight, valid, chi_bar, invstd, n, t, ok = ctx.saved_tensors
        spec: _Spec = ctx.spec
        psi_ring: Tensor = ctx.psi_ring
        sd = chi_bar.dtype
        dims = _dims(x)
        scale = invstd if weight is None else invstd * weight.to(sd)
        if _fast(x, valid) and dy.dtype == x.dtype:
            # The two sums in one pass (batch norm's evaluation-mode backward with mean 0
            # and variance χ̄); its grad_input costs more than the product below.
            zeros = torch.zeros_like(chi_bar, dtype=x.dtype)
            _, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, zeros, chi_bar.to(x.dtype), None, None, False, spec.eps,
                [False, True, True],
            )  # fmt: skip
            dgamma_sd = dgamma.to(sd)
            dx = dy * _channel(scale.to(dy.dtype), x.dim())
        else:
            ds = dy.to(sd)
            xs = x.to(sd)
            dbeta = ds.sum(dims)
            dgamma_sd = (ds * xs).sum(dims) * invstd
            dgamma = dgamma_sd
            dx = ds * _channel(scale, x.dim())
        psi_total = dgamma_sd if weight is None else dgamma_sd * weight.to(sd)
        if spec.distributed:
            psi_total = all_reduce_sum(psi_total, spec.process_group)
        psi = psi_total / n
        psi_bar, new_ring = window_average(psi_ring, psi, t, spec.warmup_steps)
        psi_ring.copy_(torch.where(ok, new_ring, psi_ring))
        coef = _channel((-psi_bar * invstd * invstd).to(dx.dtype), x.dim())
        if valid is None:
            dx = dx.addcmul_(x.to(dx.dtype), coef)
        else:
            dx = dx + torch.where(valid, x.to(dx.dtype) * coef, 0.0)
        grad_weight = dgamma.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = dbeta.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx.to(x.dtype), grad_weight, grad_bias, None, None, None, None, None, None


def batch_norm_moving_average_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    state: MovingState,
    warmup_steps: int,
    *,
    mask: Tensor | None = None,
    running: RunningState | None = None,
    skip_nonfinite: bool = True,
    distributed: bool = False,
    process_group: Any = None,
) -> Tensor:
    """One training step of moving-average batch norm on ``x`` (channels at dim 1); see
    the module docstring. ``mask``: bool, x's shape without dim 1 (True = valid)."""
    chi_ring, psi_ring, steps = state
    valid = None if mask is None else mask.unsqueeze(1)
    spec = _Spec(float(eps), int(warmup_steps), bool(skip_nonfinite), distributed, process_group)
    out: Tensor = _MovingAverageNorm.apply(
        x, weight, bias, valid, chi_ring, psi_ring, steps, spec, running
    )
    return out
