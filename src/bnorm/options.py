"""The option types of the layers, each validated once when it is built.

* :class:`Renorm` — Batch Renormalization and its clipping schedule;
* :class:`MovingAverage` — moving-average batch normalization (MABN) and its window;
* :class:`Activation` — the activation of a fused tail, one table per activation
  (``_MATH``): its forward and derivative as torch functions, torch's and ATen's ops for
  them, and (where it exists) its inverse. Every path — the compiled kernels, their eager
  fallback, the unfused tail — computes an activation from its table.

And :func:`env_switch`: how an environment switch (``BNORM_NO_COMPILE``, ...) is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "IDENTITY",
    "INVERTIBLE_ACTIVATIONS",
    "Activation",
    "MovingAverage",
    "Renorm",
    "env_switch",
]

_OFF = ("", "0", b"", b"0")


def env_switch(name: str) -> bool:
    """Whether the environment switch ``name`` is on: set, to anything but ``""`` or
    ``"0"``. Read at every call, so that setting or clearing it in ``os.environ`` takes
    effect at the next one; read from the dict behind CPython's ``os.environ`` where there
    is one (the layers read two or three switches per training forward:
    ``os.environ.get``'s Python-level mapping calls cost 3-4 µs each there, this ~0.2)."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    key = _ENV_KEYS.get(name)
    if key is None and type(data) is dict and hasattr(environ, "encodekey"):
        key = _ENV_KEYS[name] = environ.encodekey(name)
    if type(data) is dict and key is not None:
        value = data.get(key)
    else:  # (another Python, or os.environ replaced by a plain mapping)
        value = environ.get(name)
    return value is not None and value not in _OFF


# env_switch's names as keys of the dict behind CPython's os.environ (bytes on POSIX).
_ENV_KEYS: dict[str, object] = {}


# Tensor functions of one activation with parameter p (leaky_relu's slope, elu's α).
_Unary = Callable[[Tensor, float], Tensor]
_Binary = Callable[[Tensor, Tensor, float], Tensor]


@dataclass(frozen=True)
class _ActivationMath:
    """Everything bnorm computes with one activation: ``forward`` act(z), ``grad``
    g·act'(z), as torch functions (run eagerly and traced by torch.compile); ``eager``
    torch.nn.functional's op, in place when asked where it has an in-place form
    (``f(z, p, inplace)``), and ``aten_grad`` ATen's backward op (g·act'(z)), for the
    unfused paths and the eager fallback; for an invertible activation ``inverse``
    z = act⁻¹(y), ``grad_from_output`` g·act'(z) written with y, and ``invertible``,
    whether a parameter value keeps it invertible."""

    forward: _Unary
    grad: _Binary
    eager: Callable[[Tensor, float, bool], Tensor]
    aten_grad: _Binary
    inverse: _Unary | None = None
    grad_from_output: _Binary | None = None
    invertible: Callable[[float], bool] = lambda p: False


def _elu_inverse(y: Tensor, p: float) -> Tensor:
    # Clamped where the output has saturated at −α (log1p(−1) = −inf).
    tiny = torch.finfo(y.dtype).eps
    return torch.where(y > 0, y, torch.log1p(torch.clamp_min(y * (1.0 / p), tiny - 1.0)))


def _silu_grad(g: Tensor, z: Tensor, p: float) -> Tensor:
    s = torch.sigmoid(z)
    return g * (s * (1.0 + z * (1.0 - s)))


def _gelu_grad(g: Tensor, z: Tensor, p: float) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * _SQRT1_2))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return g * (cdf + z * pdf)


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_F = torch.nn.functional
_ATEN = torch.ops.aten

_MATH: dict[str, _ActivationMath] = {
    "identity": _ActivationMath(
        forward=lambda z, p: z,
        grad=lambda g, z, p: g,
        eager=lambda z, p, inplace: z,
        aten_grad=lambda g, z, p: g,
        inverse=lambda y, p: y,
        grad_from_output=lambda g, y, p: g,
        invertible=lambda p: True,
    ),
    "relu": _ActivationMath(
        forward=lambda z, p: torch.relu(z),
        grad=lambda g, z, p: torch.where(z > 0, g, 0.0),
        eager=lambda z, p, inplace: _F.relu(z, inplace=inplace),
        aten_grad=lambda g, z, p: _ATEN.threshold_backward(g, z, 0.0),
    ),
    "leaky_relu": _ActivationMath(
        forward=lambda z, p: torch.where(z > 0, z, z * p),
        grad=lambda g, z, p: torch.where(z > 0, g, g * p),
        eager=lambda z, p, inplace: _F.leaky_relu(z, p, inplace=inplace),
        aten_grad=lambda g, z, p: _ATEN.leaky_relu_backward(g, z, p, False),
        inverse=lambda y, p: torch.where(y > 0, y, y * (1.0 / p)),
        grad_from_output=lambda g, y, p: torch.where(y > 0, g, g * p),
        invertible=lambda p: p > 0,
    ),
    "elu": _ActivationMath(
        forward=lambda z, p: torch.where(z > 0, z, torch.expm1(z) * p),
        grad=lambda g, z, p: torch.where(z > 0, g, g * (torch.exp(z) * p)),
        eager=lambda z, p, inplace: _F.elu(z, p, inplace=inplace),
        aten_grad=lambda g, z, p: _ATEN.elu_backward(g, p, 1.0, 1.0, False, z),
        inverse=_elu_inverse,
        grad_from_output=lambda g, y, p: torch.where(y > 0, g, g * (y + p)),
        invertible=lambda p: True,  # α > 0 is checked for every elu
    ),
    "silu": _ActivationMath(
        forward=lambda z, p: z * torch.sigmoid(z),
        grad=_silu_grad,
        eager=lambda z, p, inplace: _F.silu(z, inplace=inplace),
        aten_grad=lambda g, z, p: _ATEN.silu_backward(g, z),
    ),
    "gelu": _ActivationMath(
        forward=lambda z, p: 0.5 * z * (1.0 + torch.erf(z * _SQRT1_2)),
        grad=_gelu_grad,
        eager=lambda z, p, inplace: _F.gelu(z),  # (no in-place form)
        aten_grad=lambda g, z, p: _ATEN.gelu_backward(g, z),
    ),
}

ACTIVATIONS = tuple(_MATH)
"""Activations of the fused kernels (gelu is the exact, erf-based one)."""


INVERTIBLE_ACTIVATIONS = tuple(name for name, m in _MATH.items() if m.inverse is not None)
"""Activations usable with ``memory_efficient=True`` (leaky_relu needs slope > 0, elu α > 0)."""


@dataclass(frozen=True)
class Renorm:
    """Batch Renormalization (Ioffe 2017, arXiv:1702.03275) and its clipping schedule.

    With μ, σ = √(running_var + ε) the running statistics *before* this step's update
    and σ_B = √(σ²_B + ε)::

        r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)
        x̂ = (x − μ_B) / σ_B · r + d

    r and d are constants for backpropagation. The limits follow the paper's schedule in
    the step t (the layer's ``num_batches_tracked``): r_max = 1 and d_max = 0 for
    t < ``warmup_steps``, then rising linearly to ``r_max`` over ``r_ramp_steps`` steps
    and to ``d_max`` over ``d_ramp_steps`` steps (with the defaults: r_max = 3 at 40k
    steps, d_max = 5 at 25k). With every step count 0 the limits are constant; with
    r_max = 1, d_max = 0 the layer is plain batch normalization.

    The paper keeps a moving average of σ; bnorm keeps torch's running variance (the
    unbiased m/(m−1)·σ²_B), so σ = √(running_var + ε) here.
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 5000
    r_ramp_steps: int = 35000
    d_ramp_steps: int = 20000

    def __post_init__(self) -> None:
        if not (isinstance(self.r_max, (int, float)) and self.r_max >= 1.0):
            raise ValueError(f"expected r_max >= 1 (got {self.r_max!r})")
        if not (isinstance(self.d_max, (int, float)) and self.d_max >= 0.0):
            raise ValueError(f"expected d_max >= 0 (got {self.d_max!r})")
        for name in ("warmup_steps", "r_ramp_steps", "d_ramp_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"expected {name} to be an int >= 0 (got {v!r})")

    def limits(self, step: Tensor) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) at step ``step`` (a tensor, so no host synchronization)."""
        t = step.to(torch.float64) - self.warmup_steps

        def ramp(steps: int) -> Tensor:
            if steps == 0:
                return (t >= 0).to(torch.float64)
            return (t / steps).clamp(0.0, 1.0)

        r = 1.0 + (self.r_max - 1.0) * ramp(self.r_ramp_steps)
        d = self.d_max * ramp(self.d_ramp_steps)
        return r, d


@dataclass(frozen=True)
class MovingAverage:
    """Moving-average batch normalization (MABN; Yan et al., ICLR 2020, "Towards
    Stabilizing Batch Statistics in Backward Propagation of Batch Normalization").

    Per channel, with χ_B = mean of x² over the batch ("reduced" normalization: a second
    moment about 0, no centering) and g = γ·∂L/∂y the gradient with respect to x̂::

        forward   χ̄_t = (1/k) Σ_{s<k} χ_B(t−s),   k = min(t, window)
                  x̂ = x / √(χ̄_t + ε),   y = γ·x̂ + β
        backward  ψ_B = (1/n) Σ g·x̂,   ψ̄_t = (1/k) Σ_{s<k} ψ_B(t−s)
                  ∂L/∂x = (g − x̂·ψ̄_t) / √(χ̄_t + ε)

    t counts this layer's recorded training steps (1 for the first); for
    t ≤ ``warmup_steps`` both averages are this batch's own statistics (k = 1). The
    backward is deliberately not the gradient of the forward: the batch's gradient
    statistic ψ_B is replaced by its moving average, as the batch's χ_B is in forward.
    With ``window=1`` (or during warm-up) it is exactly the gradient of reduced batch
    normalization y = γ·x/√(χ_B + ε) + β.

    Defaults are the reference implementation's (megvii-model/MABN): ``window=16`` (its
    ImageNet ``buffer_size``: normalization batch 2 averaged to 32 samples) and
    ``warmup_steps=100`` (its ``warmup_iters``). Put the moving average of the last
    ``window`` batches' statistics at roughly the batch size plain batch norm needs
    (window × batch ≈ 32).
    """

    window: int = 16
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"expected window to be an int >= 1 (got {self.window!r})")
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"expected warmup_steps to be an int >= 0 (got {w!r})")


@dataclass(frozen=True)
class Activation:
    """An activation of the fused kernels: ``name`` in :data:`ACTIVATIONS` and its
    parameter ``param`` (the negative slope of leaky_relu, α of elu; 0 otherwise).

    identity: z;  relu: max(z, 0);  leaky_relu: z if z > 0 else param·z;
    elu: z if z > 0 else param·(eᶻ − 1);  silu: z·sigmoid(z);  gelu: z·Φ(z) (exact).
    Derivatives at z = 0 are those of PyTorch (relu, leaky_relu, elu use the z ≤ 0 side).
    """

    name: str
    param: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ACTIVATIONS:
            raise ValueError(f"expected an activation in {ACTIVATIONS} (got {self.name!r})")
        # (A comparison, not math.isfinite: Dynamo traces it for a symbolic float too.)
        if not isinstance(self.param, (int, float)) or not -math.inf < self.param < math.inf:
            raise ValueError(f"expected a finite activation parameter (got {self.param!r})")
        if self.name == "elu" and self.param <= 0:
            raise ValueError(f"expected elu alpha > 0 (got {self.param!r})")

    @classmethod
    def parse(
        cls, activation: str | Activation | None, negative_slope: float = 0.01, alpha: float = 1.0
    ) -> Activation | None:
        """An :class:`Activation` from a name (with leaky_relu's ``negative_slope`` and elu's
        ``alpha``), an :class:`Activation`, or None."""
        if activation is None or isinstance(activation, Activation):
            return activation
        if not isinstance(activation, str):
            raise TypeError(
                f"expected activation to be a str, bnorm.kernels.Activation or None "
                f"(got {type(activation).__name__})"
            )
        if activation == "leaky_relu":
            return cls(activation, float(negative_slope))
        if activation == "elu":
            return cls(activation, float(alpha))
        return cls(activation)

    @property
    def invertible(self) -> bool:
        """Whether z can be recovered from act(z) (memory-efficient mode)."""
        return _MATH[self.name].invertible(self.param)

    # --- the math, from the activation's table (used eagerly and traced by torch.compile)

    def forward(self, z: Tensor) -> Tensor:
        """act(z)."""
        return _MATH[self.name].forward(z, self.param)

    def grad(self, g: Tensor, z: Tensor) -> Tensor:
        """g · act'(z)."""
        return _MATH[self.name].grad(g, z, self.param)

    def eager(self, z: Tensor, inplace: bool = False) -> Tensor:
        """act(z) with torch.nn.functional's op (differentiable; in place when ``inplace``
        and the op has an in-place form)."""
        return _MATH[self.name].eager(z, self.param, inplace)

    def aten_grad(self, g: Tensor, z: Tensor) -> Tensor:
        """g · act'(z) with ATen's backward op."""
        return _MATH[self.name].aten_grad(g, z, self.param)

    def inverse(self, y: Tensor) -> Tensor:
        """z = act⁻¹(y) for an invertible activation (elu: clamped where y saturates)."""
        inverse = _MATH[self.name].inverse
        if inverse is None:
            raise ValueError(f"expected an invertible activation (got {self})")
        return inverse(y, self.param)

    def grad_from_output(self, g: Tensor, y: Tensor) -> Tensor:
        """g · act'(z) written with y = act(z) (invertible activations)."""
        grad = _MATH[self.name].grad_from_output
        if grad is None:
            raise ValueError(f"expected an invertible activation (got {self})")
        return grad(g, y, self.param)


IDENTITY = Activation("identity")
"""No activation: the tail of plain batch norm (one object, not one per call)."""
