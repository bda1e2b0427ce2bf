"""Batch-normalization layers: subclasses of torch's batch-norm classes that hold state and
options. One base class; the rank-specific classes only state which input ranks they
accept. Every forward is one call of :func:`bnorm.functional.run_plan` with the layer's
plan. Converting a model's layers between families (:func:`bnorm.convert`, torch's
``SyncBatchNorm.convert_sync_batchnorm``) is here too: it builds these classes."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as F
from .options import MovingAverage, Renorm
from .plan import (
    Plan,
    check_eps,
    check_moving_average_has_running_stats,
    check_renorm_has_running_stats,
)

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "SyncBatchNorm",
]


# The input ranks of the layers of each family rank (the key of ``_RANK_OF``; None: any
# rank from 2), as torch's BatchNorm1d/2d/3d accept them.
_INPUT_RANKS: dict[int | None, tuple[int, ...] | None] = {1: (2, 3), 2: (4,), 3: (5,), None: None}


def _batch_norm_layer(
    layer: _BatchNormBase | FrozenBatchNorm,
    input: Tensor,
    mask: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """A layer's forward: check the input against the layer, then run the layer's plan
    (:func:`bnorm.functional.run_plan`) on its state."""
    if isinstance(input, torch.fx.Proxy):
        return _record_in_fx_graph(layer, input, mask, residual)
    name = type(layer).__name__
    plan = layer._plan
    _check_layer_input(input, name, layer._ranks, layer.num_features, plan.axis)
    try:
        return F.run_plan(
            plan, input, *layer._state(), mask=mask, residual=residual,
            moving=layer._moving_state(),
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


def _check_layer_input(
    input: Tensor, name: str, ranks: tuple[int, ...] | None, num_features: int, axis: int
) -> None:
    """The layer's own checks: the input's rank and channel count. The rest (a tensor, of
    a floating dtype, matching the state) is :func:`bnorm.functional.run_plan`'s, whose
    errors the layer prefixes with its name."""
    if not isinstance(input, Tensor):
        return  # (run_plan raises)
    if ranks is not None and input.dim() not in ranks:
        want = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(f"{name}: expected {want} input (got {input.dim()}D input)")
    if input.dim() >= 2 and -input.dim() <= axis < input.dim():
        # Checked here, not only against the parameters: a layer without any still knows C.
        if input.shape[axis] != num_features:
            raise ValueError(
                f"{name}: expected {num_features} channels at axis {axis} "
                f"(got {input.shape[axis]} in an input of shape {tuple(input.shape)})"
            )


def _checked_batch_norm(
    input: Tensor,
    mask: Tensor | None,
    residual: Tensor | None,
    name: str,
    ranks: tuple[int, ...] | None,
    num_features: int,
    options: dict[str, Any],
) -> Tensor:
    """A layer's forward as one function of tensors and constants, for a graph that
    ``torch.fx.symbolic_trace`` made of the layer itself (see ``_record_in_fx_graph``)."""
    _check_layer_input(input, name, ranks, num_features, options["axis"])
    if isinstance(options.get("renorm"), tuple):
        options = {**options, "renorm": Renorm(*options["renorm"])}
    if isinstance(options.get("moving_average"), tuple):
        options = {**options, "moving_average": MovingAverage(*options["moving_average"])}
    try:
        return F.batch_norm(input, mask=mask, residual=residual, **options)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


def _record_in_fx_graph(
    layer: _BatchNormBase | FrozenBatchNorm,
    input: torch.fx.Proxy,
    mask: Any,
    residual: Any,
) -> Any:
    """Under ``torch.fx.symbolic_trace``: record the layer as one ``call_module`` node — a
    leaf, as torch's batch norm is — so the traced graph runs the layer itself and
    ``.train()``/``.eval()`` on the traced module switch it. The root of a trace has no
    path to call (it is the traced module): its forward is recorded as one call of
    ``_checked_batch_norm`` with the mode fixed at trace time, as tracing torch's layer on
    its own fixes it."""
    tracer = input.tracer
    path = tracer.path_of_module(layer)  # type: ignore[attr-defined]
    kwargs = {k: v for k, v in (("residual", residual), ("mask", mask)) if v is not None}
    if path:
        return tracer.create_proxy("call_module", path, (input,), kwargs)
    plan = layer._plan
    running_mean, running_var, weight, bias, training, tracked, skipped = layer._state()
    options = {
        "running_mean": running_mean, "running_var": running_var, "weight": weight,
        "bias": bias, "training": training, "num_batches_tracked": tracked,
        "num_batches_skipped": skipped, "momentum": plan.momentum, "eps": plan.eps,
        "axis": plan.axis, "skip_nonfinite": plan.skip_nonfinite,
        "virtual_batch_size": plan.virtual_batch_size,
        "renorm": None if plan.renorm is None else astuple(plan.renorm), "sync": plan.sync,
        "process_group": plan.process_group, "activation": plan.activation,
        "memory_efficient": plan.memory_efficient,
        "moving_average": None if plan.moving_average is None else astuple(plan.moving_average),
        "moving_state": layer._moving_state(),
    }  # fmt: skip
    return _checked_batch_norm(
        input,  # type: ignore[arg-type]  # a Proxy: fx records the call (torch.fx.wrap)
        mask, residual, type(layer).__name__, layer._ranks, layer.num_features, options,
    )  # fmt: skip


torch.fx.wrap("_checked_batch_norm")


def _check_num_features(num_features: Any) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(f"expected num_features to be an int (got {type(num_features).__name__})")
    if num_features < 1:
        raise ValueError(f"expected num_features >= 1 (got {num_features})")


class _Planned(nn.Module):
    """A layer that keeps its options resolved in a :class:`~bnorm.plan.Plan`, rebuilt —
    and so checked, before anything changes — whenever one of them is set."""

    _ranks: ClassVar[tuple[int, ...] | None] = None
    _plan: Plan

    def _plan_options(self) -> dict[str, Any]:
        """The layer's current options, as :meth:`Plan.build` takes them."""
        raise NotImplementedError

    def _moving_state(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The moving-average state a training call updates (None: the layer has none)."""
        return None

    def _make_plan(self, **options: Any) -> Plan:
        plan = Plan.build(**options)
        if self._ranks is not None and not -min(self._ranks) <= plan.axis < min(self._ranks):
            raise ValueError(
                f"expected axis in [{-min(self._ranks)}, {min(self._ranks) - 1}] for "
                f"{type(self).__name__} (got {plan.axis})"
            )
        return plan

    def __setattr__(self, name: str, value: Any) -> None:
        plan = self.__dict__.get("_plan")
        if plan is None or name not in self._plan_options():
            super().__setattr__(name, value)
            return
        new = self._make_plan(**{**self._plan_options(), name: value})
        if name in ("renorm", "moving_average"):
            value = getattr(new, name)  # True → the paper's schedule / defaults
            if name == "moving_average":
                self._check_moving_average(value)
        super().__setattr__(name, value)
        self.__dict__["_plan"] = new
        if name == "moving_average":
            self._reset_moving_buffers()

    def _check_moving_average(self, moving_average: MovingAverage | None) -> None:
        """Raise if this layer cannot take ``moving_average`` (before anything changes)."""

    def _reset_moving_buffers(self) -> None:
        """(Re)make the moving-average state for the current option: empty windows."""


class _BatchNormBase(_Planned, _BatchNorm):
    """Shared base of the bnorm batch-norm layers: a subclass of torch's
    ``torch.nn.modules.batchnorm._BatchNorm``, so every tool that looks for batch norm
    with ``isinstance`` finds it (``BatchNorm1d/2d/3d`` and ``BatchNormAct1d/2d/3d``
    subclass ``torch.nn.BatchNorm1d/2d/3d`` too).

    torch's base owns the parameters γ (``weight``) and β (``bias``), the buffers
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (torch's state_dict, so
    checkpoints load both ways), ``reset_parameters`` and the state-dict versioning; this
    class adds the non-persistent buffer ``num_batches_skipped`` and bnorm's options.

    In training, each channel is normalized with the batch's mean μ_B and biased variance
    σ²_B over every axis but ``axis``, ``y = γ (x − μ_B)/√(σ²_B + ε) + β``, and the running
    statistics move towards the batch's::

        running_mean ← (1 − momentum) · running_mean + momentum · μ_B
        running_var  ← (1 − momentum) · running_var  + momentum · m/(m − 1) · σ²_B

    (``momentum=None``: cumulative average, weight 1/num_batches_tracked.) In evaluation
    the running statistics normalize, through torch's batch-norm op
    (``torch.nn.functional.batch_norm``), so export, ONNX, ``jit.freeze``, quantization
    and FLOP counters see the standard op. With ``track_running_stats=False`` batch
    statistics are used in both modes.

    bnorm-only keyword options: ``axis`` (the channel axis, e.g. -1 for NHWC) and
    ``skip_nonfinite`` (default True): a training batch whose statistics contain NaN/inf
    leaves the running statistics and ``num_batches_tracked`` unchanged and increments the
    ``num_batches_skipped`` buffer instead (read it to see how many were skipped). The
    output of such a batch is still what the math gives. ``virtual_batch_size=k``: ghost
    batch norm — in training each group of k consecutive samples is normalized with its
    own statistics, while γ, β and the running statistics are shared (updated from all
    groups' moments merged, i.e. as if from the whole batch); k must divide a batch larger
    than k, and a batch of at most k samples is one group.
    ``renorm``: Batch Renormalization (a :class:`bnorm.Renorm`, or True for the paper's
    schedule), driven by ``num_batches_tracked``. ``moving_average``: moving-average
    batch norm (MABN; a :class:`bnorm.MovingAverage`, or True for the paper's defaults):
    reduced normalization by the moving average of the last batches' mean of x², and a
    backward with the moving average of the gradient statistic; its windows are the
    persistent buffers ``moving_chi``, ``moving_psi`` (window × C) and ``moving_steps``,
    and its running statistics are EMAs of the normalizer (``running_var``) and of 0
    (``running_mean``), so evaluation stays torch's batch-norm op. Loading a checkpoint
    without those buffers (plain batch norm) keeps its running statistics and restarts
    the windows empty (warm-up again); one whose windows have another shape is refused.
    ``forward(input, mask)``: a boolean
    ``mask`` of the input's shape without the channel axis (True = valid) restricts the
    batch statistics to the valid positions; every position, padded ones included, is
    normalized with them.
    """

    _ranks: ClassVar[tuple[int, ...] | None] = None

    axis: int
    skip_nonfinite: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        axis: int = 1,
        skip_nonfinite: bool = True,
        virtual_batch_size: int | None = None,
        renorm: Renorm | bool | None = None,
        moving_average: MovingAverage | bool | None = None,
        _options: dict[str, Any] | None = None,
    ) -> None:
        _options = _options or {}
        _check_num_features(num_features)
        plan = self._make_plan(
            momentum=momentum, eps=eps, axis=axis, skip_nonfinite=skip_nonfinite,
            virtual_batch_size=virtual_batch_size, renorm=renorm,
            moving_average=moving_average, **_options,
        )  # fmt: skip
        check_renorm_has_running_stats(plan.renorm, bool(track_running_stats))
        check_moving_average_has_running_stats(plan.moving_average, bool(track_running_stats))
        super().__init__(
            num_features,
            plan.eps,
            plan.momentum,
            bool(affine),
            bool(track_running_stats),
            device,
            dtype,
            bias=bias,
        )
        self.num_batches_skipped: Tensor | None
        self.register_buffer(
            "num_batches_skipped",
            torch.tensor(0, dtype=torch.long, device=device) if self.track_running_stats else None,
            persistent=False,
        )
        self.axis = plan.axis
        self.skip_nonfinite = plan.skip_nonfinite
        self.virtual_batch_size = plan.virtual_batch_size
        self.renorm: Renorm | None = plan.renorm
        self.moving_average: MovingAverage | None = plan.moving_average
        self.__dict__.update(_options)  # the subclass's own options (already in the plan)
        self.__dict__["_plan"] = plan
        self._reset_moving_buffers()

    _MOVING_BUFFERS = ("moving_chi", "moving_psi", "moving_steps")

    def _check_moving_average(self, moving_average: MovingAverage | None) -> None:
        check_moving_average_has_running_stats(moving_average, self.track_running_stats)

    def _reset_moving_buffers(self) -> None:
        """Empty windows for the current ``moving_average`` (or none without one): the
        rings of the last ``window`` batches' χ_B and ψ_B, (window, C) in the running
        statistics' floating dtype (float32 at least), and the count of recorded steps."""
        for name in self._MOVING_BUFFERS:
            self._buffers.pop(name, None)
        moving = self.moving_average
        if moving is None:
            return
        ref = self._buffers.get("running_var")
        device = None if ref is None else ref.device
        dtype = torch.float32 if ref is None else torch.promote_types(ref.dtype, torch.float32)
        shape = (moving.window, self.num_features)
        self.register_buffer("moving_chi", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("moving_psi", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("moving_steps", torch.zeros((), dtype=torch.long, device=device))

    def _moving_state(self) -> tuple[Tensor, Tensor, Tensor] | None:
        buffers = self._buffers
        if self.__dict__["_plan"].moving_average is None or "moving_chi" not in buffers:
            return None
        return (buffers["moving_chi"], buffers["moving_psi"], buffers["moving_steps"])  # type: ignore[return-value]

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counters 0 (and the moving-average windows
        empty)."""
        super().reset_running_stats()
        # (torch's __init__ calls this before num_batches_skipped exists.)
        for name in ("num_batches_skipped", *self._MOVING_BUFFERS):
            buffer = self._buffers.get(name)
            if buffer is not None:
                buffer.zero_()

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.axis != 1:
            text += f", axis={self.axis}"
        if not self.skip_nonfinite:
            text += ", skip_nonfinite=False"
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        if self.renorm is not None:
            text += f", renorm={self.renorm}"
        if self.moving_average is not None:
            text += f", moving_average={self.moving_average}"
        return text

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        absent = self._check_moving_checkpoint(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if absent:  # a checkpoint without windows (plain batch norm): warm-up restarts
            for name in self._MOVING_BUFFERS:
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)
                self._buffers[name].zero_()  # type: ignore[union-attr]
        # num_batches_skipped is not in the state_dict: a layer built on the meta device
        # and loaded with assign=True gets it beside the loaded running statistics.
        skipped = self._buffers.get("num_batches_skipped")
        ref = self._buffers.get("num_batches_tracked")
        if skipped is not None and ref is not None and skipped.device != ref.device:
            self._buffers["num_batches_skipped"] = torch.zeros_like(ref)

    def _check_moving_checkpoint(self, state_dict: dict[str, Any], prefix: str) -> bool:
        """Refuse, before anything of this layer changes, a checkpoint whose moving-average
        windows do not fit it (another window or channel count, or only some of them);
        True when it has none at all (a plain batch-norm checkpoint)."""
        if self.moving_average is None:
            return False
        present = [n for n in self._MOVING_BUFFERS if prefix + n in state_dict]
        if not present:
            return True
        if len(present) != len(self._MOVING_BUFFERS):
            missing = sorted(set(self._MOVING_BUFFERS) - set(present))
            raise ValueError(
                f"{type(self).__name__}: expected a checkpoint with all of "
                f"{', '.join(self._MOVING_BUFFERS)} or none of them (got {', '.join(present)} "
                f"without {', '.join(missing)} under {prefix!r})"
            )
        for name in self._MOVING_BUFFERS:
            value, own = state_dict[prefix + name], self._buffers[name]
            if isinstance(value, Tensor) and own is not None and value.shape != own.shape:
                raise ValueError(
                    f"{type(self).__name__}: expected {prefix}{name} of shape "
                    f"{tuple(own.shape)} (moving_average window={self.moving_average.window}, "
                    f"{self.num_features} channels) (got {tuple(value.shape)}): a checkpoint "
                    "of another window or channel count"
                )
        return False

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (bool, input's shape without the channel axis,
        True = valid) restricts the batch statistics to valid positions (every position is
        normalized with them)."""
        return _batch_norm_layer(self, input, mask)

    def _plan_options(self) -> dict[str, Any]:
        return {
            "momentum": self.momentum,
            "eps": self.eps,
            "axis": self.axis,
            "skip_nonfinite": self.skip_nonfinite,
            "virtual_batch_size": self.virtual_batch_size,
            "renorm": self.renorm,
            "moving_average": self.moving_average,
        }

    def _state(self) -> tuple[Any, ...]:
        """What a call normalizes with and updates, for the current mode: (running_mean,
        running_var, weight, bias, use batch statistics, num_batches_tracked,
        num_batches_skipped) — the running tensors only where they are used."""
        # Read from the module's dicts (a Module.__getattr__ costs ~0.6 µs, per call);
        # weight and bias by attribute when parametrized (torch.nn.utils.parametrize
        # moves them out of _parameters and serves them through a property).
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        training = self.training
        if training and not self.track_running_stats:
            return (None, None, weight, bias, True, None, None)
        try:
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        except KeyError:  # (a parametrized buffer)
            running_mean, running_var = self.running_mean, self.running_var
        if not training:
            return (running_mean, running_var, weight, bias, running_mean is None, None, None)
        return (
            running_mean,
            running_var,
            weight,
            bias,
            True,
            buffers.get("num_batches_tracked"),
            buffers.get("num_batches_skipped"),
        )


class BatchNorm(_BatchNormBase):
    """Batch normalization over an input of any rank ≥ 2 with channels at ``axis``.

    Shape:
        input: (*, C, *) with C at ``axis``; output: same shape.
    """


class BatchNorm1d(_BatchNormBase, nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d`, and a subclass of it.

    Shape:
        input: (N, C) or (N, C, L); output: same shape.
    """

    _ranks = _INPUT_RANKS[1]


class BatchNorm2d(_BatchNormBase, nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d`, and a subclass of it.

    Shape:
        input: (N, C, H, W) (any memory layout); output: same shape.
    """

    _ranks = _INPUT_RANKS[2]


class BatchNorm3d(_BatchNormBase, nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d`, and a subclass of it.

    Shape:
        input: (N, C, D, H, W); output: same shape.
    """

    _ranks = _INPUT_RANKS[3]


class SyncBatchNorm(_BatchNormBase):
    """Batch normalization with the statistics of the global batch across processes.

    Drop-in for :class:`torch.nn.SyncBatchNorm` (same arguments and state_dict) that works
    on every torch.distributed backend — gloo on CPU included, which torch's refuses. In
    training, outputs, gradients and running statistics equal those of single-process
    batch norm over the concatenation of every rank's batch; ranks may have different
    batch sizes, or an empty one (it must still call the layer). One all_gather of the
    per-rank moments (count, mean, M2) in forward, one all_reduce in backward. When
    torch.distributed is not initialized or the group has one rank, it is local batch
    norm. Masks and renorm compose with it; ``virtual_batch_size`` does not.

    Shape:
        input: (N, C, *) (channels at ``axis``); output: same shape.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            **options, _options={"sync": True, "process_group": process_group},
        )  # fmt: skip

    def _plan_options(self) -> dict[str, Any]:
        return {**super()._plan_options(), "sync": True, "process_group": self.process_group}

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every batch-norm layer of ``module`` (torch's or bnorm's) by a
        :class:`SyncBatchNorm` holding the same parameters and buffers; returns the
        module (converted in place, or a new layer if ``module`` itself is one)."""
        converted, _ = convert(module, cls, process_group=process_group)
        return converted


class BatchNormAct(_BatchNormBase):
    """``y = act(γ x̂ + β + residual)``: batch norm, an optional residual add and an
    activation — a ResNet block's tail — in one fused forward and one fused backward in
    training (:mod:`bnorm.kernels`; x̂ as in :class:`BatchNorm`).

    Parameters, buffers, state_dict and the options ``axis``, ``renorm``,
    ``virtual_batch_size``, ``skip_nonfinite``, ``bias`` are those of
    :class:`BatchNorm` (a torch or bnorm batch-norm checkpoint loads as is). Keyword
    options of this layer:

    * ``activation``: ``"identity"``, ``"relu"``, ``"leaky_relu"`` (slope
      ``negative_slope``), ``"elu"`` (``alpha``), ``"silu"`` or ``"gelu"`` (exact, erf).
    * ``memory_efficient=True``: In-Place Activated BN — only the output (and the
      residual) is saved for backward and x̂ is recovered from it. Needs an invertible
      activation (identity, leaky_relu with negative_slope > 0, elu); the forward then uses
      γ' = sign(γ)·max(|γ|, 10⁻³) (γ itself wherever |γ| ≥ 10⁻³; γ's gradient passes
      straight through). Not with ``virtual_batch_size``, ``sync`` or a mask.
    * ``sync=True`` (with ``process_group``): statistics of the global batch, as
      :class:`SyncBatchNorm`.

    With a mask, ghost batches or sync the statistics take bnorm's moments path, whose
    kernel (:mod:`bnorm.kernels.moments`) fuses the add and the activation too; in
    evaluation the running statistics normalize (torch's batch-norm op, then the add and
    the activation).

    Shape:
        input: (*, C, *) with C at ``axis``; residual: like input; output: like input.
    """

    activation: str
    negative_slope: float
    alpha: float
    memory_efficient: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        activation: str = "relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        memory_efficient: bool = False,
        sync: bool = False,
        process_group: Any = None,
        **options: Any,
    ) -> None:
        if not isinstance(activation, str):
            raise TypeError(f"expected activation to be a str (got {type(activation).__name__})")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            **options, _options={
                "activation": activation, "negative_slope": negative_slope, "alpha": alpha,
                "memory_efficient": bool(memory_efficient), "sync": bool(sync),
                "process_group": process_group,
            },
        )  # fmt: skip
        self.__dict__.update(negative_slope=float(negative_slope), alpha=float(alpha))

    def forward(  # type: ignore[override]
        self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """``act(BN(input) + residual)``; ``mask`` as in :meth:`BatchNorm.forward`."""
        return _batch_norm_layer(self, input, mask, residual)

    def _plan_options(self) -> dict[str, Any]:
        return {
            **super()._plan_options(),
            "activation": self.activation,
            "negative_slope": self.negative_slope,
            "alpha": self.alpha,
            "memory_efficient": self.memory_efficient,
            "sync": self.sync,
            "process_group": self.process_group,
        }

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        elif self.activation == "elu":
            text += f", alpha={self.alpha}"
        if self.memory_efficient:
            text += ", memory_efficient=True"
        if self.sync:
            text += ", sync=True"
        return text


class BatchNormAct1d(BatchNormAct, nn.BatchNorm1d):
    """:class:`BatchNormAct` for (N, C) or (N, C, L) input."""

    _ranks = _INPUT_RANKS[1]


class BatchNormAct2d(BatchNormAct, nn.BatchNorm2d):
    """:class:`BatchNormAct` for (N, C, H, W) input (any memory layout)."""

    _ranks = _INPUT_RANKS[2]


class BatchNormAct3d(BatchNormAct, nn.BatchNorm3d):
    """:class:`BatchNormAct` for (N, C, D, H, W) input."""

    _ranks = _INPUT_RANKS[3]


class FrozenBatchNorm(_Planned):
    """Batch normalization with fixed statistics and affine parameters, for fine-tuning.

    ``y = (x − running_mean) / √(running_var + ε) · weight + bias`` per channel in both
    training and evaluation; nothing is updated and ``weight``/``bias`` are buffers, so
    gradients flow to the input only. Loads a batch-norm state_dict (its
    ``num_batches_tracked`` is ignored) and folds like an eval-mode batch norm.

    Shape:
        input: (*, C, *) with C at ``axis``; output: same shape.
    """

    _ranks: ClassVar[tuple[int, ...] | None] = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: Any = None,
        dtype: Any = None,
        *,
        axis: int = 1,
    ) -> None:
        _check_num_features(num_features)
        plan = self._make_plan(eps=eps, axis=axis)
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = plan.eps
        self.axis = plan.axis
        self.weight: Tensor
        self.bias: Tensor
        self.running_mean: Tensor
        self.running_var: Tensor
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.__dict__["_plan"] = plan

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        return text if self.axis == 1 else text + f", axis={self.axis}"

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Apply the fixed transform (``mask`` is accepted and has no effect: nothing is
        estimated)."""
        return _batch_norm_layer(self, input, mask)

    def _plan_options(self) -> dict[str, Any]:
        return {"eps": self.eps, "axis": self.axis}

    def _make_plan(self, **options: Any) -> Plan:
        # Only the running statistics normalize: ε ≥ 0, checked when set (the constructor,
        # ``layer.eps = ...``) rather than at the next forward.
        plan = super()._make_plan(**options)
        check_eps(plan.eps, batch_statistics=False)
        return plan

    def _state(self) -> tuple[Any, ...]:
        return (self.running_mean, self.running_var, self.weight, self.bias, False, None, None)


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for (N, C) or (N, C, L) input."""

    _ranks = _INPUT_RANKS[1]


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for (N, C, H, W) input."""

    _ranks = _INPUT_RANKS[2]


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for (N, C, D, H, W) input."""

    _ranks = _INPUT_RANKS[3]


# --- conversion between layer families: bnorm.convert, SyncBatchNorm.convert_sync_batchnorm


def is_batch_norm(module: nn.Module) -> bool:
    """A trainable batch-norm layer: a ``torch.nn.modules.batchnorm._BatchNorm`` — torch's
    BatchNorm1d/2d/3d and SyncBatchNorm, and every bnorm layer but the frozen ones."""
    return isinstance(module, _BatchNorm)


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """bnorm's :class:`~bnorm.modules.FrozenBatchNorm` (any rank), or a look-alike such as
    torchvision's ``FrozenBatchNorm2d`` (fixed ``running_mean``/``running_var``/``weight``/
    ``bias`` tensors and an ``eps``)."""
    if isinstance(module, FrozenBatchNorm):
        return True
    return type(module).__name__.startswith("FrozenBatchNorm") and all(
        isinstance(getattr(module, a, None), Tensor)
        for a in ("running_mean", "running_var", "weight", "bias")
    )


def batch_norm_layers(module: nn.Module, *, frozen: bool = False) -> list[tuple[str, nn.Module]]:
    """The batch-norm layers of ``module`` as (qualified name, layer), in registration
    order, each once; with ``frozen=True`` frozen batch norms are included too."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if is_batch_norm(m) or (frozen and is_frozen_batch_norm(m))
    ]


# Layer families by the input rank their layers check (None: any rank).
_BNORM = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d, None: BatchNorm}
_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d, None: FrozenBatchNorm}
_ACT = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d, None: BatchNormAct}
_TORCH: dict[int | None, type[nn.Module]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
}
_SYNC: dict[int | None, type[nn.Module]] = {None: SyncBatchNorm}
_TORCH_SYNC: dict[int | None, type[nn.Module]] = {None: nn.SyncBatchNorm}
# The input rank each known layer class checks: its key in its family's table.
_RANK_OF: dict[type[nn.Module], int | None] = {
    cls: rank
    for family in (_TORCH, _TORCH_SYNC, _BNORM, _SYNC, _FROZEN, _ACT)
    for rank, cls in family.items()
}
# Statistics options of bnorm's trainable layers, carried over when converting among them
# (a new option of _BatchNormBase is one more entry here).
_CARRIED_OPTIONS = ("skip_nonfinite", "renorm", "virtual_batch_size", "moving_average")
# BatchNormAct options carried over when converting among BatchNormAct layers.
_ACT_OPTIONS = (
    "activation",
    "negative_slope",
    "alpha",
    "memory_efficient",
    "sync",
    "process_group",
)


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` rows are (qualified name, old class, new
    class); ``skipped`` rows are (qualified name, class, why it was left unchanged)."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    #: (qualified name, option that the new layer does not have) — ``for_inference=True``.
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s), skipped {len(self.skipped)}"]
        lines += [f"  {n or '<root>'}: {a} -> {b}" for n, a, b in self.converted]
        lines += [f"  {n or '<root>'}: {c} left unchanged: {why}" for n, c, why in self.skipped]
        lines += [
            f"  {n or '<root>'}: dropped {what} (training only: eval mode does not use it)"
            for n, what in self.dropped
        ]
        return "\n".join(lines)


def input_ranks(m: nn.Module) -> tuple[int, ...] | None:
    """The input ranks a batch-norm layer accepts, by the known class it derives from
    (torch's or bnorm's); None: any rank (from 2), or a class that is not known."""
    for cls in type(m).__mro__:
        if cls in _RANK_OF:
            return _INPUT_RANKS[_RANK_OF[cls]]
    return None


def _known_base(m: nn.Module) -> type[nn.Module] | None:
    """The known layer class whose forward ``m`` runs, or None if a subclass changes it."""
    for cls in type(m).__mro__:
        if cls in _RANK_OF:
            return cls if type(m).forward is cls.forward else None
    return None


def _foreign(m: nn.Module) -> bool:
    """A frozen batch norm of another library (e.g. torchvision's): bnorm cannot rebuild it,
    and it is left as it is."""
    return is_frozen_batch_norm(m) and not isinstance(m, FrozenBatchNorm)


def _unknown(m: nn.Module) -> str:
    """Why a batch-norm layer whose forward is not a known class's cannot be converted."""
    if _foreign(m):
        return "a frozen batch norm of another library (bnorm cannot rebuild it)"
    return "a subclass that overrides forward (behaviour would be lost)"


def _family(target: Any) -> tuple[str, dict[int | None, type[nn.Module]]]:
    if isinstance(target, type):
        if issubclass(target, SyncBatchNorm):
            return "sync", dict(_SYNC)
        if issubclass(target, FrozenBatchNorm):
            return "frozen", dict(_FROZEN)
        if issubclass(target, BatchNormAct):
            return "act", dict(_ACT)
        if issubclass(target, (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d)):
            return "bnorm", dict(_BNORM)
        if issubclass(target, nn.SyncBatchNorm):
            return "torch-sync", dict(_TORCH_SYNC)
        if issubclass(target, _BatchNorm):
            return "torch", dict(_TORCH)
    raise TypeError(
        "expected target to be a batch-norm layer class such as bnorm.BatchNorm, "
        "bnorm.SyncBatchNorm, bnorm.FrozenBatchNorm, bnorm.BatchNormAct, torch.nn.BatchNorm2d or "
        f"torch.nn.SyncBatchNorm (got {target!r})"
    )


def _state(m: nn.Module) -> dict[str, Any]:
    """The constructor facts of a batch-norm layer, whatever its family."""
    ref = m.running_mean if m.running_mean is not None else m.weight
    if ref is None:
        ref = torch.empty(0)
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": getattr(m, "momentum", 0.1),
        "affine": isinstance(m, FrozenBatchNorm) or m.weight is not None,
        "bias": isinstance(m, FrozenBatchNorm) or getattr(m, "bias", None) is not None,
        "track_running_stats": isinstance(m, FrozenBatchNorm) or m.running_mean is not None,
        "axis": getattr(m, "axis", 1),
        "device": ref.device,
        "dtype": ref.dtype,
    }


# Options that only change training: in eval mode the running statistics normalize.
_TRAINING_ONLY = ("renorm", "virtual_batch_size", "moving_average")


def _training_only_options(m: nn.Module) -> list[str]:
    """``name=value`` of each training-only option ``m`` sets."""
    return [
        f"{name}={getattr(m, name)}"
        for name in _TRAINING_ONLY
        if getattr(m, name, None) is not None
    ]


def _lossless(m: nn.Module, family: str, for_inference: bool = False) -> str | None:
    """Why converting ``m`` to ``family`` would lose something, or None. With
    ``for_inference``, options that only change training are not a loss."""
    st = _state(m)
    if isinstance(m, BatchNormAct) and family != "act":
        return (
            f"the target family cannot hold an activation (activation={m.activation!r}) or a "
            "residual input; convert to a bnorm.BatchNormAct class instead"
        )
    if family.startswith("torch"):
        if st["axis"] != 1:
            return f"torch's layers have no channel axis option (axis={st['axis']})"
        if not for_inference and getattr(m, "renorm", None) is not None:
            return "torch's layers have no Batch Renormalization"
        if not for_inference and getattr(m, "virtual_batch_size", None) is not None:
            return "torch's layers have no ghost batches (virtual_batch_size)"
        if not for_inference and getattr(m, "moving_average", None) is not None:
            return "torch's layers have no moving-average batch norm (moving_average)"
    if family == "sync" and getattr(m, "virtual_batch_size", None) is not None:
        return "bnorm.SyncBatchNorm has no ghost batches (virtual_batch_size)"
    if family == "frozen" and not st["track_running_stats"]:
        return "no running statistics to freeze (track_running_stats=False)"
    return None


def _build(old: nn.Module, cls: type[nn.Module], family: str, options: dict[str, Any]) -> nn.Module:
    st = _state(old)
    factory = {"device": st["device"], "dtype": st["dtype"]}
    new: nn.Module
    if family == "frozen":
        new = cls(st["num_features"], st["eps"], axis=st["axis"], **factory, **options)
        with torch.no_grad():
            for name in ("running_mean", "running_var", "weight", "bias"):
                src = getattr(old, name)
                if src is not None:
                    getattr(new, name).copy_(src.detach())
        new.train(old.training)
        return new
    kwargs: dict[str, Any] = dict(
        eps=st["eps"],
        momentum=st["momentum"],
        affine=st["affine"],
        track_running_stats=st["track_running_stats"],
        **factory,
    )
    if family in ("bnorm", "sync", "act"):
        kwargs.update(bias=st["bias"], axis=st["axis"])
        for name in _CARRIED_OPTIONS:
            if hasattr(old, name):
                kwargs[name] = getattr(old, name)
        if family == "act":
            kwargs.update(_act_options(old))
    elif family == "torch":
        kwargs["bias"] = st["bias"]
    kwargs.update(options)
    new = cls(st["num_features"], **kwargs)
    # Share parameters (optimizers keep working) and buffers.
    for name in ("weight", "bias"):
        src = getattr(old, name, None)
        if src is None or getattr(new, name, None) is None:
            continue
        if isinstance(src, nn.Parameter):
            setattr(new, name, src)
        else:
            setattr(new, name, nn.Parameter(src.detach().clone()))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        src = getattr(old, name, None)
        if src is not None and getattr(new, name, None) is not None:
            setattr(new, name, src)
    if getattr(new, "moving_average", None) == getattr(old, "moving_average", None):
        for name in ("moving_chi", "moving_psi", "moving_steps"):  # the same windows
            src = getattr(old, name, None)
            if src is not None:
                setattr(new, name, src)
    new.train(old.training)
    return new


def _act_options(old: nn.Module) -> dict[str, Any]:
    """The BatchNormAct options that reproduce ``old``: its own if it is one, else the
    identity activation (the same function), synchronized if ``old`` was."""
    if isinstance(old, BatchNormAct):
        return {name: getattr(old, name) for name in _ACT_OPTIONS}
    found: dict[str, Any] = {"activation": "identity"}
    if isinstance(old, (SyncBatchNorm, nn.SyncBatchNorm)):
        found.update(sync=True, process_group=old.process_group)
    return found


def _act_conflict(old: nn.Module, options: dict[str, Any]) -> str | None:
    """Why ``old`` cannot become a BatchNormAct with ``options`` (memory_efficient needs the
    plain statistics path), or None."""
    merged = {**_act_options(old), **options}
    ghost = options.get("virtual_batch_size", getattr(old, "virtual_batch_size", None))
    if merged.get("memory_efficient") and (ghost is not None or merged.get("sync")):
        return "memory_efficient=True is not supported with virtual_batch_size or sync"
    return None


def convert(
    module: nn.Module, target: Any, *, for_inference: bool = False, **options: Any
) -> tuple[nn.Module, ConversionReport]:
    """Replace every batch-norm layer of ``module`` by a layer of ``target``'s family.

    Recognized layers: torch's ``BatchNorm1d/2d/3d`` (and subclasses that keep their
    forward), ``torch.nn.SyncBatchNorm``, and bnorm's layers. ``target`` is a class that
    names the family — ``bnorm.BatchNorm`` (or any of ``BatchNorm1d/2d/3d``: each layer
    gets the class of its own rank), ``bnorm.SyncBatchNorm``, ``bnorm.FrozenBatchNorm``
    (any rank), ``bnorm.BatchNormAct`` (any rank; BatchNormAct layers keep their
    activation, other layers become ``activation="identity"``), ``torch.nn.BatchNorm2d``
    (torch's family, where lossless) or ``torch.nn.SyncBatchNorm``. ``options`` go to
    every new layer's constructor (e.g. ``renorm=True``, ``virtual_batch_size=8``,
    ``moving_average=True``, ``process_group=...``, ``memory_efficient=True``).

    The new layers share the old ones' parameter objects (an optimizer keeps working) and
    buffers, and keep device, dtype and train/eval mode. Layers that cannot be converted
    losslessly — a subclass that overrides ``forward`` (e.g. a fused activation), a
    bnorm-only option going to torch's classes, freezing a layer without running
    statistics, a BatchNormAct going to a family without activations, a frozen batch norm
    of another library (e.g. torchvision's ``FrozenBatchNorm2d``) — are left unchanged and
    listed in the report's ``skipped``.

    ``for_inference=True`` (torch's family only) makes torch layers for inference — the
    recipe before tools that match torch's exact classes (``torch.ao.quantization``'s
    fusers, ``torch.fx.experimental.optimization.fuse``, FLOP counters such as thop and
    ptflops): options that only change training (``renorm``, ``virtual_batch_size``,
    ``moving_average``) are dropped and listed in the report's ``dropped``, since in eval
    mode the running statistics normalize either way. Every such layer must be in eval
    mode, and every batch-norm layer must have a torch equivalent (``axis=1``, a
    rank-specific class, no activation), else a ``ValueError`` names them and nothing is converted.

    Children are replaced in place (like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``);
    returns ``(module, report)``, where ``module`` is a new object only when ``module``
    itself is a converted layer.
    """
    family, classes = _family(target)
    if family.startswith("torch") and options:
        raise ValueError(f"expected no options for torch's layers (got {sorted(options)})")
    if for_inference:
        if family != "torch":
            raise ValueError(
                "expected a torch batch-norm class such as torch.nn.BatchNorm2d as target "
                f"with for_inference=True (got {target!r})"
            )
        _check_for_inference(module, classes)
    report = ConversionReport()
    converted = _convert(module, "", family, classes, options, report, for_inference)
    return converted, report


def _check_for_inference(module: nn.Module, classes: dict[int | None, type[nn.Module]]) -> None:
    """Raise, before anything changes, if a batch-norm layer of ``module`` cannot become
    one of torch's for inference."""
    problems = []
    for name, m in batch_norm_layers(module, frozen=True):
        if _foreign(m):
            continue  # left as it is: torch's exact-class tools do not look for it either
        base = _known_base(m)
        why = None if base is None else _lossless(m, "torch", for_inference=True)
        if base is None:
            why = "a subclass that overrides forward"
        elif why is None and classes.get(_RANK_OF[base]) is None:
            why = "it accepts inputs of any rank: use BatchNorm1d/2d/3d"
        elif why is None and m.training and _training_only_options(m):
            why = "it is in training mode and has " + ", ".join(_training_only_options(m))
            why += " (call model.eval() first)"
        if why is not None:
            problems.append(f"{name or '<root>'} ({type(m).__name__}): {why}")
    if problems:
        raise ValueError(
            "expected every batch-norm layer to have a torch equivalent for inference "
            "(got " + "; ".join(problems) + ")"
        )


def _convert(
    m: nn.Module,
    name: str,
    family: str,
    classes: dict[int | None, type[nn.Module]],
    options: dict[str, Any],
    report: ConversionReport,
    for_inference: bool = False,
) -> nn.Module:
    if is_batch_norm(m) or is_frozen_batch_norm(m):
        base = _known_base(m)
        if base is None:
            report.skipped.append((name, type(m).__name__, _unknown(m)))
            return m
        why = _lossless(m, family, for_inference)
        if why is None and family == "act":
            why = _act_conflict(m, options)
        if why is not None:
            report.skipped.append((name, type(m).__name__, why))
            return m
        rank = _RANK_OF[base]
        cls = classes.get(rank, classes.get(None))
        if cls is None:
            report.skipped.append(
                (name, type(m).__name__, f"no {family} class for inputs of any rank")
            )
            return m
        new = _build(m, cls, family, options)
        report.converted.append((name, type(m).__name__, type(new).__name__))
        if for_inference:
            report.dropped += [(name, what) for what in _training_only_options(m)]
        return new
    for child_name, child in list(m.named_children()):
        full = f"{name}.{child_name}" if name else child_name
        new_child = _convert(child, full, family, classes, options, report, for_inference)
        if new_child is not child:
            setattr(m, child_name, new_child)
    return m
