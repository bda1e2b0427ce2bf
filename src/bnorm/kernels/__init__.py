"""bnorm's training kernels: fused ``torch.autograd.Function``\\ s with analytic backward
passes, compiled with ``torch.compile`` (Inductor: C++/OpenMP on CPU, Triton on GPU).

* :mod:`~bnorm.kernels.bn_act` — ``act(BN(x) + residual)`` over the statistics of the whole
  input, and its memory-efficient mode;
* :mod:`~bnorm.kernels.native` — the same in hand-written C/OpenMP on CPU (float32/float64,
  identity/relu/leaky_relu), built once per machine and called through ctypes;
* :mod:`~bnorm.kernels.moments` — the moments path: masks, ghost batches, statistics across
  processes, Batch Renormalization;
* :mod:`~bnorm.kernels.moving_average` — moving-average batch norm (MABN), with its own
  backward;
* :mod:`~bnorm.kernels.memory` — the ``memory_saving`` scope (outputs recomputed in
  backward instead of saved);
* :mod:`~bnorm.kernels.compile` (compile policy, ``BNORM_NO_COMPILE``),
  :mod:`~bnorm.kernels.layout` (memory-order views), :mod:`~bnorm.kernels.running` (the
  running-statistics store).
"""

from __future__ import annotations

from ..options import ACTIVATIONS, INVERTIBLE_ACTIVATIONS, Activation
from .bn_act import (
    FUSED_MIN_NUMEL,
    MIN_ABS_WEIGHT,
    NATIVE_MIN_NUMEL,
    batch_norm_act_train,
    fused_pays,
    fused_step,
    native_try,
)
from .compile import compile_enabled
from .memory import memory_saving
from .moments import batch_norm_moments_train
from .moving_average import MovingState, batch_norm_moving_average_train
from .running import RunningState, store_running

__all__ = [
    "ACTIVATIONS",
    "FUSED_MIN_NUMEL",
    "INVERTIBLE_ACTIVATIONS",
    "MIN_ABS_WEIGHT",
    "NATIVE_MIN_NUMEL",
    "Activation",
    "MovingState",
    "RunningState",
    "batch_norm_act_train",
    "batch_norm_moments_train",
    "batch_norm_moving_average_train",
    "compile_enabled",
    "fused_pays",
    "fused_step",
    "memory_saving",
    "native_try",
    "store_running",
]
