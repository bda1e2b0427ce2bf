"""Stateless batch-normalization ops on torch tensors.

The pipeline: per-channel moments (count, mean, M2) → normalize → affine (→ residual add
and activation), and the running-statistics update. The math is stated in
:mod:`bnorm.reference`; this module computes the same thing with torch, differentiably.
:func:`batch_norm` resolves its options into a :class:`~bnorm.plan.Plan` (a layer keeps
its own) and :func:`run_plan` checks the call and takes one of these paths to the same
numbers:

* **evaluation** (the running statistics normalize) — torch's own op
  (``torch.nn.functional.batch_norm``, so export, ONNX, quantization and FLOP counters
  see the standard batch norm), then :func:`bnorm.ops.activation_tail` for a residual
  and an activation;
* **plain training on CPU** — no Batch Renorm, ghost batches, sync, activation or
  memory-efficient mode, running statistics in the input's dtype: ATen's
  ``native_batch_norm`` updates the running statistics itself, and a batch whose
  statistics are not finite is undone from a copy (``skip_nonfinite``);
* **training with the whole input's statistics** — otherwise without a mask, ghost
  batches or other ranks: ATen's kernel (Batch Renorm's (r, d) folded into the affine
  parameters; the running statistics updated by ATen as above on CPU, else by
  :func:`update_running_stats`), or, with a residual, an activation or the
  memory-efficient mode, :mod:`bnorm.kernels`' fused BN + activation Function — compiled
  with torch.compile by default, its eager fallback with ``BNORM_NO_COMPILE=1`` or
  after a failed compile. Inside an enclosing torch.compile ATen's batch norm and the
  tail are traced instead, for Inductor to fuse (the memory-efficient mode keeps the
  Function: its saving needs its own backward);
* **the moments path** — where the statistics are not those of the whole local input
  (masked positions, ghost batches, other ranks), and Batch Renorm when the kernels are
  compiled: one fused autograd Function with an analytic backward
  (:mod:`bnorm.kernels.moments`); inside an enclosing torch.compile, and for double
  backward, its differentiable twin built from :func:`moments`, :func:`pool_moments`
  and :func:`normalize`. Moments are carried as (count, mean, M2) so that groups, masks
  and processes merge exactly (Chan et al.), without the E[x²] − E[x]² cancellation.

Any channel axis is moved to position 1 as a view (an NHWC tensor is an NCHW tensor in
channels_last layout, which the kernels handle natively). Statistics are computed in
float32 (or float64 for float64 inputs) for half-precision inputs; the output keeps the
input's dtype. float16, bfloat16 and float32 inputs, parameters and running statistics
mix freely (bf16 parameters with float32 running statistics, as FSDP2's mixed precision
makes them); float64 does not mix (``_check_dtypes``, the one place of the rule).
"""

from __future__ import annotations

import ctypes
import functools
import math
import weakref
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._math import Moments, finite_stats, running_update
from .distributed import world_size
from .kernels import (
    MovingState,
    RunningState,
    batch_norm_act_train,
    batch_norm_moments_train,
    batch_norm_moving_average_train,
    compile_enabled,
    fused_pays,
    fused_step,
    native_try,
    store_running,
)
from .ops import (
    _channel_axis,
    _moments_composite,
    _stats_dtype,
    activation_tail,
    merge_moments,
    moments,
    normalize,
    pool_moments,
    renorm_correction,
)
from .options import Activation, MovingAverage, Renorm
from .plan import (
    Plan,
    check_cumulative_average_has_count,
    check_eps,
    check_renorm_has_running_stats,
    check_whole_input,
)

__all__ = [
    "Moments",
    "MovingAverage",
    "Renorm",
    "batch_norm",
    "merge_moments",
    "moments",
    "normalize",
    "pool_moments",
    "renorm_correction",
    "update_running_stats",
]


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
    check_cumulative_average_has_count(momentum, num_batches_tracked)
    state = _running_buffers(
        running_mean, running_var, momentum, num_batches_tracked, num_batches_skipped
    )
    new = running_update(running_mean, running_var, mean, var, count, state[2], skip_nonfinite)
    store_running(state, *new)


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


def _check_input(t: _Tensors, axis: int) -> int:
    """Validate the tensors of a call (:func:`batch_norm`'s arguments); returns the
    channel axis, normalized."""
    input, mask = t.input, t.mask
    if not isinstance(input, Tensor):
        raise TypeError(f"expected input to be a Tensor (got {type(input).__name__})")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input (got dtype {input.dtype})")
    if input.dim() < 2:
        raise ValueError(f"expected an input of at least 2 dimensions (got {input.dim()}D input)")
    ax = _channel_axis(input.dim(), axis)
    channels = input.shape[ax]
    for name in ("running_mean", "running_var", "weight", "bias"):
        _check_vector(name, getattr(t, name), channels)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(
                f"expected mask to be a bool Tensor or None (got {type(mask).__name__})"
            )
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
        # Needs the host: raising on too few valid values cannot be a device select. (Eager
        # only: under torch.compile the check is a device select instead, see batch_norm.)
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
    virtual_batch_size: int | None = None,
    renorm: Renorm | None = None,
    sync: bool = False,
    process_group: Any = None,
    residual: Tensor | None = None,
    activation: str | Activation | None = None,
    memory_efficient: bool = False,
    moving_average: MovingAverage | bool | None = None,
    moving_state: MovingState | None = None,
) -> Tensor:
    """Batch normalization, ``y = γ (x − μ)/√(σ² + ε) + β`` per channel.

    Same results as :func:`torch.nn.functional.batch_norm` for ``axis=1``; any channel
    axis otherwise (``axis=-1`` for NHWC). In training (or when no running statistics are
    given), μ and σ² are the batch's mean and biased variance over every axis but
    ``axis`` — over the positions where ``mask`` is True if a mask is given (every
    position, padded ones included, is then normalized with them) — and the running
    statistics, if given, are updated as in :func:`update_running_stats`
    (``momentum=None``: cumulative average, which needs ``num_batches_tracked``). In
    evaluation the running statistics normalize every position.

    Training options, which compose:

    * ``virtual_batch_size=k`` (ghost batch norm): each group of k consecutive samples
      is normalized with its own statistics; the running statistics are updated from the
      moments of all groups merged (as if from the whole batch). k must divide a batch
      larger than k; a batch of at most k samples is a single group (plain batch norm).
    * ``renorm`` (a :class:`Renorm`): Batch Renormalization with the (r, d) correction,
      from the running statistics before this step's update and the schedule at step
      ``num_batches_tracked``. Needs running statistics.
    * ``sync=True``: statistics of the global batch over ``process_group`` (one
      all_gather forward, one all_reduce backward; see :mod:`bnorm.distributed`); local
      when torch.distributed is not initialized or the group has one rank.
    * ``moving_average`` (a :class:`MovingAverage`, or True for the paper's defaults):
      moving-average batch norm (MABN) — reduced normalization ``y = γ x/√(χ̄ + ε) + β``
      with χ̄ the moving average of the last batches' mean of x², and a backward that
      uses the moving average of the batch's gradient statistic (see
      :class:`MovingAverage`). Its state ``moving_state`` = (chi ring, psi ring, steps)
      — two (window, C) tensors in the statistics' dtype and a long scalar, zeros to
      start — is updated in place; the running statistics become EMAs of χ̄ (running
      variance) and of the center 0 (running mean), so evaluation is batch norm's own
      formula. Composes with masks and sync; not with ghost batches, renorm or the
      memory-efficient mode. Needs at least 1 value per channel.

    ``num_batches_tracked``/``num_batches_skipped`` (long scalars), if given, are
    incremented in place in training; see :func:`update_running_stats` for
    ``skip_nonfinite``. A mask with fewer than 2 valid values per channel raises
    ``ValueError`` (a host read of the count); under ``torch.compile``, where the count
    cannot be read, such a batch is not an error: it leaves the running statistics
    unchanged and counts in ``num_batches_skipped`` (a select on the device).

    ``residual`` and ``activation`` (a name in :data:`bnorm.kernels.ACTIVATIONS` or a
    :class:`bnorm.kernels.Activation`) make it ``act(y + residual)``; in training with the
    statistics of the whole input that is one fused kernel (:mod:`bnorm.kernels`), and
    ``memory_efficient=True`` saves only its output for backward (invertible activations;
    not with masks, ghost batches or sync).

    Dtypes: the statistics are computed in float32 (float64 for a float64 input) and
    the output has the input's dtype; float16, bfloat16 and float32 input, weight, bias
    and running statistics mix (say bf16 input and parameters, float32 running
    statistics); the running statistics are updated in their own dtype, the gradients of
    weight and bias come in theirs. float64 does not mix with other dtypes (``TypeError``).

    Shape:
        input: (N, C, *) with C at ``axis``; mask: input's shape without ``axis``;
        residual: like input; running_mean, running_var, weight, bias: (C,);
        output: like input.
    """
    plan = _plan_for(
        momentum, eps, axis, skip_nonfinite, virtual_batch_size, renorm, sync, process_group,
        activation, memory_efficient, moving_average,
    )
    tracked, skipped = num_batches_tracked, num_batches_skipped
    return run_plan(
        plan, input, running_mean, running_var, weight, bias, training, tracked, skipped,
        mask=mask, residual=residual, moving=moving_state,
    )


def _plan_for(*options: Any) -> Plan:
    """The plan of :func:`batch_norm`'s options, built once per distinct set (cached)."""
    try:
        return _cached_plan(*options)
    except TypeError as err:
        if "unhashable" not in str(err):
            raise
        return _build_plan(*options)  # (raises the option's own error)


# batch_norm's options, in the order _plan_for takes them.
_OPTIONS = (
    "momentum", "eps", "axis", "skip_nonfinite", "virtual_batch_size", "renorm", "sync",
    "process_group", "activation", "memory_efficient", "moving_average",
)


def _build_plan(*options: Any) -> Plan:
    return Plan.build(**dict(zip(_OPTIONS, options, strict=True)))


_cached_plan = functools.lru_cache(maxsize=256)(_build_plan)


def run_plan(
    plan: Plan,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    residual: Tensor | None = None,
    moving: MovingState | None = None,
) -> Tensor:
    """:func:`batch_norm` with its options resolved into ``plan``: check the input,
    decide what depends on it (the path), run that one path. A layer calls this with the
    plan it keeps."""
    if training and mask is None and type(input) is Tensor and plan.plain_statistics:
        # (The common call, before anything else is built: the native node where it takes
        # the call's tensors as they are, else see _plain_training.)
        tensors = (input, weight, bias, residual, running_mean, running_var,
                   num_batches_tracked, num_batches_skipped)  # fmt: skip
        if _native_route(plan, *tensors):
            fused = native_try(
                *tensors,  # type: ignore[arg-type]  # (checked: _native_route)
                eps=plan.eps, activation=plan.activation, momentum=plan.momentum,  # type: ignore[arg-type]
                skip_nonfinite=plan.skip_nonfinite,
            )  # fmt: skip
            if fused is not None:
                return fused[0]
        out = _plain_training(
            plan, input, running_mean, running_var, weight, bias, num_batches_tracked,
            num_batches_skipped, residual,
        )
        if out is not None:
            return out
    t = _Tensors(
        input, running_mean, running_var, weight, bias, num_batches_tracked,
        num_batches_skipped, mask, residual, moving,
    )
    call = _check_call(plan=plan, t=t, training=training)
    if call.compute_dtype is not None:  # mixed dtypes: see _check_dtypes
        cast = call.compute_dtype
        t = t._replace(
            weight=None if weight is None else weight.to(cast),
            bias=None if bias is None else bias.to(cast),
        )
    if not call.distributed and input.numel() == 0:
        return _empty_batch(plan=plan, call=call, t=t)
    if not call.batch_stats:
        return _evaluation(plan=plan, call=call, t=t)
    if plan.moving_average is not None:
        return _moving_average_training(plan=plan, call=call, t=t)
    # Batch Renorm's extra statistics pass costs more in ATen than in the compiled
    # moments kernel, which computes the statistics, (r, d) and the output in one call;
    # inside an enclosing torch.compile the moments path emits differentiable ops.
    renorm_fused = (
        plan.renorm is not None
        and not plan.memory_efficient
        and (torch.compiler.is_compiling() or compile_enabled())  # Dynamo: never traces the 2nd
    )
    if mask is None and call.groups is None and not call.distributed and not renorm_fused:
        return _native_training(plan=plan, call=call, t=t)
    return _moments_training(plan=plan, call=call, t=t)


def _native_route(
    plan: Plan,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
) -> bool:
    """Whether a plain-statistics training call may take :func:`bnorm.kernels.native_try`:
    a fused tail (an activation or a residual), running statistics updated with a
    momentum, ε > 0, channels at dim 1, a plain tensor as residual, tensors (or None)
    where tensors go. (The tensors' own checks are native_try's; where it declines, the
    general path decides — and raises what is wrong.)"""
    ax = plan.axis
    return (
        (residual is not None or plan.tail)
        and plan.momentum is not None
        and plan.eps > 0
        and (ax == 1 or ax == 1 - input.dim())
        and (residual is None or type(residual) is Tensor)
        and isinstance(running_mean, Tensor)
        and isinstance(running_var, Tensor)
        and (weight is None or isinstance(weight, Tensor))
        and (bias is None or isinstance(bias, Tensor))
        and (num_batches_tracked is None or isinstance(num_batches_tracked, Tensor))
        and (num_batches_skipped is None or isinstance(num_batches_skipped, Tensor))
    )


class _Tensors(NamedTuple):
    """The tensors of one call, as given (built once, past the plain path)."""

    input: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    num_batches_tracked: Tensor | None
    num_batches_skipped: Tensor | None
    mask: Tensor | None
    residual: Tensor | None
    moving: MovingState | None


class _Call(NamedTuple):
    """What :func:`run_plan` decided from the input and state of one call."""

    axis: int  # the channel axis, normalized
    batch_stats: bool  # normalize with the batch's statistics
    update: bool  # update the running statistics
    groups: int | None  # ghost batches in this input (None: one)
    distributed: bool  # statistics across more than one process
    # The dtype the affine parameters (and, in evaluation, the running statistics) go to
    # the kernels in; None: as they are (see _check_dtypes).
    compute_dtype: torch.dtype | None = None


def _check_call(*, plan: Plan, t: _Tensors, training: bool) -> _Call:
    """Every check of one call's input and state against the plan (raising before
    anything changes), and what they decide."""
    input, running_mean, running_var, mask = t.input, t.running_mean, t.running_var, t.mask
    ax = _check_input(t, plan.axis)
    if (running_mean is None) != (running_var is None):
        raise ValueError("expected running_mean and running_var both given or both None")
    compute_dtype = _check_dtypes(input, running_mean, running_var, t.weight, t.bias)
    _check_residual(input, t.residual)
    use_batch_stats = training or running_mean is None
    check_eps(plan.eps, use_batch_stats)
    update = training and running_mean is not None
    if update:
        check_cumulative_average_has_count(plan.momentum, t.num_batches_tracked)
    groups = None
    if use_batch_stats and plan.virtual_batch_size is not None:
        groups = _ghost_groups(input, ax, plan.virtual_batch_size)
    if use_batch_stats:
        check_renorm_has_running_stats(plan.renorm, running_mean is not None)
        check_whole_input(plan.memory_efficient, "a mask" if mask is not None else "")
    distributed = use_batch_stats and plan.sync and world_size(plan.process_group) > 1
    if use_batch_stats:
        _check_batch_size(plan, t, ax, groups, distributed)
    return _Call(ax, use_batch_stats, update, groups, distributed, compute_dtype)


def _check_batch_size(
    plan: Plan, t: _Tensors, ax: int, groups: int | None, distributed: bool
) -> None:
    """Enough values per channel for the batch's statistics (and the moving-average
    state, with its option)."""
    input, mask = t.input, t.mask
    # Under torch.compile a mask's count of valid values is data: reading it would break
    # the graph (and synchronize). There a batch with fewer than 2 valid values per
    # channel is not an error; it leaves the running statistics unchanged and counts in
    # num_batches_skipped (a device select, in the moments path).
    host_mask_check = mask is not None and not torch.compiler.is_compiling()
    if plan.moving_average is not None:
        _check_moving_state(t.moving, plan.moving_average.window, input.shape[ax])
        if not distributed and host_mask_check and _values_per_channel(input, ax, mask) < 1:
            raise ValueError(
                "expected at least 1 valid value per channel when training with "
                f"moving_average (got 0 for input of shape {tuple(input.shape)} with its mask)"
            )
    elif not distributed and (mask is None or host_mask_check):
        count = _values_per_channel(input, ax, mask)
        per_group = count // groups if groups and mask is None else count
        if per_group == 1 or (mask is not None and count < 2 and input.numel() > 0):
            raise ValueError(
                "expected more than 1 value per channel when training "
                f"(got {per_group} for input of shape {tuple(input.shape)}"
                + (" with its mask)" if mask is not None else ")")
                + ("" if groups is None else f" in each of {groups} virtual batches")
            )


def _check_dtypes(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> torch.dtype | None:
    """The mixed-dtype rule, decided once per call: the statistics are computed in
    float32 (float64 for a float64 input; ``ops._stats_dtype``) and the output has the
    input's dtype, whatever the dtypes of the parameters and running statistics. float16,
    bfloat16 and float32 mix freely (bf16 parameters with float32 running statistics, as
    FSDP2's ``MixedPrecisionPolicy`` makes them, or float32 ones under autocast); float64
    does not mix. Running statistics are updated in their own dtype; the parameters'
    gradients come back in the parameters' dtype.

    Returns the dtype the affine parameters (and, in evaluation, the running statistics)
    are given to the kernels in — the statistics dtype when the call mixes dtypes — or
    None when every tensor has the input's dtype (nothing to cast)."""
    dtype = input.dtype
    if (
        (weight is None or weight.dtype == dtype)
        and (bias is None or bias.dtype == dtype)
        and (running_mean is None or running_mean.dtype == dtype)
        and (running_var is None or running_var.dtype == dtype)
    ):
        return None  # (the common call: one floating-point dtype throughout)
    given = [
        (name, t)
        for name, t in (
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        )
        if t is not None
    ]
    for name, t in given:
        if not t.is_floating_point():
            raise TypeError(f"expected a floating-point {name} (got dtype {t.dtype})")
    if running_mean is not None and running_var is not None:
        if running_mean.dtype != running_var.dtype:
            raise TypeError(
                "expected running_mean and running_var of one dtype (got "
                f"{running_mean.dtype} and {running_var.dtype})"
            )
    if any(t.dtype == torch.float64 for _, t in (("input", input), *given)):
        got = ", ".join(f"{name} {t.dtype}" for name, t in (("input", input), *given))
        raise TypeError(
            "expected float64 for all or none of input, weight, bias and running statistics: "
            f"float64 does not mix with other dtypes (got {got}); convert the layer and the "
            "input to one dtype (.double(), or .float() and a float32 input)"
        )
    return _stats_dtype(input.dtype)


def _check_moving_state(moving: Any, window: int, channels: int) -> None:
    """``moving_state`` of a moving-average call: (chi, psi) rings of shape
    (window, C) in one floating dtype and a long scalar step count."""
    if moving is None:
        raise ValueError(
            "expected moving_state=(chi ring, psi ring, steps) with moving_average in "
            "training (got None)"
        )
    if not (isinstance(moving, tuple) and len(moving) == 3):
        raise TypeError(
            "expected moving_state to be a tuple of 3 tensors (chi ring, psi ring, steps) "
            f"(got {type(moving).__name__})"
        )
    chi, psi, steps = moving
    for name, ring in (("chi", chi), ("psi", psi)):
        if not isinstance(ring, Tensor) or not ring.is_floating_point():
            raise TypeError(f"expected the {name} ring to be a floating-point Tensor")
        if tuple(ring.shape) != (window, channels):
            raise ValueError(
                f"expected the {name} ring of shape ({window}, {channels}) for window={window} "
                f"and {channels} channels (got {tuple(ring.shape)})"
            )
    if (
        not isinstance(steps, Tensor)
        or steps.dim() != 0
        or steps.dtype not in (torch.long, torch.int32)
    ):
        raise TypeError("expected the moving-average step count to be an integer scalar Tensor")


def _evaluation(*, plan: Plan, call: _Call, t: _Tensors) -> Tensor:
    """The running statistics normalize: torch's own op (aten::batch_norm), so that
    export, ONNX, jit.freeze, quantization and FLOP counters see the standard batch norm;
    then the activation tail."""
    ax = call.axis
    x = t.input.movedim(ax, 1) if ax != 1 else t.input
    running_mean, running_var = t.running_mean, t.running_var
    if call.compute_dtype is not None and running_mean is not None:
        running_mean = running_mean.to(call.compute_dtype)  # (read only: no update)
        running_var = running_var.to(call.compute_dtype)  # type: ignore[union-attr]
    out = torch.nn.functional.batch_norm(
        x, running_mean, running_var, t.weight, t.bias, False, 0.0, plan.eps
    )
    return activation_tail(out.movedim(1, ax) if ax != 1 else out, t.residual, plan.activation)


def _moving_average_training(*, plan: Plan, call: _Call, t: _Tensors) -> Tensor:
    """Moving-average batch norm (:mod:`bnorm.kernels.moving_average`), then the
    activation tail, unfused (autograd ops) when there is one."""
    ax = call.axis
    x = t.input.movedim(ax, 1) if ax != 1 else t.input
    warmup = plan.moving_average.warmup_steps  # type: ignore[union-attr]
    moving: MovingState = t.moving  # type: ignore[assignment]  # (checked: _check_batch_size)
    out = batch_norm_moving_average_train(
        x, t.weight, t.bias, plan.eps, moving, warmup, mask=t.mask,
        running=_running_state(plan, call, t), skip_nonfinite=plan.skip_nonfinite,
        distributed=call.distributed, process_group=plan.process_group,
    )
    out = out.movedim(1, ax) if ax != 1 else out
    return activation_tail(out, t.residual, plan.activation)


def _empty_batch(*, plan: Plan, call: _Call, t: _Tensors) -> Tensor:
    """Nothing to normalize, nothing learned: torch's convention (the batch counts, when
    the running statistics are updated; the output stays connected to γ and β)."""
    if call.update and t.num_batches_tracked is not None:
        t.num_batches_tracked.add_(1)
    out = t.input.clone()
    if t.weight is not None:
        out = out * t.weight.reshape(-1)[:1].sum().to(out.dtype)
    if t.bias is not None:
        out = out + t.bias.reshape(-1)[:1].sum().to(out.dtype)
    return activation_tail(out, t.residual, plan.activation)


def _moments_training(*, plan: Plan, call: _Call, t: _Tensors) -> Tensor:
    """The moments path (masks, ghost batches, sync, fused Batch Renorm): one fused
    Function with an analytic backward (:mod:`bnorm.kernels.moments`); eagerly, or inside
    an enclosing torch.compile its differentiable twin ``_moments_composite`` (which
    double backward differentiates too), with the running update as device selects."""
    ax, groups, mask = call.axis, call.groups, t.mask
    x = t.input.movedim(ax, 1) if ax != 1 else t.input
    res = t.residual.movedim(ax, 1) if t.residual is not None and ax != 1 else t.residual
    renorm_args = None
    limits = _renorm_limits(plan, t)
    if limits is not None and t.running_mean is not None and t.running_var is not None:
        renorm_args = (_snapshot(t.running_mean), _snapshot(t.running_var), *limits)
    running = _running_state(plan, call, t)
    if not torch.compiler.is_compiling():
        out = batch_norm_moments_train(
            x, t.weight, t.bias, plan.eps, groups=groups or 1, mask=mask, residual=res,
            activation=plan.activation, renorm=renorm_args, running=running,
            skip_nonfinite=plan.skip_nonfinite, process_group=plan.process_group,
            distributed=call.distributed,
        )
        return out.movedim(1, ax) if ax != 1 else out
    # Inside an enclosing torch.compile: the differentiable ops, which Inductor fuses.
    out, batch = _moments_composite(
        x, t.weight, t.bias, res, mask, None, None, renorm_args=renorm_args, eps=plan.eps,
        groups=groups, act=plan.activation, distributed=call.distributed,
        process_group=plan.process_group,
    )
    if running is not None:
        total = pool_moments(batch) if groups is not None else batch
        var = total.m2 / total.count.clamp_min(1)
        rm, rv, alpha = running[0], running[1], running[2]
        new = running_update(rm, rv, total.mean, var, total.count, alpha, plan.skip_nonfinite)
        if mask is not None:
            # The eager host check (fewer than 2 valid values raises) as a select:
            # such a batch leaves the running statistics unchanged and counts as skipped.
            enough = (total.count > 1).all()
            new = (
                torch.where(enough, new[0], rm),
                torch.where(enough, new[1], rv),
                new[2] & enough,
            )
        store_running(running, *new)
    return out.movedim(1, ax) if ax != 1 else out


def _plain_training(
    plan: Plan,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    residual: Tensor | None = None,
) -> Tensor | None:
    """The common call — plain batch norm training on CPU with running statistics of the
    input's dtype — straight to ATen's kernel, when the input and state make every check
    of :func:`run_plan` pass by construction; None otherwise (the general path then
    checks, and raises its own errors). Checks here only compare shapes and numbers. It
    takes the call's tensors as they come: it runs before anything is decided, and builds
    no object (``_Tensors``, ``_Call``) the other paths need, to keep its per-call cost.
    With a residual or an activation: for an input too small for the fused kernels
    (:func:`bnorm.kernels.fused_pays`), ATen's batch norm, then the add and the activation
    (:func:`bnorm.ops.activation_tail`); otherwise the fused kernels, called as
    :func:`_native_training` calls them."""
    if (
        running_mean is None
        or running_var is None
        or not input.is_cpu
        or input.dtype not in (torch.float32, torch.float64)
        or running_mean.dtype != input.dtype
        or running_var.dtype != input.dtype
        or plan.eps <= 0
        or torch.compiler.is_compiling()
    ):
        return None
    ndim = input.dim()
    ax = plan.axis if plan.axis >= 0 else plan.axis + ndim
    if ndim < 2 or not 0 <= ax < ndim:
        return None
    channels = input.shape[ax]
    shape = (channels,)
    if (
        not isinstance(running_mean, Tensor)
        or not isinstance(running_var, Tensor)
        or running_mean.shape != shape
        or running_var.shape != shape
        or (weight is not None and (not isinstance(weight, Tensor) or weight.shape != shape))
        or (bias is not None and (not isinstance(bias, Tensor) or bias.shape != shape))
        or (weight is not None and weight.dtype != input.dtype)  # (mixed: the general path)
        or (bias is not None and bias.dtype != input.dtype)
        or input.numel() <= channels  # (one value per channel, or none)
    ):
        return None
    tail = residual is not None or plan.tail
    if (
        tail
        and residual is not None
        and (
            type(residual) is not Tensor
            or residual.shape != input.shape
            or residual.dtype != input.dtype
        )
    ):
        return None
    check_cumulative_average_has_count(plan.momentum, num_batches_tracked)
    x = input.movedim(ax, 1) if ax != 1 else input
    rm, rv, tracked, skipped = running_mean, running_var, num_batches_tracked, num_batches_skipped
    if tail:
        # The fused kernels where they pay, as _native_training calls them (for this
        # call's state, every check it would make has passed above): without its checks'
        # fixed cost, the decision and the call in one (kernels.fused_step).
        running = _running_buffers(rm, rv, plan.momentum, tracked, skipped)
        res = residual.movedim(ax, 1) if residual is not None and ax != 1 else residual
        fused = fused_step(
            x, weight, bias, res, plan.eps, plan.activation, running, plan.skip_nonfinite
        )
        if fused is not None:
            return fused[0].movedim(1, ax) if ax != 1 else fused[0]
    out = _native_training_cpu_update(plan, x, weight, bias, rm, rv, tracked, skipped)
    out = out.movedim(1, ax) if ax != 1 else out
    return activation_tail(out, residual, plan.activation) if tail else out


def _snapshot(t: Tensor) -> Tensor:
    """``t`` itself in eager mode; under torch.compile, a copy of its value now. Batch
    Renorm reads the running statistics (and the step) that the same step then updates in
    place, and its (r, d) enter the backward. AOTAutograd's partitioner may recompute
    (r, d) in the backward from the buffer rather than save them — reading it after the
    update: wrong gradients (the upstream fix is pytorch/pytorch PR 197039). A copy made
    with ``copy_`` was not enough: functionalized, it is a clone, which the partitioner
    recomputes from the buffer when the graph around it makes that cheaper (a renorm layer
    whose input is another layer's output squared did). The copy is an opaque custom op,
    which the partitioner never recomputes: its output is saved."""
    if not torch.compiler.is_compiling():
        return t
    return _snapshot_op(t)


@torch.library.custom_op("bnorm::snapshot", mutates_args=())
def _snapshot_op(t: Tensor) -> Tensor:
    """A copy of ``t`` that AOTAutograd's partitioner saves rather than recomputes."""
    return t.clone()


@_snapshot_op.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def _check_residual(input: Tensor, residual: Tensor | None) -> None:
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"expected residual to be a Tensor or None (got {type(residual).__name__})")
    if residual.shape != input.shape:
        raise ValueError(
            f"expected a residual of the input's shape {tuple(input.shape)} "
            f"(got {tuple(residual.shape)})"
        )
    if not residual.is_floating_point():
        raise TypeError(f"expected a floating-point residual (got dtype {residual.dtype})")


def _ghost_groups(input: Tensor, ax: int, virtual_batch_size: int) -> int | None:
    """How many ghost batches this input makes (None: one); the plan checked the option."""
    if ax == 0:
        raise ValueError("virtual_batch_size needs the samples on axis 0 (got channel axis 0)")
    n = input.shape[0]
    if n <= virtual_batch_size:
        return None  # a batch no larger than one ghost batch is a single group
    if n % virtual_batch_size:
        raise ValueError(
            f"expected a batch size divisible by virtual_batch_size={virtual_batch_size} "
            f"(got {n}); drop the last incomplete batch (DataLoader(drop_last=True))"
        )
    return n // virtual_batch_size


def _renorm_limits(plan: Plan, t: _Tensors) -> tuple[Tensor, Tensor] | None:
    """Batch Renorm's (r_max, d_max) at step ``num_batches_tracked`` (None: no renorm)."""
    if plan.renorm is None:
        return None
    if t.num_batches_tracked is not None:
        step = _snapshot(t.num_batches_tracked.to(t.input.device))
    else:
        step = torch.zeros((), dtype=torch.long, device=t.input.device)
    return plan.renorm.limits(step)


def _running_state(plan: Plan, call: _Call, t: _Tensors) -> RunningState | None:
    """The buffers a fused kernel updates in place (None: nothing to update)."""
    if not call.update:
        return None
    return _running_buffers(
        t.running_mean,  # type: ignore[arg-type]  # (given: call.update)
        t.running_var,  # type: ignore[arg-type]
        plan.momentum,
        t.num_batches_tracked,
        t.num_batches_skipped,
    )


def _running_buffers(
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
) -> RunningState:
    """The running buffers with this batch's weight α: momentum, or 1/t for the cumulative
    average (``check_cumulative_average_has_count`` passed: t is given)."""
    alpha: float | Tensor
    if momentum is None:
        # Divide in the statistics' dtype: 1.0 / long_tensor would be float32.
        alpha = 1.0 / (num_batches_tracked + 1).to(running_mean.dtype)  # type: ignore[operator,union-attr]
    else:
        alpha = momentum
    return (running_mean, running_var, alpha, num_batches_tracked, num_batches_skipped)


def _native_training(*, plan: Plan, call: _Call, t: _Tensors) -> Tensor:
    """Training with the statistics of the whole input: ATen's fused kernel, or
    :mod:`bnorm.kernels`' fused one with a residual, an activation or memory_efficient."""
    ax, update = call.axis, call.update
    running_mean, running_var, weight, bias = t.running_mean, t.running_var, t.weight, t.bias
    eps, activation, memory_efficient = plan.eps, plan.activation, plan.memory_efficient
    residual, skip_nonfinite = t.residual, plan.skip_nonfinite
    x = t.input.movedim(ax, 1) if ax != 1 else t.input
    count = x.numel() // x.shape[1]
    limits = _renorm_limits(plan, t)
    if limits is not None:
        rm, rv = running_mean, running_var  # (given: renorm needs them, _check_call)
        weight, bias = _renorm_affine(x, weight, bias, rm, rv, limits, eps)  # type: ignore[arg-type]
    if (
        update
        and weight is None
        and x.dtype in (torch.float16, torch.bfloat16)
        and (bias is None or bias.dtype == torch.float32)
    ):
        # Without a float32 weight the kernel returns μ_B and 1/σ_B rounded to the input's
        # half-precision dtype; with one it returns them in float32.
        weight = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    # The fused kernels, except inside an enclosing torch.compile: there Inductor fusing
    # ATen's batch norm with the add and the activation itself measured faster (ResNet-20
    # step, 1 thread: 681 ms vs 882 ms tracing the kernels' Function); and except for small
    # CPU inputs, where their fixed cost exceeds what they save (kernels.fused_pays). The
    # memory-efficient mode's saving needs the kernels' own backward, compiled or not.
    tail = residual is not None or (activation is not None and activation.name != "identity")
    if memory_efficient or (
        tail
        and not torch.compiler.is_compiling()
        and fused_pays(x, memory_efficient, activation, residual)
    ):
        return _fused_training(plan, x, weight, bias, residual, ax, _running_state(plan, call, t))
    elif (
        update
        and x.device.type == "cpu"
        and running_mean is not None
        and running_var is not None
        and running_mean.dtype == _stats_dtype(x.dtype)
        and not torch.compiler.is_compiling()
    ):
        tracked, skipped = t.num_batches_tracked, t.num_batches_skipped
        out = _native_training_cpu_update(
            plan, x, weight, bias, running_mean, running_var, tracked, skipped
        )
        out = out.movedim(1, ax) if ax != 1 else out
        return activation_tail(out, residual, activation) if tail else out
    else:
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, None, None, True, 0.0, eps
        )
    out = out.movedim(1, ax) if ax != 1 else out
    if tail:
        out = activation_tail(out, residual, activation)
    if update:
        var = invstd.detach().to(_stats_dtype(x.dtype)).pow(-2) - eps
        rm, rv = running_mean, running_var  # (given: call.update)
        tracked, skipped = t.num_batches_tracked, t.num_batches_skipped
        update_running_stats(
            rm, rv, mean, var, count, plan.momentum, tracked, skipped, skip_nonfinite  # type: ignore[arg-type]
        )
    return out


def _fused_training(
    plan: Plan,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    ax: int,
    running: RunningState | None,
) -> Tensor:
    """The fused kernels' training step (:func:`bnorm.kernels.batch_norm_act_train`) on
    ``x`` (channels at dim 1) with the residual of the call's layout (channels at
    ``ax``); the output in the call's layout."""
    res = residual.movedim(ax, 1) if residual is not None and ax != 1 else residual
    out = batch_norm_act_train(
        x, weight, bias, res, plan.eps, plan.activation, plan.memory_efficient,
        running=running, skip_nonfinite=plan.skip_nonfinite,
    )[0]
    return out.movedim(1, ax) if ax != 1 else out


def _renorm_affine(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    limits: tuple[Tensor, Tensor],
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Batch Renorm as plain batch norm: γ·x̂ + β with x̂ = x̂_B·r + d is batch norm with
    weight γ·r and bias β + γ·d ((r, d) constants from this batch's statistics, channels
    at dim 1); the kernel then recomputes μ_B, σ_B with their gradients."""
    with torch.no_grad():
        if torch.compiler.is_compiling():  # (ATen's statistics op has no fake kernel)
            dims = [d for d in range(x.dim()) if d != 1]
            var_b, mean_b = torch.var_mean(x, dim=dims, correction=0)
        else:  # ATen's statistics pass (biased variance); much faster than var_mean
            mean_b, var_b = torch.batch_norm_update_stats(x, None, None, 0.0)
        mean_b = mean_b.to(_stats_dtype(x.dtype))
        var_b = var_b.to(_stats_dtype(x.dtype))
    rm, rv = _snapshot(running_mean), _snapshot(running_var)
    r, d = renorm_correction(mean_b, var_b, rm, rv, *limits, eps)
    pdtype = weight.dtype if weight is not None else r.dtype
    gamma = weight if weight is not None else torch.ones_like(r, dtype=pdtype)
    beta_d = gamma * d.to(pdtype)
    return gamma * r.to(pdtype), beta_d if bias is None else bias + beta_d


def _native_training_cpu_update(
    plan: Plan,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
) -> Tensor:
    """The plain training step on CPU (channels at dim 1): ATen's kernel updates the
    running statistics itself (torch's exact numbers, no extra pass over small tensors),
    and a batch whose statistics are not finite is undone from a copy. Reading a CPU
    scalar costs no device synchronization, so the check is a host branch here; elsewhere
    (CUDA, torch.compile) :func:`update_running_stats` decides with a select on the device
    (the same rule, :func:`bnorm._math.finite_stats`)."""
    momentum, eps = plan.momentum, plan.eps
    if momentum is None:  # cumulative average: batch t gets weight 1/t (t is given)
        alpha = 1.0 / (int(num_batches_tracked) + 1)  # type: ignore[arg-type]
    else:
        alpha = momentum
    saved = _save_running(running_mean, running_var) if plan.skip_nonfinite else None
    out, mean, invstd = torch.native_batch_norm(
        x, weight, bias, running_mean, running_var, True, alpha, eps
    )
    # A cheap test of the updated statistics first; only when it fails (or with α = 0,
    # where nothing moves) does the rule itself decide. (ATen computes σ²_B in the
    # input's dtype, so a variance beyond its range is inf in the update too.)
    if (
        saved is not None
        and (alpha == 0 or not _running_finite(running_mean, running_var))
        and not _batch_finite(mean, invstd, eps, x.numel() // x.shape[1], running_mean.dtype)
    ):
        _restore_running(saved, running_mean, running_var)
        if num_batches_skipped is not None:
            num_batches_skipped.add_(1)
    elif num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return out


# The guard against non-finite batches runs on every training step, so it is kept to what
# costs least per call: the copy through NumPy views of the two C-vectors, made once per
# buffer (no tensor op, no autograd dispatch); torch.stack where NumPy cannot see the
# buffers (a buffer that requires grad, a wrapper subclass, inside torch.func
# transforms, another device).
_Saved = Tensor | tuple[bytes, bytes]  # the copy: stacked by torch, or the raw bytes
_HOST_VIEWS: dict[int, tuple[Any, int, int, torch.dtype, np.ndarray]] = {}
_HOST_VIEWS_PURGE_AT = 256


def _host_view(t: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory, made once per tensor (``Tensor.numpy()`` on
    every call cost more than the rest of the guard). The view holds no reference to the
    tensor: it is used only while the tensor is alive and still has the same memory,
    size and dtype. Raises where ``Tensor.numpy()`` would."""
    entry = _HOST_VIEWS.get(id(t))
    ptr = t.data_ptr()
    if (
        entry is not None
        and entry[0]() is t
        and entry[1] == ptr
        and entry[2] == t.numel()
        and entry[3] is t.dtype
    ):
        return entry[4]
    whole = t.numpy()  # (raises for what NumPy cannot see)
    if not t.is_contiguous():
        return whole
    memory = (ctypes.c_char * (t.numel() * t.element_size())).from_address(ptr)
    view: np.ndarray = np.frombuffer(memory, dtype=whole.dtype)  # type: ignore[call-overload]
    if len(_HOST_VIEWS) >= _HOST_VIEWS_PURGE_AT:
        # Entries of dead tensors are dropped here, not by a weakref callback: a callback
        # runs Python code at any point of garbage collection, and a Ctrl-C that lands in
        # it is printed and ignored rather than raised.
        for key in [k for k, e in _HOST_VIEWS.items() if e[0]() is None]:
            del _HOST_VIEWS[key]
    _HOST_VIEWS[id(t)] = (weakref.ref(t), ptr, t.numel(), t.dtype, view)
    return view


def _save_running(running_mean: Tensor, running_var: Tensor) -> _Saved:
    """A copy of the running statistics before the update."""
    try:
        return _host_view(running_mean).tobytes(), _host_view(running_var).tobytes()
    except (RuntimeError, TypeError):
        with torch.no_grad():
            return torch.stack((running_mean, running_var))


def _running_finite(running_mean: Tensor, running_var: Tensor) -> bool:
    """Whether Σ mean·var of the updated statistics is finite: a non-finite μ_B or σ²_B
    makes the updated mean or variance non-finite, and then the sum (inf·0 is NaN). An
    overflow of the sum only sends the batch to the exact rule. (A torch op: as cheap
    here as NumPy's dot, and it never warns.)"""
    return math.isfinite(torch.dot(running_mean, running_var).item())


def _restore_running(saved: _Saved, running_mean: Tensor, running_var: Tensor) -> None:
    for buffer, data in zip((running_mean, running_var), saved, strict=True):
        if isinstance(data, bytes):  # (the buffer's values in order, its own dtype)
            data = torch.frombuffer(bytearray(data), dtype=buffer.dtype)
        buffer.copy_(data)


def _batch_finite(mean: Tensor, invstd: Tensor, eps: float, count: int, dtype: torch.dtype) -> bool:
    """:func:`bnorm._math.finite_stats` of ATen's saved statistics (μ_B, 1/√(σ²_B + ε))."""
    with torch.no_grad():
        var = invstd.to(dtype).pow(-2) - eps
        return bool(finite_stats(mean.to(dtype), var * (count / max(count - 1, 1))))
