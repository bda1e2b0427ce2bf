"""Test-time adaptation: batch-norm statistics (and affine parameters) fitted to test data.

A network trained on one distribution and tested on a shifted one (noise, blur, a new
camera...) normalizes its test inputs with the training (*source*) running statistics,
which no longer describe them. :func:`adapt` changes what the batch-norm layers
normalize with, using unlabeled test data only. Per channel of each layer, with μ_s, σ²_s
the source running statistics and μ_t, σ²_t the statistics of the layer's test inputs:

* ``"bn"`` — normalize with the test statistics (μ_t, σ²_t): Schneider et al. 2020's
  full adaptation, Nado et al. 2020's "prediction-time BN".
* ``"prior"`` — Schneider et al. 2020 ("Improving robustness against common corruptions
  by covariate shift adaptation"): the source statistics act as a prior worth N samples
  (``prior_strength``), mixed with the statistics of n test samples::

      μ = (N·μ_s + n·μ_t)/(N + n),    σ² = (N·σ²_s + n·σ²_t)/(N + n)

  N = 0 is ``"bn"``; N → ∞ keeps the source statistics. The variance rule is the
  paper's linear mix; the variance of the pooled source and test populations would add
  the between-group term N·n·(μ_t − μ_s)²/(N + n)², which the paper omits and
  :func:`adapt` does not offer.
* ``"tent"`` — Wang et al. 2021 ("Tent: fully test-time adaptation by entropy
  minimization"): normalize with each test batch's statistics and take a gradient step
  on the batch's mean prediction entropy ``L = (1/B) Σ_b H(ŷ_b)``,
  ``H(ŷ) = −Σ_c p_c log p_c``, ``p = softmax(logits)``, with respect to the batch-norm
  affine parameters γ, β only.

Two ways to use the statistics:

* **pooled** (``online=False``, ``"bn"``/``"prior"``): μ_t, σ²_t are the exact mean and
  unbiased variance of the layer's inputs over all of ``data`` (computed as
  :func:`bnorm.recalibrate` does; n = the number of test samples). They are written into
  the running statistics, so the adapted model predicts in ``eval()`` mode as usual.
* **online** (``online=True``; ``"tent"`` always): each batch is normalized with
  statistics of that batch (μ_t, σ²_t = its mean and biased variance, as a training-mode
  layer normalizes; n = its number of samples) and the model's outputs for the batches
  are returned in ``report.outputs``. The running statistics are left as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import Moments
from ._inputs import (
    Forward,
    Progress,
    check_run_arguments,
    collect_input_moments,
    format_table,
    input_moments_hook,
    resolve_progress,
)
from ._outputs import find_logits
from ._state import SavedState
from .calibrate import recalibrate, sort_by_model_order, statistics_shift
from .layers import (
    batch_norm_layers,
    check_module,
    has_running_stats,
    is_frozen_batch_norm,
    layer_statistics,
)

__all__ = ["METHODS", "AdaptationReport", "LayerAdaptation", "adapt", "entropy"]

METHODS = ("bn", "prior", "tent")
OPTIMIZERS = ("sgd", "adam")


def entropy(logits: Tensor) -> Tensor:
    """Mean prediction entropy ``(1/B) Σ_b −Σ_c p_bc log p_bc`` with ``p = softmax(logits)``
    over dim 1 (classes); for outputs with more dimensions (N, C, ...) the mean runs over
    every position."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


# --------------------------------------------------------------------------------------
# The report


@dataclass
class LayerAdaptation:
    """What :func:`adapt` saw and did at one layer.

    ``count``: values per channel of its test inputs; ``mean_shift``: max over channels
    of |μ_t − μ_s|/√(σ²_s + ε) (the test data's mean shift in source-σ units);
    ``var_ratio_min``/``var_ratio_max``: extremes of σ²_t/σ²_s (μ_t, σ²_t: the pooled
    mean and unbiased variance of every input the layer saw); for ``"tent"``,
    ``weight_change``/``bias_change``: max over channels of |Δγ|, |Δβ|; ``status``:
    ``"adapted"`` or why the layer was left alone.
    """

    name: str
    kind: str
    status: str
    count: int = 0
    mean_shift: float = math.nan
    var_ratio_min: float = math.nan
    var_ratio_max: float = math.nan
    weight_change: float = math.nan
    bias_change: float = math.nan


@dataclass
class AdaptationReport:
    """Per-layer summary of an :func:`adapt` call (``print`` it, or ``to_dict()``).

    ``outputs``: the model's output for each batch, in order, for online methods (None
    for pooled ones: predict with the adapted model in ``eval()`` mode);
    ``test_weight``: n/(N + n) of ``"prior"`` pooled (1 for ``"bn"`` pooled).
    """

    method: str
    online: bool
    layers: list[LayerAdaptation] = field(default_factory=list)
    num_batches: int = 0
    num_samples: int = 0
    prior_strength: float | None = None
    test_weight: float | None = None
    outputs: list[Any] | None = None

    @property
    def adapted(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.status == "adapted"]

    def to_dict(self) -> dict[str, Any]:
        """Everything but the outputs, JSON-ready (NaN where a number does not apply)."""
        return {
            "method": self.method,
            "online": self.online,
            "num_batches": self.num_batches,
            "num_samples": self.num_samples,
            "prior_strength": self.prior_strength,
            "test_weight": self.test_weight,
            "layers": [vars(layer).copy() for layer in self.layers],
        }

    def __str__(self) -> str:
        how = "online, per batch" if self.online else "pooled over the data"
        prior = f", prior strength N = {self.prior_strength:g}" if self.method == "prior" else ""
        weight = (
            f", test weight n/(N+n) = {self.test_weight:.3g}"
            if self.method == "prior" and self.test_weight is not None
            else ""
        )
        head = (
            f"adapt {self.method!r} ({how}{prior}{weight}): {len(self.adapted)} of "
            f"{len(self.layers)} batch-norm layers on {self.num_samples} samples "
            f"({self.num_batches} batches)"
        )
        tent = self.method == "tent"
        columns = ["layer", "type", "values/ch", "mean shift (σ)", "var ratio"]
        rows = [tuple(columns + (["max |Δγ|", "max |Δβ|"] if tent else []) + ["status"])]
        for layer in self.layers:
            seen = layer.count > 0
            cells = [
                layer.name,
                layer.kind,
                str(layer.count),
                f"{layer.mean_shift:.3g}" if seen else "-",
                f"{layer.var_ratio_min:.3g}..{layer.var_ratio_max:.3g}" if seen else "-",
            ]
            if tent:
                cells += [_num(layer.weight_change), _num(layer.bias_change)]
            rows.append((*cells, layer.status))
        return "\n".join([head, *format_table(rows)])


def _num(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "-"


# --------------------------------------------------------------------------------------
# Checks (all before any state changes)


def _check_number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected {name} to be a number (got {type(value).__name__})")
    bad = not math.isfinite(value) or (value <= 0 if positive else value < 0)
    if bad:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"expected a finite {name} {bound} (got {value})")
    return float(value)


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} to be True or False (got {value!r})")
    return value


# --------------------------------------------------------------------------------------
# adapt


def adapt(
    model: nn.Module,
    data: Iterable[Any],
    method: str = "bn",
    *,
    online: bool | None = None,
    prior_strength: float = 16.0,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    steps: int = 1,
    episodic: bool = False,
    num_batches: int | None = None,
    num_samples: int | None = None,
    forward: Forward | None = None,
    progress: bool | str = "auto",
) -> AdaptationReport:
    """Adapt the batch-norm layers of ``model`` (bnorm's and torch's) to the unlabeled
    test data ``data``; see the module docstring for the three methods.

    Per channel of each layer, with μ_s, σ²_s its running (source) statistics and μ_t,
    σ²_t those of its test inputs:

    * ``"bn"``: normalize with μ_t, σ²_t.
    * ``"prior"``: normalize with ``μ = (N·μ_s + n·μ_t)/(N + n)`` and
      ``σ² = (N·σ²_s + n·σ²_t)/(N + n)``, N = ``prior_strength`` (a pseudo-count of
      source samples), n = the number of test samples behind μ_t, σ²_t (Schneider et al.
      2020; both counted in samples, i.e. first-dimension entries of the input, as the
      paper's batch size — not in values per channel). The exact pooled variance would
      add N·n·(μ_t − μ_s)²/(N + n)²; this is the paper's rule, without it.
    * ``"tent"`` (always online): for each batch, normalize with the batch's statistics,
      compute ``L = (1/B) Σ_b −Σ_c p_bc log p_bc`` (``p = softmax(logits, dim=1)``; mean
      over all positions for outputs (N, C, ...)), and take ``steps`` optimizer steps on
      L with respect to the batch-norm weights γ and biases β only (every other
      parameter has ``requires_grad=False`` meanwhile; restored afterwards). The output
      reported for the batch is the last forward's, i.e. before the last step (one step:
      the prediction of the parameters adapted on the previous batches, as in Tent's
      reference code). Default optimizer: SGD, lr 1e-3, momentum 0.9 (``optimizer=
      "adam"``: Adam with betas (``momentum``, 0.999), the paper's CIFAR setting). One
      optimizer lives across the batches; ``episodic=True`` resets γ, β and the
      optimizer after every batch (each batch adapted from the source model; with
      ``steps=1`` its outputs then equal ``"bn"`` online). Running statistics are
      neither used nor updated (Tent's reference discards them); the adapted γ, β stay
      in the model (unless episodic). For eval-mode predictions afterwards, combine them
      with test statistics: ``adapt(model, data, "bn")``.

    Pooled (``online=False``, the default for ``"bn"`` and ``"prior"``): μ_t and σ²_t are
    the exact mean and unbiased variance of all the values the layer sees over ``data``
    (:func:`bnorm.recalibrate`: layers normalize with batch statistics during the pass,
    moments merged in float64; n = the number of samples run), written into
    ``running_mean``/``running_var``: predict with ``model.eval()`` afterwards.
    Online (``online=True``): each batch is normalized with statistics from that batch
    alone (μ_t, σ²_t its mean and biased variance, as a training-mode layer normalizes;
    n its size), the model's outputs are collected in ``report.outputs``, and the model
    is left as found (``"tent"``: but for γ, β).

    Args:
        model: the model; for ``"tent"`` its output must hold logits (N, C, ...): a
            Tensor, or found in a tuple/dict/``ModelOutput`` (``.logits`` /
            ``["logits"]``, else the first floating-point Tensor). Other modules keep
            their mode: call ``model.eval()`` first to switch dropout off.
        data: an iterable of batches, read as by :func:`bnorm.recalibrate` (a tensor,
            ``(input, ...)``, or a dict with an ``"input"`` tensor; else ``forward``).
        method: ``"bn"``, ``"prior"`` or ``"tent"``.
        online: per-batch statistics and outputs (default: False, True for ``"tent"``,
            which has no pooled mode).
        prior_strength: N for ``"prior"`` (≥ 0; default 16: the source statistics
            weigh as much as 16 test samples).
        lr, optimizer, momentum, steps, episodic: ``"tent"``'s optimization (above).
        num_batches, num_samples: stop after this many batches / samples.
        forward: ``forward(model, batch)`` calls ``model(...)`` on one batch and, for
            online methods, returns its output; each call of the model is one forward of
            the adaptation (``"tent"``: one step).
        progress: a progress line on stderr: True, False or ``"auto"`` (a terminal).

    Returns:
        An :class:`AdaptationReport`: per layer, the test data's shift from the source
        statistics (and γ/β changes for ``"tent"``); batches and samples run; the outputs
        of online methods.

    Raises:
        TypeError, ValueError: bad arguments, before the model is touched; also an
            empty ``data`` (for an iterator, found out after the pass: the model is then
            left as found). An exception while adapting leaves the model as found.
    """
    check_module(model, "model")
    online = _check_method(method, online)
    strength = _check_number("prior_strength", prior_strength, positive=False)
    tent = _check_tent(method, lr, optimizer, momentum, steps, episodic)
    num_batches, num_samples = check_run_arguments(
        data, num_batches, num_samples, forward, nonempty=True
    )
    show = resolve_progress(progress)
    all_layers = batch_norm_layers(model, frozen=True)
    layers = _layers_to_adapt(model, all_layers, method)

    report = AdaptationReport(
        method, online, prior_strength=strength if method == "prior" else None
    )
    if not online:
        _adapt_pooled(
            model, data, report, layers, strength, num_batches, num_samples, forward, show
        )
    else:
        _adapt_online(
            model,
            data,
            report,
            layers,
            strength=strength,
            tent=tent,
            num_batches=num_batches,
            num_samples=num_samples,
            forward=forward,
            show=show,
        )
    _add_skipped(report, all_layers)
    sort_by_model_order(report.layers, all_layers)
    return report


def _check_method(method: Any, online: Any) -> bool:
    """Check ``method`` and ``online``; returns ``online`` resolved (None: True for
    ``"tent"`` only)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(
            f"expected method to be one of {', '.join(map(repr, METHODS))} (got {method!r})"
        )
    if online is None:
        online = method == "tent"
    _check_flag("online", online)
    if method == "tent" and not online:
        raise ValueError(
            "expected online=True or None for method 'tent' (it adapts batch by batch)"
        )
    return bool(online)


def _check_tent(
    method: str, lr: Any, optimizer: Any, momentum: Any, steps: Any, episodic: Any
) -> _TentSettings | None:
    """Check Tent's settings (whatever the method); returns them for ``"tent"``."""
    lr = _check_number("lr", lr, positive=True)
    momentum = _check_number("momentum", momentum, positive=False)
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"expected optimizer to be 'sgd' or 'adam' (got {optimizer!r})")
    if method == "tent" and optimizer == "adam" and momentum >= 1:
        raise ValueError(f"expected momentum < 1 for Adam's first beta (got {momentum})")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"expected steps to be an int (got {type(steps).__name__})")
    if steps < 1:
        raise ValueError(f"expected steps >= 1 (got {steps})")
    _check_flag("episodic", episodic)
    return _TentSettings(lr, optimizer, momentum, steps, episodic) if method == "tent" else None


def _layers_to_adapt(
    model: nn.Module, all_layers: list[tuple[str, nn.Module]], method: str
) -> list[tuple[str, Any]]:
    """The layers ``method`` adapts: not frozen, and with affine parameters for
    ``"tent"``, with running statistics for the others. Raises when there is none."""
    got = f"(got none in {type(model).__name__})"
    if not all_layers:
        raise ValueError(f"expected a model with at least one batch-norm layer {got}")
    if method == "tent":
        layers = [(n, m) for n, m in all_layers if not is_frozen_batch_norm(m) and _affine(m)]
        if not layers:
            raise ValueError(
                "expected a model with at least one batch-norm layer with affine parameters "
                f"(weight and bias) for 'tent' {got}"
            )
        return layers
    layers = [
        (n, m) for n, m in all_layers if not is_frozen_batch_norm(m) and has_running_stats(m)
    ]
    if not layers:
        raise ValueError(
            "expected a model with at least one batch-norm layer that keeps running "
            f"statistics {got}"
        )
    return layers


def _add_skipped(report: AdaptationReport, all_layers: list[tuple[str, nn.Module]]) -> None:
    """An entry, with the reason, for each layer the method left alone."""
    entered = {layer.name for layer in report.layers}
    for name, layer in all_layers:
        if name in entered:
            continue
        reason = (
            "skipped: frozen"
            if is_frozen_batch_norm(layer)
            else "skipped: no affine parameters"
            if report.method == "tent"
            else "skipped: no running statistics"
        )
        report.layers.append(LayerAdaptation(name, type(layer).__name__, reason))


def _affine(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "weight", None), nn.Parameter) and isinstance(
        getattr(layer, "bias", None), nn.Parameter
    )


def _source_statistics(layers: list[tuple[str, Any]]) -> dict[str, tuple[Tensor, Tensor]]:
    """A float64 copy of the running (source) mean and variance of each layer that keeps
    them, by name."""
    return {
        name: (
            layer.running_mean.detach().double().clone(),
            layer.running_var.detach().double().clone(),
        )
        for name, layer in layers
        if has_running_stats(layer)
    }


def _no_batches(report: AdaptationReport) -> None:
    if report.num_batches == 0:
        raise ValueError("expected data with at least one batch (got none)")


# --------------------------------------------------------------------------------------
# pooled: "bn" and "prior" through recalibrate


def _adapt_pooled(
    model: nn.Module,
    data: Iterable[Any],
    report: AdaptationReport,
    layers: list[tuple[str, Any]],
    strength: float,
    num_batches: int | None,
    num_samples: int | None,
    forward: Forward | None,
    show: bool,
) -> None:
    source = _source_statistics(layers)
    calibration = recalibrate(
        model,
        data,
        num_batches=num_batches,
        num_samples=num_samples,
        forward=forward,
        progress=show,
    )  # restores the model itself if interrupted
    report.num_batches, report.num_samples = calibration.num_batches, calibration.num_samples
    n = float(calibration.num_samples)
    weight = n / (strength + n) if report.method == "prior" and n > 0 else 1.0
    report.test_weight = weight
    entries = {entry.name: entry for entry in calibration.layers}
    if report.num_batches == 0:
        _no_batches(report)  # nothing was changed: every layer kept its statistics
    with torch.no_grad():
        for name, layer in layers:
            entry = entries[name]
            if entry.status != "updated":
                report.layers.append(LayerAdaptation(name, entry.kind, entry.status, entry.count))
                continue
            test_mean, test_var = layer.running_mean.double(), layer.running_var.double()
            if report.method == "prior":
                _set_prior_mix(layer, strength, source[name], n, test_mean, test_var)
            shift, lo, hi = statistics_shift(layer, test_mean, test_var, *source[name])
            report.layers.append(
                LayerAdaptation(name, entry.kind, "adapted", entry.count, shift, lo, hi)
            )


def _set_prior_mix(
    layer: Any,
    strength: float,
    source: tuple[Tensor, Tensor],
    n: float,
    mean: Tensor,
    var: Tensor,
) -> None:
    """Set the layer's running statistics to the prior rule's mix of the ``source``
    statistics (worth ``strength`` samples) and the test statistics of ``n`` samples."""
    src_mean, src_var = source
    mixed_mean = (strength * src_mean + n * mean) / (strength + n)
    mixed_var = (strength * src_var + n * var) / (strength + n)
    layer.running_mean.copy_(mixed_mean.to(layer.running_mean.dtype))
    layer.running_var.copy_(mixed_var.to(layer.running_var.dtype))


# --------------------------------------------------------------------------------------
# online: "bn", "prior" and "tent", batch by batch


@dataclass(frozen=True)
class _TentSettings:
    lr: float
    optimizer: str
    momentum: float
    steps: int
    episodic: bool


class _Runner(nn.Module):
    """Stands in for the model in :func:`run_batches`: each call runs the model (for Tent:
    ``steps`` forward/backward/step rounds) and keeps the output."""

    def __init__(self, model: nn.Module, step: Callable[[Any], None] | None, steps: int) -> None:
        super().__init__()
        self.model = model
        self.step = step
        self.steps = steps
        self.outputs: list[Any] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.step is None:
            out = self.model(*args, **kwargs)
        else:
            with torch.enable_grad():
                for _ in range(self.steps):
                    out = self.model(*args, **kwargs)
                    self.step(out)
        self.outputs.append(_detach(out))
        return out


def _detach(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(_detach(o) for o in out)
    if isinstance(out, dict):
        detached = {k: _detach(v) for k, v in out.items()}
        try:  # keep the type of a dict subclass (Hugging Face's ModelOutput)
            return type(out)(**detached)
        except TypeError:
            return detached
    return out


def _prior_hook(layer: Any, strength: float, source: tuple[Tensor, Tensor]) -> Callable[..., None]:
    """A forward pre-hook that sets the (eval-mode) layer's running statistics to the
    prior mix of the source statistics and the current batch's (mean, biased variance)."""

    def mix(x: Tensor, batch: Moments) -> None:
        # (mean, biased variance), as a training-mode layer normalizes with
        mean, var = (t.double() for t in layer_statistics(layer, batch, unbiased=False))
        _set_prior_mix(layer, strength, source, float(x.shape[0]), mean, var)

    return input_moments_hook(layer, mix)


def _adapt_online(
    model: nn.Module,
    data: Iterable[Any],
    report: AdaptationReport,
    layers: list[tuple[str, Any]],
    *,
    strength: float,
    tent: _TentSettings | None,
    num_batches: int | None,
    num_samples: int | None,
    forward: Forward | None,
    show: bool,
) -> None:
    source = _source_statistics(layers)
    params = list(model.parameters())
    affine = [(layer.weight, layer.bias) for _, layer in layers] if tent is not None else []
    start = [(w.detach().clone(), b.detach().clone()) for w, b in affine]
    # What Tent trains and freezes, and the prior's hooks, are put back by this state (γ, β
    # only if an exception leaves the block, or after every batch when episodic); the
    # layers' modes, momenta and buffers by collect_input_moments.
    state = SavedState(parameters=params, values=[p for pair in affine for p in pair])
    with state:
        if report.method == "prior":  # eval mode, running statistics set by the hooks
            for name, layer in layers:
                state.add_hook(
                    layer.register_forward_pre_hook(
                        _prior_hook(layer, strength, source[name]), with_kwargs=True
                    )
                )
            changed, training = [layer for _, layer in layers], False
        else:  # "bn" and "tent": training-mode normalization, running statistics kept
            changed = [m for _, m in batch_norm_layers(model) if not is_frozen_batch_norm(m)]
            training = True
        step = _tent_step(params, affine, start, tent) if tent is not None else None
        runner = _Runner(model, step, tent.steps if tent is not None else 1)
        gathered, report.num_batches, report.num_samples = collect_input_moments(
            runner,
            layers,
            changed,
            data,
            training=training,
            num_batches=num_batches,
            num_samples=num_samples,
            forward=forward,
            progress=Progress(f"adapt {report.method}", show, num_batches),
        )
        _no_batches(report)
        report.outputs = runner.outputs
        if tent is not None and tent.episodic:
            state.restore_values()

    for index, (name, layer) in enumerate(layers):
        entry = _online_entry(name, layer, gathered[name], source.get(name))
        if tent is not None:
            w0, b0 = start[index]
            entry.weight_change = float((layer.weight.detach() - w0).abs().max())
            entry.bias_change = float((layer.bias.detach() - b0).abs().max())
        report.layers.append(entry)


def _online_entry(
    name: str, layer: Any, mom: Moments | None, source: tuple[Tensor, Tensor] | None
) -> LayerAdaptation:
    """A layer's report entry: how far the pooled statistics of the inputs it saw are from
    its ``source`` statistics (when it keeps them)."""
    count = 0 if mom is None else int(mom.count[0])
    entry = LayerAdaptation(name, type(layer).__name__, "adapted", count)
    if mom is not None and count > 1 and source is not None:
        mean, var = layer_statistics(layer, mom)
        entry.mean_shift, entry.var_ratio_min, entry.var_ratio_max = statistics_shift(
            layer, mean, var, *source
        )
    if count == 0:
        entry.status = "kept: not reached by the data"
    return entry


def _tent_step(
    params: list[nn.Parameter],
    affine: list[tuple[nn.Parameter, nn.Parameter]],
    start: list[tuple[Tensor, Tensor]],
    tent: _TentSettings,
) -> Callable[[Any], None]:
    """Freeze every parameter but γ, β and return the step taken on each output."""
    trainable = [p for pair in affine for p in pair]
    chosen = {id(p) for p in trainable}
    for p in params:
        p.requires_grad_(id(p) in chosen)
    for p in trainable:
        p.grad = None

    def make() -> torch.optim.Optimizer:
        if tent.optimizer == "adam":
            return torch.optim.Adam(trainable, lr=tent.lr, betas=(tent.momentum, 0.999))
        return torch.optim.SGD(trainable, lr=tent.lr, momentum=tent.momentum)

    optimizer = [make()]

    def step(out: Any) -> None:
        logits = find_logits(out)
        if not logits.is_floating_point() or logits.dim() < 2:
            raise TypeError(
                "expected the model (or forward) to return floating-point logits of shape "
                f"(N, C, ...) for 'tent' (got a {logits.dtype} Tensor of shape "
                f"{tuple(logits.shape)})"
            )
        loss = entropy(logits)
        optimizer[0].zero_grad(set_to_none=True)
        loss.backward()
        optimizer[0].step()

    return _episodic(step, affine, start, optimizer, make, tent.steps) if tent.episodic else step


def _episodic(
    step: Callable[[Any], None],
    affine: list[tuple[nn.Parameter, nn.Parameter]],
    start: list[tuple[Tensor, Tensor]],
    optimizer: list[torch.optim.Optimizer],
    make: Callable[[], torch.optim.Optimizer],
    steps: int,
) -> Callable[[Any], None]:
    """After every ``steps`` steps (one batch), reset γ, β and the optimizer."""
    done = [0]

    def wrapped(out: Any) -> None:
        step(out)
        done[0] += 1
        if done[0] % steps == 0:
            with torch.no_grad():
                for (w, b), (w0, b0) in zip(affine, start):
                    w.copy_(w0)
                    b.copy_(b0)
            optimizer[0] = make()

    return wrapped
