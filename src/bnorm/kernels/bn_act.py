"""Fused training kernels for ``act(BN(x) + residual)``: one forward, one backward.

In a ResNet block's tail, batch norm, the residual add and the activation each read and
write the whole activation tensor and each allocate a new one. Here the three are one
autograd node whose forward and backward are each one kernel call: on CPU, for
float32/float64 and the piecewise-linear activations (identity, relu, leaky_relu), a
hand-written C/OpenMP kernel (:mod:`bnorm.kernels.native`) in a C++ autograd node (the
operator ``bnorm_native::bn_act_train``; where that cannot be built, in a lean Python
Function, :class:`_BatchNormActNative`); otherwise a :class:`torch.autograd.Function`
around a torch function compiled by :func:`torch.compile` (Inductor: C++/OpenMP on CPU,
Triton on GPU). Both compute::

    forward   μ, σ² per channel                         (one read of x)
              y = act(γ (x − μ)/√(σ² + ε) + β + r)      (one read of x [and r], one write)
    backward  z = γ x̂ + β + r (recomputed),  dz = dy · act'(z)
              Σ dz, Σ dz·x̂ per channel                 (one read of dy, x [and r])
              dx = γ/√(σ² + ε) · (dz − mean(dz) − x̂ · mean(dz·x̂)),  dr = dz   (a second read)

with x̂ = (x − μ)/√(σ² + ε), dγ = Σ dz·x̂, dβ = Σ dz. The statistics are sums of values
shifted by one sample of each channel — partial sums over contiguous rows in float32,
then those accumulated in float64 (no E[x²] − E[x]² cancellation at any realistic
offset) — kept in float32 (float64 for float64 inputs); half-precision inputs are
computed in float32 and rounded once at the end.

In training the forward kernel also computes the running-statistics update
(:func:`bnorm._math.running_update`), written into the buffers right after the call:
no separate pass of small eager ops per step.

Only x (and r) are saved for backward; y is not, so a conv → BN → act block saves the
conv's input and the BN input — 2× the activation size, where torch's separate layers
save 3× (conv input, BN input, activation output).

Inside a :func:`bnorm.memory_saving` scope the output is not saved by the layers that
consume it either: the forward computes the statistics (one call) and then y (another),
and the scope's hooks store a handle for y that recomputes it in backward with that same
second call from the saved x (and r) and the forward's scale and shift — bit for bit the
forward's y. A conv → BN → act block then keeps 1× the activation (see :mod:`bnorm.kernels.memory`).

**Memory-efficient mode** (In-Place Activated BatchNorm, Rota Bulò et al. 2018): for an
invertible activation — identity, leaky_relu with slope > 0, elu with α > 0 — only the
output y is saved (plus r with a residual); backward recovers z = act⁻¹(y) and
x̂ = (z − β − r)/γ. In a network, y is also the next layer's input, which that layer
saves anyway, so the block adds no activation-sized tensor of its own. Recovering x̂
divides by γ, so γ must not be 0: in this mode the forward uses
γ' = sign(γ) · max(|γ|, :data:`MIN_ABS_WEIGHT`) (sign(0) = +1) — identical to γ wherever
|γ| ≥ 10⁻³ — and γ's gradient passes straight through the clamp (it is the gradient with
respect to γ'), so a γ inside the band can still leave it. ELU's inverse is
z = log(1 + y/α) for y ≤ 0: where the output has saturated at −α (z below about −16 in
float32) z is clamped there, which only matters where dz = dy·(y + α) is already ~0.
In half precision x̂ is recovered from the half-precision output, so the gradients carry
that precision (about 3 significant digits in bfloat16).

**Compilation.** Each kernel is compiled once per (activation and its parameter,
residual or not, mode, dtype, running statistics updated or not, ``skip_nonfinite``)
with dynamic shapes; inputs are viewed as a contiguous (A_outer, A_inner, C, B)
tensor in memory order — NCHW is (N, 1, C, H·W), channels_last (N, H·W, C, 1) — so
memory layouts differ only in which of A_inner and B is 1 (one more compile each). The
first call of each compiles (seconds; docs/kernels.md gives the measured latency), later calls
reuse it, and Inductor's on-disk cache makes later processes faster. Tensors of at least
:data:`bnorm.kernels.compile.PARALLEL_MIN_NUMEL` elements get a second variant, OpenMP
code run with torch's thread count at each call (smaller ones run serial code). After
compiling, a call skips Dynamo's frame evaluation (the compiled code's own guards are
checked); it still costs ~30 µs of fixed overhead (AOTAutograd's and Inductor's
wrappers, output allocation), and a layer's forward+backward ~0.1–0.2 ms more than
torch's eager layers in all (Python and autograd), so on CPU inputs below
:data:`FUSED_MIN_NUMEL` elements per thread run ATen's ops instead (:func:`fused_pays`);
with the native kernels (~14 µs a forward through their C++ node) the threshold is
:data:`NATIVE_MIN_NUMEL`.
Plain batch norm (no activation, no residual) keeps ATen's kernel: these kernels
measured no consistent gain for it.
Set the environment variable ``BNORM_NO_COMPILE=1`` to use the eager fallback instead:
ATen's ``native_batch_norm``/``native_batch_norm_backward`` with ATen's activation ops
(memory-efficient mode: the same torch functions as the compiled kernels, run eagerly).
The fallback is also used, with a one-time warning, when compilation fails (e.g. no C++
compiler). Inside an enclosing ``torch.compile`` the uncompiled kernel functions are
traced into the caller's graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._math import running_update
from ..ops import _stats_dtype, activation_tail
from ..options import IDENTITY, Activation
from . import native
from .compile import _run, compile_enabled
from .layout import _channel_sum, _Layout, _per_channel, _per_channel3, _split
from .memory import current_scope, memory_saving
from .running import Running, RunningState, store_running

__all__ = [
    "FUSED_MIN_NUMEL",
    "MIN_ABS_WEIGHT",
    "NATIVE_MIN_NUMEL",
    "batch_norm_act_train",
    "fused_pays",
    "fused_step",
    "native_try",
]

MIN_ABS_WEIGHT = 1e-3
"""Memory-efficient mode uses γ' = sign(γ)·max(|γ|, MIN_ABS_WEIGHT) so that x̂ = (z − β)/γ'."""

FUSED_MIN_NUMEL = 1 << 18
"""On CPU, the smallest input (elements, per thread of torch's up to 2) whose training
step runs the fused Function with the compiled (or eager) kernels when nothing else needs
it. That forward+backward has a fixed cost of ~0.1–0.2 ms over torch's three eager ops (the
Function's Python and autograd node, two compiled calls with their output allocation),
which the traffic it saves repays only from about here on (docs/kernels.md gives the
measured sweep). Smaller inputs run ATen's batch norm (running statistics updated by ATen,
as in the plain layers), then the add and the activation: torch's own ops, torch's cost."""

NATIVE_MIN_NUMEL = 1 << 13
"""The same threshold (elements, whatever the thread count) where the native CPU kernels
run the step (:mod:`bnorm.kernels.native`: float32/float64, identity/relu/leaky_relu):
their fixed cost is one C++ autograd node with two kernel calls (the forward's ~14 µs at
2×64×8×8, against ~28 µs for torch's three ops), so they pay from a smaller size —
measured at 1 and 2 threads, where torch's ops at these sizes gain little from the second
thread (docs/kernels.md gives the crossover)."""


def fused_pays(
    x: Tensor,
    memory_efficient: bool,
    activation: Activation | None = None,
    residual: Tensor | None = None,
) -> bool:
    """Whether a training step of ``act(BN(x) + r)`` should run the fused Function rather
    than ATen's batch norm, add and activation: always in memory-efficient mode and inside
    a :func:`bnorm.memory_saving` scope (their saving needs the Function), off CPU (the
    thresholds were measured on CPU), never otherwise inside :mod:`torch.func` transforms
    (the fused Functions are refused there), and from :data:`NATIVE_MIN_NUMEL` elements on (the
    native kernels) or :data:`FUSED_MIN_NUMEL` elements per thread (the compiled ones; 1 or
    2 threads: the range measured, where their fixed cost weighed against time per element
    that halves with 2 threads). :func:`fused_step` makes the same decision."""
    if memory_efficient or not x.is_cpu:
        return True
    if torch._C._are_functorch_transforms_active():  # (torch.func: the Functions refuse)
        return False
    if torch.is_grad_enabled() and current_scope() is not None:
        return True
    act = activation if activation is not None else IDENTITY
    return _size_pays(x.numel(), lambda: native.supports(x, residual, act))


def _size_pays(numel: int, native_ok: Callable[[], bool]) -> bool:
    """:func:`fused_pays`'s thresholds, for an input of ``numel`` elements on CPU;
    ``native_ok()``: whether the native kernels take the call (asked only where the
    answer decides)."""
    if numel >= FUSED_MIN_NUMEL * min(torch.get_num_threads(), 2):
        return True
    return numel >= NATIVE_MIN_NUMEL and native_ok()


def fused_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    activation: Activation | None,
    running: RunningState | None,
    skip_nonfinite: bool,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`batch_norm_act_train` (not memory-efficient) where :func:`fused_pays` says
    the fused kernels pay for this call, else None (the caller runs ATen's ops): both
    decisions with each of their checks made once — the per-call path of the plain layers
    (``bnorm.functional``), where a forward's Python costs as much as its kernels at
    small batches. Not for use inside torch.compile's tracing (the caller checks)."""
    act = activation if activation is not None else IDENTITY
    if x.is_cpu:  # (off CPU, and in a memory_saving scope: always the Function)
        if torch._C._are_functorch_transforms_active():
            return None
        if not (torch.is_grad_enabled() and current_scope() is not None):
            native_ok = _native_takes(x, weight, bias, residual, act)
            if not _size_pays(x.numel(), lambda: native_ok):
                return None
            if native_ok:
                out = _native_node_step(
                    x, weight, bias, residual, eps, act, running, skip_nonfinite
                )
                if out is not None:
                    return out
    return batch_norm_act_train(
        x, weight, bias, residual, eps, act, running=running, skip_nonfinite=skip_nonfinite
    )


def _forward_kernel(
    x3: Tensor,
    weight: Tensor,
    bias: Tensor,
    r3: Tensor | None,
    eps: float,
    act: Activation,
    running: Running | None = None,
    skip_nonfinite: bool = True,
) -> tuple[Tensor, ...]:
    """(y, μ, 1/√(σ² + ε), scale, shift) of y = act(x·scale + shift + r), scale = γ/√(σ² + ε),
    shift = β − μ·scale; weight/bias in the statistics dtype. With ``running`` =
    (running_mean, running_var, α), also the running-statistics update (new mean, new
    var, ok) of :func:`bnorm._math.running_update`."""
    sd = weight.dtype
    count = x3.shape[0] * x3.shape[1] * x3.shape[3]
    xs = x3.to(sd)
    pivot = xs[0, 0, :, 0]
    shifted = xs - _per_channel(pivot)
    s1 = _channel_sum(shifted)
    s2 = _channel_sum(shifted * shifted)
    mean_shift = s1 / count
    var = torch.clamp_min(s2 / count - mean_shift * mean_shift, 0.0)
    mean = (pivot.to(torch.float64) + mean_shift).to(sd)
    invstd = torch.rsqrt(var + eps).to(sd)
    scale = weight * invstd
    shift = bias - mean * scale
    z = xs * _per_channel(scale) + _per_channel(shift)
    if r3 is not None:
        z = z + r3.to(sd)
    update = (
        ()
        if running is None
        else running_update(*running[:2], mean, var, count, running[2], skip_nonfinite)
    )
    return (act.forward(z).to(x3.dtype), mean, invstd, scale, shift, *update)


def _statistics_kernel(
    x3: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    running: Running | None = None,
    skip_nonfinite: bool = True,
) -> tuple[Tensor, ...]:
    """(μ, 1/√(σ² + ε), scale, shift[, running update]) of :func:`_forward_kernel`, without
    y (the statistics pass only): the forward of a :func:`bnorm.memory_saving` scope, whose
    y comes from :func:`_apply_kernel` as its recomputation does."""
    return _forward_kernel(x3, weight, bias, None, eps, IDENTITY, running, skip_nonfinite)[1:]


def _apply_kernel(
    x4: Tensor, scale: Tensor, shift: Tensor, r4: Tensor | None, act: Activation
) -> Tensor:
    """y = act(x·scale + shift + r) in x's dtype, from given per-channel coefficients."""
    sd = scale.dtype
    z = x4.to(sd) * _per_channel(scale) + _per_channel(shift)
    if r4 is not None:
        z = z + r4.to(sd)
    return act.forward(z).to(x4.dtype)


def _backward_kernel(
    dy3: Tensor,
    x3: Tensor,
    r3: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    invstd: Tensor,
    act: Activation,
) -> tuple[Tensor | None, ...]:
    """(dx, dγ, dβ, dr, *coefficients) from the saved input; z is recomputed exactly as in
    the forward. With xc = x − μ: dγ = invstd·Σ dz·xc, dβ = Σ dz and
    dx = dz·scale + xc·k + c, k = −invstd²·scale·mean(dz·xc), c = −scale·mean(dz)."""
    sd = weight.dtype
    count = x3.shape[0] * x3.shape[1] * x3.shape[3]
    xs = x3.to(sd)
    scale = weight * invstd
    shift = bias - mean * scale
    z = xs * _per_channel(scale) + _per_channel(shift)
    if r3 is not None:
        z = z + r3.to(sd)
    dz = act.grad(dy3.to(sd), z)
    centered = xs - _per_channel(mean)
    sum_dz = _channel_sum(dz)
    sum_dz_xc = _channel_sum(dz * centered)
    k = (-(invstd * invstd * scale).to(torch.float64) * sum_dz_xc / count).to(sd)
    c = (-scale.to(torch.float64) * sum_dz / count).to(sd)
    dx = dz * _per_channel(scale) + centered * _per_channel(k) + _per_channel(c)
    dweight = (invstd.to(torch.float64) * sum_dz_xc).to(sd)
    dr = None if r3 is None else dz.to(r3.dtype)
    return dx.to(x3.dtype), dweight, sum_dz.to(sd), dr, scale, shift, k, c


def _backward_from_output_kernel(
    dy3: Tensor,
    y3: Tensor,
    r3: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    invstd: Tensor,
    act: Activation,
) -> tuple[Tensor | None, ...]:
    """(dx, dγ', dβ, dr, *coefficients) from the saved output (memory-efficient mode):
    z = act⁻¹(y), x̂ = (z − β − r)/γ' with γ' the clamped weight; then
    dx = dz·scale + x̂·k + c, k = −scale·mean(dz·x̂), c = −scale·mean(dz)."""
    sd = weight.dtype
    count = y3.shape[0] * y3.shape[1] * y3.shape[3]
    ys = y3.to(sd)
    z = act.inverse(ys)
    if r3 is not None:
        z = z - r3.to(sd)
    inv_weight = 1.0 / weight
    offset = bias * inv_weight
    xhat = z * _per_channel(inv_weight) - _per_channel(offset)
    dz = act.grad_from_output(dy3.to(sd), ys)
    sum_dz = _channel_sum(dz)
    sum_dz_xhat = _channel_sum(dz * xhat)
    scale = weight * invstd
    k = (-scale.to(torch.float64) * sum_dz_xhat / count).to(sd)
    c = (-scale.to(torch.float64) * sum_dz / count).to(sd)
    dx = dz * _per_channel(scale) + xhat * _per_channel(k) + _per_channel(c)
    dr = None if r3 is None else dz.to(r3.dtype)
    return dx.to(y3.dtype), sum_dz_xhat.to(sd), sum_dz.to(sd), dr, inv_weight, offset, scale, k, c


# --- eager ATen versions of the normal mode (the fallback) ----------------------------


def _forward_eager(
    x3: Tensor, weight: Tensor, bias: Tensor, r3: Tensor | None, eps: float, act: Activation
) -> tuple[Tensor, Tensor, Tensor]:
    z, mean, invstd = torch.ops.aten.native_batch_norm(x3, weight, bias, None, None, True, 0.0, eps)
    y = activation_tail(z, r3, act)
    return y, mean, invstd


def _backward_eager(
    dy3: Tensor,
    x3: Tensor,
    r3: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    invstd: Tensor,
    act: Activation,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    if act.name == "identity":
        dz = dy3
    else:
        scale = weight * invstd
        shift = bias - mean * scale
        z = torch.addcmul(_per_channel3(shift), x3, _per_channel3(scale))
        if r3 is not None:
            z.add_(r3)
        dz = act.aten_grad(dy3.to(z.dtype), z).to(x3.dtype)
    dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
        dz, x3, weight, None, None, mean, invstd, True, 0.0, [True, True, True]
    )
    return dx, dweight, dbias, None if r3 is None else dz.to(r3.dtype)


def _clamped_weight(w: Tensor) -> Tensor:
    sign = torch.where(w < 0, -1.0, 1.0).to(w.dtype)
    return sign * torch.clamp_min(w.abs(), MIN_ABS_WEIGHT)


class _BatchNormAct(torch.autograd.Function):
    """act(BN(x) + r) in training: see the module docstring. Returns (y, μ, 1/√(σ²+ε));
    the statistics are not differentiable outputs."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        eps: float,
        act: Activation,
        memory_efficient: bool,
        running: RunningState | None,
        skip_nonfinite: bool,
        scope: memory_saving | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        sd = _stats_dtype(x.dtype)
        channels = x.shape[1]
        w = torch.ones(channels, dtype=sd, device=x.device) if weight is None else weight.to(sd)
        b = torch.zeros(channels, dtype=sd, device=x.device) if bias is None else bias.to(sd)
        if memory_efficient:
            w = _clamped_weight(w)
        layout = _Layout.of(x)
        x3 = layout.to3d(x)
        r3 = None if residual is None else layout.to3d(residual)
        key = (act.name, act.param, r3 is not None, x3.dtype)
        inner = None if running is None else running[:3]
        if scope is not None:
            y, mean, invstd, update = _forward_recomputable(
                scope, layout, x3, w, b, r3, eps, act, key, inner, skip_nonfinite
            )
            y3 = layout.to3d(y)
        elif torch.compiler.is_compiling() or compile_enabled():
            x4, r4 = _split(layout, x3, r3)
            fkey = (*key, inner is not None, skip_nonfinite)
            out = _run("fwd", _forward_kernel, fkey, x4, w, b, r4, eps, act, inner, skip_nonfinite)
            y4, mean, invstd = out[:3]
            update = out[5:]
            y3 = y4.view(x3.shape)
        else:
            y3, mean, invstd = _forward_eager(x3, w, b, r3, eps, act)
            if inner is not None:
                count = x3.shape[0] * x3.shape[2]
                var = invstd.pow(-2) - eps
                update = running_update(*inner[:2], mean, var, count, inner[2], skip_nonfinite)
        if running is not None:
            store_running(running, *update)
        ctx.layout = layout
        ctx.act = act
        ctx.memory_efficient = memory_efficient
        ctx.key = key
        ctx.dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
            None if residual is None else residual.dtype,
        )
        if memory_efficient:
            ctx.save_for_backward(y3, r3, w, b, invstd)
        else:
            ctx.save_for_backward(x3, r3, w, b, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        # In a memory_saving scope the registered output object itself is returned.
        return (y if scope is not None else layout.from3d(y3)), mean, invstd

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dmean: Any, _dinvstd: Any) -> tuple[Any, ...]:  # type: ignore[override]
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Its saved tensors are views made inside the forward, not the inputs: a
            # differentiated backward would drop x's part. (The native kernels' Function
            # and the unfused layers support it.)
            raise ValueError(
                "expected no double backward through bnorm's compiled fused kernels (got "
                "create_graph=True); BatchNormAct with float32/float64 inputs and identity, "
                "relu or leaky_relu on CPU, or BatchNorm2d followed by the activation, support it"
            )
        layout: _Layout = ctx.layout
        act: Activation = ctx.act
        dy3 = layout.to3d(dy)
        if ctx.memory_efficient:
            y3, r3, w, b, invstd = ctx.saved_tensors
            dx3, dw, db, dr3 = _run(
                "bwd_out",
                _backward_from_output_kernel,
                ctx.key,
                *_split(layout, dy3, y3, r3),
                w,
                b,
                invstd,
                act,
            )[:4]
        else:
            x3, r3, w, b, mean, invstd = ctx.saved_tensors
            if torch.compiler.is_compiling() or compile_enabled():
                dx3, dw, db, dr3 = _run(
                    "bwd",
                    _backward_kernel,
                    ctx.key,
                    *_split(layout, dy3, x3, r3),
                    w,
                    b,
                    mean,
                    invstd,
                    act,
                )[:4]
            else:
                dx3, dw, db, dr3 = _backward_eager(dy3, x3, r3, w, b, mean, invstd, act)
        wdt, bdt, rdt = ctx.dtypes
        dx3 = dx3.view(dy3.shape)
        dr3 = None if dr3 is None else dr3.view(dy3.shape)
        return (
            layout.from3d(dx3),
            None if wdt is None else dw.to(wdt),
            None if bdt is None else db.to(bdt),
            None if rdt is None or dr3 is None else layout.from3d(dr3).to(rdt),
            None,
            None,
            None,
            None,
            None,
            None,
        )


class _NativeStep:
    """One call of :class:`_BatchNormActNative`: its constants, and the batch statistics
    the forward computed — μ and 1/√(σ² + ε) — which the caller reads back here: they are
    saved for backward but are not outputs of the Function (no autograd bookkeeping of
    their own)."""

    __slots__ = ("act", "eps", "invstd", "mean", "running", "shape", "skip_nonfinite", "slope")

    def __init__(
        self,
        eps: float,
        act: Activation,
        running: RunningState | None,
        skip_nonfinite: bool,
        shape: native.Shape,
    ) -> None:
        self.eps, self.act, self.running = eps, act, running
        self.skip_nonfinite, self.shape = skip_nonfinite, shape
        self.slope = native.slope_of(act)
        self.mean: Tensor | None = None
        self.invstd: Tensor | None = None


class _BatchNormActNative(torch.autograd.Function):
    """act(BN(x) + r) in training by :mod:`bnorm.kernels.native`: the same outputs as
    :class:`_BatchNormAct` with its own lean Python — one C call each way on x's memory as
    it is (no views, permutes or copies for any dense layout; y, dx and dr are allocated
    with x's strides), the running statistics and counters updated inside the forward's
    call, a missing weight or bias read as 1 or 0 by the kernels, y the only output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        step: _NativeStep,
    ) -> Tensor:
        dtype = x.dtype
        w = weight
        if w is not None and (w.dtype != dtype or not w.is_contiguous()):
            w = w.to(dtype).contiguous()
        b = bias
        if b is not None and (b.dtype != dtype or not b.is_contiguous()):
            b = b.to(dtype).contiguous()
        if residual is not None and residual.stride() != x.stride():
            residual = torch.empty_like(x).copy_(residual)
        running = step.running
        in_kernel = running is not None and _runs_in_kernel(running, dtype)
        # (the batch's variance only where the update is made here)
        var = None if running is None or in_kernel else x.new_empty(step.shape[1])
        y, mean, invstd, _ = native.forward(
            x, residual, w, b, step.shape, step.eps, step.slope,  # type: ignore[arg-type]
            running if in_kernel else None, step.skip_nonfinite, var,  # type: ignore[arg-type]
        )  # fmt: skip
        if running is not None and var is not None:
            count = step.shape[0] * step.shape[2]
            update = running_update(*running[:2], mean, var, count, running[2], step.skip_nonfinite)
            store_running(running, *update)
        step.mean, step.invstd = mean, invstd
        ctx.kernel = (step.shape, step.slope, step.act)
        ctx.dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        # (μ and 1/√(σ² + ε) saved too, though not outputs: saved-tensor hooks see them)
        ctx.save_for_backward(x, residual, w, b, mean, invstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, residual, w, b, mean, invstd = ctx.saved_tensors
        shape, slope, act = ctx.kernel
        if torch.is_grad_enabled():
            # create_graph=True: the backward by ATen's ops, which autograd differentiates.
            dx, dw, db, dr = _differentiable_backward(dy, x, residual, w, b, mean, invstd, act)
        else:
            if dy.stride() != x.stride():
                dy = torch.empty_like(x).copy_(dy)
            dx, dw, db, dr = native.backward(dy, x, residual, w, b, mean, invstd, shape, slope)
        wdt, bdt = ctx.dtypes
        return (
            dx,
            None if wdt is None else dw if wdt == dw.dtype else dw.to(wdt),
            None if bdt is None else db if bdt == db.dtype else db.to(bdt),
            dr,
            None,
        )


def _differentiable_backward(
    dy: Tensor,
    x: Tensor,
    residual: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    act: Activation,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dx, dγ, dβ, dr) of the native kernels' step (γ = 1 without a weight, β = 0 without
    a bias) by the eager fallback's ATen ops, which autograd differentiates again (double
    backward)."""
    if w is None:
        w = torch.ones(x.shape[1], dtype=x.dtype)
    if b is None:
        b = torch.zeros(x.shape[1], dtype=x.dtype)
    layout = _Layout.of(x)
    to3d = layout.to3d
    r3 = None if residual is None else to3d(residual)
    dx3, dw, db, dr3 = _backward_eager(to3d(dy), to3d(x), r3, w, b, mean, invstd, act)
    return layout.from3d(dx3), dw, db, None if dr3 is None else layout.from3d(dr3)


# The native autograd node's double backward (bn_act_node.cpp calls this operator when
# its backward runs with create_graph=True): ATen's differentiable ops, as the Python
# Function's. The node knows the activation by its slope below 0.
_NODE_OPS = torch.library.Library("bnorm_native", "FRAGMENT")
_NODE_OPS.define(
    "differentiable_backward(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, "
    "Tensor? bias, Tensor mean, Tensor invstd, float slope) -> Tensor[]"
)


def _node_differentiable_backward(
    dy: Tensor,
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    slope: float,
) -> list[Tensor]:
    act = IDENTITY if slope == 1 else Activation("leaky_relu", slope)
    dx, dw, db, dr = _differentiable_backward(dy, x, residual, weight, bias, mean, invstd, act)
    return [dx, dw, db, x.new_empty(0) if dr is None else dr]


_NODE_OPS.impl(
    "differentiable_backward", _node_differentiable_backward, "CompositeImplicitAutograd"
)


def _runs_in_kernel(running: RunningState, dtype: torch.dtype) -> bool:
    """Whether the native forward can update these buffers itself: contiguous statistics
    of the input's dtype, a float weight α (the cumulative average's 1/t is a tensor),
    int64 counters."""
    mean, var, alpha, tracked, skipped = running
    return (
        not isinstance(alpha, Tensor)
        and mean.dtype == dtype
        and var.dtype == dtype
        and mean.is_cpu
        and var.is_cpu
        and mean.is_contiguous()
        and var.is_contiguous()
        and (tracked is None or _is_counter(tracked))
        and (skipped is None or _is_counter(skipped))
    )


def _is_counter(t: Tensor) -> bool:
    return t.dtype == torch.long and t.numel() == 1 and t.is_cpu


def _forward_recomputable(
    scope: memory_saving,
    layout: _Layout,
    x3: Tensor,
    w: Tensor,
    b: Tensor,
    r3: Tensor | None,
    eps: float,
    act: Activation,
    key: tuple[Any, ...],
    inner: Running | None,
    skip_nonfinite: bool,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """The forward inside a :func:`bnorm.memory_saving` scope: the statistics (compiled
    kernel, or ATen's), then y from :func:`_apply_kernel` — the function that recomputes
    it in backward, in the same mode, on the same x, r, scale and shift. Returns (y3, μ,
    1/√(σ² + ε), running update) with y in x's shape and layout, registered with the
    scope (the layer must return this very tensor object)."""
    compiled = compile_enabled()
    update: tuple[Tensor, ...] = ()
    if compiled:
        x4 = layout.split(x3)
        skey = (x3.dtype, inner is not None, skip_nonfinite)
        out = _run(
            "stats",
            _statistics_kernel,
            skey,
            x4,
            w,
            b,
            eps,
            inner,
            skip_nonfinite,
            use_compiled=True,
        )
        mean, invstd, scale, shift = out[:4]
        update = tuple(out[4:])
    else:
        aten_bn = torch.ops.aten.native_batch_norm
        _, mean, invstd = aten_bn(x3, w, b, None, None, True, 0.0, eps)  # (w: stats dtype)
        scale = w * invstd
        shift = b - mean * scale
        if inner is not None:
            count = x3.shape[0] * x3.shape[2]
            var = invstd.pow(-2) - eps
            update = running_update(*inner[:2], mean, var, count, inner[2], skip_nonfinite)
    recompute = functools.partial(_recompute_output, layout, scale, shift, act, key, compiled)
    y = recompute(x3, r3)
    scope.register(y, (x3, r3), recompute, captured=(scale, shift))
    return y, mean, invstd, update


def _recompute_output(
    layout: _Layout,
    scale: Tensor,
    shift: Tensor,
    act: Activation,
    key: tuple[Any, ...],
    compiled: bool,
    x3: Tensor,
    r3: Tensor | None,
) -> Tensor:
    """y = act(x·scale + shift + r) in x's logical shape and memory layout (the forward's
    output and, in backward, its bit-identical recomputation)."""
    x4, r4 = _split(layout, x3, r3)
    y4 = _run("apply", _apply_kernel, key, x4, scale, shift, r4, act, use_compiled=compiled)
    return layout.from3d(y4.view(x3.shape))


def batch_norm_act_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    activation: Activation | None,
    memory_efficient: bool = False,
    *,
    running: RunningState | None = None,
    skip_nonfinite: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode ``y = act(γ (x − μ_B)/√(σ²_B + ε) + β + residual)`` with the batch's
    statistics over every dim but 1, fused forward and backward. ``running`` (see
    :data:`RunningState`) is updated in place from the batch, inside the forward kernel —
    native or compiled — (:func:`bnorm.functional.update_running_stats` states the rule;
    ``skip_nonfinite`` likewise). On CPU, for float32/float64 and identity/relu/leaky_relu,
    the native kernels run in their C++ autograd node (:func:`bnorm.kernels.native.node`),
    or in a Python Function where that node is not available.

    Returns ``(y, μ_B, 1/√(σ²_B + ε))`` — the statistics in float32 (float64 for float64
    input), not differentiable — like ``aten::native_batch_norm``. ``memory_efficient``
    saves only y (and the residual) for backward; it needs an invertible activation and
    clamps |γ| to at least :data:`MIN_ABS_WEIGHT` (see the module docstring).

    The arguments are trusted: the plan (:class:`bnorm.plan.Plan`) has checked the
    options (an invertible activation for ``memory_efficient``) and
    :func:`bnorm.functional.run_plan` the call (a residual of x's shape).

    Shape:
        x: (N, C, *) in any memory layout; residual: like x; weight, bias: (C,);
        y: like x, in x's memory layout.
    """
    act = activation if activation is not None else IDENTITY
    scope = None
    if not memory_efficient and not torch.compiler.is_compiling():
        if torch.is_grad_enabled():
            scope = current_scope()
        if (
            scope is None
            and not torch._C._are_functorch_transforms_active()
            and _native_takes(x, weight, bias, residual, act)
        ):
            out = _native_node_step(x, weight, bias, residual, eps, act, running, skip_nonfinite)
            if out is not None:
                return out
            layout = _Layout.of(x)
            if layout.dense:
                shape = (layout.a, x.shape[1], layout.b)
                step = _NativeStep(eps, act, running, skip_nonfinite, shape)
                y = _BatchNormActNative.apply(x, weight, bias, residual, step)
                return y, step.mean, step.invstd  # type: ignore[return-value]
    out = _BatchNormAct.apply(
        x, weight, bias, residual, eps, act, memory_efficient, running, skip_nonfinite, scope
    )
    return out[0], out[1], out[2]


def native_try(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    *,
    eps: float,
    activation: Activation | None,
    momentum: float,
    skip_nonfinite: bool,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`fused_step` where it runs the native node with these tensors as they are
    (channels at dim 1, running statistics updated with weight ``momentum``), else None:
    the plain layers' per-call route (``bnorm.functional.run_plan``), ahead of their
    general path, which decides every call this takes the same way. Here the checks that
    are not about the tensors (torch.compile, torch.func, a memory_saving scope, the size
    from which the kernels pay, the kernels and node switched on and built); those about
    the tensors — dtypes, shapes, devices, x's memory as (R, C, B), contiguous statistics,
    int64 counters — in the node's C++ (``bn_act_try``), where they cost nanoseconds."""
    if (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or (torch.is_grad_enabled() and current_scope() is not None)
        or not _size_pays(x.numel(), _yes)
    ):
        return None
    act = activation if activation is not None else IDENTITY
    if native.slope_of(act) is None or not native.available():
        return None
    running = (running_mean, running_var, momentum, num_batches_tracked, num_batches_skipped)
    return _native_node_step(x, weight, bias, residual, eps, act, running, skip_nonfinite)


def _yes() -> bool:
    return True


def _native_takes(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, act: Activation
) -> bool:
    """Whether the native kernels run this step (outside memory-efficient mode, torch.func
    transforms, a memory_saving scope and torch.compile's tracing): :func:`native.supports`
    and CPU parameters."""
    return (
        native.supports(x, residual, act)
        and (weight is None or weight.is_cpu)
        and (bias is None or bias.is_cpu)
    )


def _native_node_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    act: Activation,
    running: RunningState | None,
    skip_nonfinite: bool,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The step by the native kernels' C++ node for a call :func:`_native_takes` took,
    through its operator ``bn_act_try``, which checks the tensors (x's memory one (R, C, B)
    block as it is, the running buffers ones the kernel updates itself, …); None where it
    declines or the node is not available (the caller then runs a Function). Outside
    torch.compile's tracing (the callers check)."""
    op = native.node_try()
    rm, rv, alpha, tracked, skipped = running or (None, None, 0.0, None, None)
    if op is None or isinstance(alpha, Tensor):  # (the cumulative average's 1/t: a tensor)
        return None
    out = op(
        x, weight, bias, residual, rm, rv, tracked, skipped, eps, native.slope_of(act),
        float(alpha), skip_nonfinite,
    )  # fmt: skip
    return (out[0], out[1], out[2]) if out else None
