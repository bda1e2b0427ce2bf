"""Why is my model worse in eval mode? Per-layer checks of batch-norm statistics.

:func:`diagnose` runs a model on data and compares, for every batch-norm layer, the
statistics of the inputs it actually sees with the running statistics it normalizes
them with. :class:`StatisticsRecorder` logs per-layer input statistics during training
(for internal-covariate-shift plots such as the BN paper's Fig. 1).

Typical findings and fixes:

* **drift** (the data's mean/variance differ from the running ones) — the running
  statistics are a noisy, lagging EMA, or the data changed: recompute them exactly with
  :func:`bnorm.recalibrate` ``(model, train_batches)``; if training is still going on,
  a smaller ``momentum`` (a longer average) or ``momentum=None`` (cumulative) for the
  last epoch helps too. Drift that grows with depth is normal when upstream layers
  drift: fix the first drifting layer and run again.
* **drift on a small evaluation set** — too little data to say: use more batches (the
  shift of a mean estimated from n values has a standard error of about 1/√n σ).
* **dead channels** (no variance on the data) — a ReLU before the layer that never fires,
  or a constant input: such channels output β only; check the initialization and the
  learning rate, or prune them.
* **non-finite statistics** — a NaN/inf reached the running statistics (e.g. one bad
  training batch: bnorm's ``skip_nonfinite=True`` keeps them out) or the inputs: find the
  first layer flagged; recalibrate once the inputs are finite.
* **unreached** — the data never exercised that layer (an unused branch): its running
  statistics cannot be checked or recalibrated with this data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._inputs import (
    Forward,
    Progress,
    check_run_arguments,
    collect_input_moments,
    format_table,
    resolve_progress,
)
from .layers import (
    batch_norm_layers,
    channel_axis,
    check_module,
    has_running_stats,
    is_batch_norm,
    is_frozen_batch_norm,
    layer_statistics,
)

__all__ = ["DiagnosisReport", "LayerDiagnosis", "StatisticsRecorder", "diagnose", "percentiles"]


@dataclass
class LayerDiagnosis:
    """The statistics of one layer's inputs on the data vs its running statistics.

    Per channel c, with μ_d, σ²_d the data's mean and unbiased variance and μ_r, σ²_r the
    running ones: ``z_c = (μ_d − μ_r)/√(σ²_r + ε)`` (mean shift in running-σ units),
    ``r_c = (σ²_d + ε)/(σ²_r + ε)`` (variance ratio) and the drift
    ``KL_c = ½ (z_c² + r_c − 1 − ln r_c)``, the Kullback–Leibler divergence of
    N(μ_d, σ²_d + ε) from N(μ_r, σ²_r + ε): 0 when the statistics agree, ½z² for a pure
    shift. Fields: ``drift`` = max_c KL_c (at ``worst_channel``), ``mean_shift`` =
    max_c |z_c|, ``var_ratio_min/max`` = extremes of r_c, ``dead_channels`` (indices whose
    σ²_d ≤ dead_threshold · ε), ``nonfinite_running``/``nonfinite_inputs`` (number of
    channels with a NaN/inf running or data statistic), ``flags`` (what is wrong; empty
    when nothing is).
    """

    name: str
    kind: str
    count: int = 0
    drift: float = math.nan
    worst_channel: int = -1
    mean_shift: float = math.nan
    var_ratio_min: float = math.nan
    var_ratio_max: float = math.nan
    dead_channels: list[int] = field(default_factory=list)
    nonfinite_running: int = 0
    nonfinite_inputs: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return ", ".join(self.flags) if self.flags else "ok"


@dataclass
class DiagnosisReport:
    """Result of :func:`diagnose`: ``print(report)`` for a table, ``report.verdict`` for
    one line, ``report.to_dict()`` / ``report.to_json()`` for machines."""

    layers: list[LayerDiagnosis] = field(default_factory=list)
    num_batches: int = 0
    num_samples: int = 0
    mode: str = "eval"
    drift_threshold: float = 0.05

    def worst(self, k: int = 3) -> list[LayerDiagnosis]:
        """The ``k`` layers with the largest drift above the threshold, worst first."""
        drifting = [layer for layer in self.layers if "drift" in layer.flags]
        return sorted(drifting, key=lambda layer: -layer.drift)[:k]

    @property
    def ok(self) -> bool:
        return all(not layer.flags for layer in self.layers)

    @property
    def verdict(self) -> str:
        n = len(self.layers)
        counted = [layer for layer in self.layers if math.isfinite(layer.drift)]
        if self.ok:
            top = max(counted, key=lambda layer: layer.drift, default=None)
            largest = f"; largest drift {top.drift:.3g} in {top.name}" if top else ""
            return (
                f"OK: the running statistics of all {n} batch-norm layers match the data "
                f"({self.num_samples} samples{largest})"
            )
        parts = []
        drifting = [layer for layer in self.layers if "drift" in layer.flags]
        if drifting:
            named = ", ".join(
                f"{layer.name} (KL {layer.drift:.3g}: shift {layer.mean_shift:.2g}σ, "
                f"var ratio {layer.var_ratio_min:.2g}..{layer.var_ratio_max:.2g})"
                for layer in self.worst(3)
            )
            parts.append(f"{len(drifting)} of {n} layers drift, worst {named}")
        for flag, what in (
            ("non-finite", "non-finite statistics in"),
            ("dead", "dead channels in"),
            ("unreached", "never reached:"),
        ):
            hit = [
                layer.name for layer in self.layers if any(f.startswith(flag) for f in layer.flags)
            ]
            if hit:
                shown = ", ".join(hit[:3]) + (", ..." if len(hit) > 3 else "")
                parts.append(f"{what} {len(hit)} layer{'s' if len(hit) > 1 else ''} ({shown})")
        fix = " — fix: bnorm.recalibrate(model, data)" if drifting else ""
        return "PROBLEMS: " + "; ".join(parts) + fix

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "num_batches": self.num_batches,
            "num_samples": self.num_samples,
            "mode": self.mode,
            "drift_threshold": self.drift_threshold,
            "layers": [{**asdict(layer), "status": layer.status} for layer in self.layers],
        }

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict` (NaN for undefined numbers becomes null)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return json.dumps(clean(self.to_dict()), **kwargs)

    def __str__(self) -> str:
        rows = [
            ("layer", "type", "values/ch", "drift KL", "shift σ", "var ratio", "dead", "status")
        ]
        for layer in self.layers:
            reached = layer.count > 0
            rows.append(
                (
                    layer.name,
                    layer.kind,
                    str(layer.count),
                    f"{layer.drift:.3g}" if reached else "-",
                    f"{layer.mean_shift:.3g}" if reached else "-",
                    f"{layer.var_ratio_min:.3g}..{layer.var_ratio_max:.3g}" if reached else "-",
                    str(len(layer.dead_channels)),
                    layer.status,
                )
            )
        return "\n".join([*format_table(rows, rule=True), self.verdict])


def diagnose(
    module: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    num_samples: int | None = None,
    forward: Forward | None = None,
    mode: str = "eval",
    drift_threshold: float = 0.05,
    dead_threshold: float = 1e-3,
    progress: bool | str = "auto",
) -> DiagnosisReport:
    """Compare every batch-norm layer's running statistics with the statistics of the
    inputs it sees on ``data``; nothing in ``module`` changes.

    For each layer (bnorm's, torch's, frozen ones), the inputs' per-channel mean and
    unbiased variance over all of ``data`` (exact, as in :func:`bnorm.recalibrate`)
    are compared with the running ones — see :class:`LayerDiagnosis` for the scores:
    mean shift z = (μ_d − μ_r)/√(σ²_r + ε), variance ratio r = (σ²_d + ε)/(σ²_r + ε), and
    the drift KL = ½ (z² + r − 1 − ln r) (a shift of 0.3σ alone gives 0.045, a variance
    ratio of 2 alone 0.15). A layer is flagged ``drift`` when its worst channel's KL
    exceeds ``drift_threshold``, ``dead`` when some channel has σ²_d ≤ dead_threshold · ε
    (its normalized output is then essentially constant), ``non-finite`` when a running
    or data statistic is NaN/inf, ``unreached`` when no input arrived. The module
    docstring lists the typical fixes.

    Args:
        module, data, num_batches, num_samples, forward, progress: as for
            :func:`bnorm.recalibrate`.
        mode: ``"eval"`` (default): every batch-norm layer normalizes with its running
            statistics, as deployed, so a drifting layer also shifts the inputs of the
            layers after it; ``"train"``: they normalize with batch statistics, as in
            training, which isolates each layer's own staleness.
        drift_threshold: KL above which a layer is flagged.
        dead_threshold: a channel is dead when its data variance ≤ dead_threshold · ε.

    Returns:
        A :class:`DiagnosisReport`: ``print(report)`` shows the table and the one-line
        ``report.verdict`` naming the worst layers; ``report.to_dict()``/``to_json()``.
    """
    check_module(module)
    num_batches, num_samples = check_run_arguments(data, num_batches, num_samples, forward)
    if mode not in ("eval", "train"):
        raise ValueError(f"expected mode 'eval' or 'train' (got {mode!r})")
    for name, value in (("drift_threshold", drift_threshold), ("dead_threshold", dead_threshold)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"expected {name} to be a number >= 0 (got {value!r})")
    show = resolve_progress(progress)
    layers: list[tuple[str, Any]] = [
        (n, m) for n, m in batch_norm_layers(module, frozen=True) if has_running_stats(m)
    ]
    if not layers:
        raise ValueError(
            "expected a module with at least one batch-norm layer with running statistics "
            f"(got none in {type(module).__name__})"
        )
    gathered, batches, samples = collect_input_moments(
        module,
        layers,
        [layer for _, layer in layers if not is_frozen_batch_norm(layer)],
        data,
        training=mode == "train",
        num_batches=num_batches,
        num_samples=num_samples,
        forward=forward,
        progress=Progress("diagnose", show, num_batches),
    )
    report = DiagnosisReport(
        num_batches=batches, num_samples=samples, mode=mode, drift_threshold=drift_threshold
    )
    for name, layer in layers:
        report.layers.append(
            _diagnose_layer(name, layer, gathered[name], drift_threshold, dead_threshold)
        )
    return report


def _diagnose_layer(
    name: str, layer: Any, mom: Any, drift_threshold: float, dead_threshold: float
) -> LayerDiagnosis:
    entry = LayerDiagnosis(name, type(layer).__name__)
    running_mean = layer.running_mean.detach().to(torch.float64)  # type: ignore[union-attr]
    running_var = layer.running_var.detach().to(torch.float64)  # type: ignore[union-attr]
    eps = float(getattr(layer, "eps", 0.0))
    bad_running = ~(torch.isfinite(running_mean) & torch.isfinite(running_var))
    entry.nonfinite_running = int(bad_running.sum())
    count = 0 if mom is None else int(mom.count[0])
    entry.count = count
    if count == 0:
        entry.flags.append("unreached")
        if entry.nonfinite_running:
            entry.flags.insert(0, "non-finite running stats")
        return entry
    mean, var = (t.to(running_mean.device) for t in layer_statistics(layer, mom))
    bad_inputs = ~(torch.isfinite(mean) & torch.isfinite(var))
    entry.nonfinite_inputs = int(bad_inputs.sum())
    if entry.nonfinite_running:
        entry.flags.append("non-finite running stats")
    if entry.nonfinite_inputs:
        entry.flags.append("non-finite inputs")
    good = ~(bad_running | bad_inputs)
    z = (mean - running_mean) / (running_var + eps).sqrt()
    r = (var + eps) / (running_var + eps)
    kl = 0.5 * (z.square() + r - 1 - r.log())
    if bool(good.any()):
        kl_good = torch.where(good, kl, torch.full_like(kl, -math.inf))
        entry.worst_channel = int(kl_good.argmax())
        entry.drift = float(kl_good.max())
        entry.mean_shift = float(z.abs()[good].max())
        entry.var_ratio_min = float(r[good].min())
        entry.var_ratio_max = float(r[good].max())
    dead = (var <= dead_threshold * eps) & torch.isfinite(var)
    entry.dead_channels = [int(c) for c in dead.nonzero().flatten()]
    if entry.drift > drift_threshold:
        entry.flags.append("drift")
    if entry.dead_channels:
        entry.flags.append(f"dead: {len(entry.dead_channels)} channels")
    return entry


# --------------------------------------------------------------------------------------
# Recording statistics during training


def percentiles(x: Tensor, q: Sequence[float], axis: int = 1) -> Tensor:
    """Per-channel percentiles of ``x`` over every axis but ``axis``, by linear
    interpolation between order statistics (numpy's default): for n sorted values
    v₀ ≤ … ≤ v_{n−1}, the p-th percentile is v_⌊h⌋ + (h − ⌊h⌋)(v_⌈h⌉ − v_⌊h⌋) with
    h = (n − 1)·p/100. Computed in float32 or wider.

    Shape:
        x: (*, C, *) with C at ``axis``; returns (len(q), C).
    """
    ax = axis % x.dim()
    values = x.detach().movedim(ax, 0).reshape(x.shape[ax], -1)
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    ordered = values.sort(dim=1).values
    n = ordered.shape[1]
    out = []
    for p in q:
        h = (n - 1) * float(p) / 100.0
        lo, hi = math.floor(h), math.ceil(h)
        out.append(ordered[:, lo] + (h - lo) * (ordered[:, hi] - ordered[:, lo]))
    return torch.stack(out)


class StatisticsRecorder:
    """Log per-layer statistics of the inputs (or outputs) of chosen layers during
    training, every ``every`` steps.

    At a recording step, the first call of each watched layer records, per channel: the
    number of values, mean, biased variance and the ``quantiles`` (percentiles, e.g.
    (15, 50, 85) as in the BN paper's Fig. 1; see :func:`percentiles`). Call
    :meth:`step` once per training step; steps 0, every, 2·every, ... are recorded.
    Masks are ignored. Records live on the CPU.

    Usage::

        with StatisticsRecorder(model, every=50) as recorder:   # all batch-norm layers
            for x, y in loader:
                loss = criterion(model(x), y); ...
                recorder.step()
        steps, p50 = recorder.series("layer1.0.bn1", "percentiles", index=1)

    Args:
        module: the model.
        layers: names of the modules to watch (any kind, e.g. a ``nn.Sigmoid``); default
            every batch-norm layer (frozen ones included).
        every: record every this many steps.
        quantiles: the percentiles to record, each in [0, 100].
        target: ``"input"`` (the first positional argument) or ``"output"``.
        axis: channel axis for watched modules that are not batch-norm layers (batch-norm
            layers use their own).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        layers: Iterable[str] | None = None,
        every: int = 1,
        quantiles: Sequence[float] = (15.0, 50.0, 85.0),
        target: str = "input",
        axis: int = 1,
    ) -> None:
        check_module(module)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"expected every to be an int >= 1 (got {every!r})")
        if target not in ("input", "output"):
            raise ValueError(f"expected target 'input' or 'output' (got {target!r})")
        quantiles = tuple(float(q) for q in quantiles)
        if any(not 0.0 <= q <= 100.0 for q in quantiles):
            raise ValueError(f"expected quantiles in [0, 100] (got {quantiles})")
        named = dict(module.named_modules())
        if layers is None:
            watched = batch_norm_layers(module, frozen=True)
        else:
            layers = [layers] if isinstance(layers, str) else list(layers)
            missing = [name for name in layers if name not in named]
            if missing:
                raise ValueError(
                    f"expected names of submodules of the model (got unknown {missing}; "
                    f"known: {sorted(n for n in named if n)[:10]}...)"
                )
            watched = [(name, named[name]) for name in layers]
        if not watched:
            raise ValueError(
                "expected at least one layer to watch (the model has no batch-norm layer)"
            )
        self.watched = watched
        self.every = every
        self.quantiles = quantiles
        self.target = target
        self.axis = axis
        self.step_count = 0
        self.records: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self._handles: list[Any] = []

    # attach / detach ------------------------------------------------------------------
    def attach(self) -> StatisticsRecorder:
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        for name, layer in self.watched:
            if self.target == "input":
                self._handles.append(layer.register_forward_pre_hook(self._pre_hook(name, layer)))
            else:
                self._handles.append(layer.register_forward_hook(self._post_hook(name, layer)))
        return self

    def detach(self) -> None:
        """Remove the hooks; the records stay."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StatisticsRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def step(self) -> None:
        """Advance the step counter (call once per training step)."""
        self.step_count += 1
        self._seen.clear()

    # recording ------------------------------------------------------------------------
    def _axis_of(self, layer: nn.Module) -> int:
        if is_frozen_batch_norm(layer) or is_batch_norm(layer):
            return channel_axis(layer)
        return self.axis

    def _record(self, name: str, layer: nn.Module, x: Any) -> None:
        if self.step_count % self.every or name in self._seen:
            return
        if not isinstance(x, Tensor) or x.dim() < 2 or x.numel() == 0:
            return
        self._seen.add(name)
        with torch.no_grad():
            axis = self._axis_of(layer)
            values = x.detach()
            if values.dtype not in (torch.float32, torch.float64):
                values = values.float()
            dims = [d for d in range(values.dim()) if d != axis % values.dim()]
            var, mean = torch.var_mean(values, dim=dims, correction=0)
            qs = percentiles(values, self.quantiles, axis) if self.quantiles else None
            self.records.append(
                {
                    "step": self.step_count,
                    "layer": name,
                    "count": values.numel() // values.shape[axis],
                    "mean": mean.cpu(),
                    "var": var.cpu(),
                    "percentiles": None if qs is None else qs.cpu(),
                }
            )

    def _pre_hook(self, name: str, layer: nn.Module) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args:
                self._record(name, layer, args[0])

        return hook

    def _post_hook(self, name: str, layer: nn.Module) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._record(name, layer, output)

        return hook

    # reading --------------------------------------------------------------------------
    def series(
        self, layer: str, stat: str = "mean", *, index: int | None = None
    ) -> tuple[list[int], Tensor]:
        """(steps, values) of one layer's statistic over the recorded steps.

        ``stat`` is ``"mean"`` or ``"var"`` (values: (steps, C)) or ``"percentiles"``
        (values: (steps, len(quantiles), C); ``index`` picks one quantile: (steps, C)).
        """
        if stat not in ("mean", "var", "percentiles"):
            raise ValueError(f"expected stat 'mean', 'var' or 'percentiles' (got {stat!r})")
        rows = [r for r in self.records if r["layer"] == layer]
        if not rows:
            known = sorted({r["layer"] for r in self.records})
            raise ValueError(f"expected a recorded layer (got {layer!r}; recorded: {known})")
        if stat == "percentiles" and rows[0]["percentiles"] is None:
            raise ValueError("expected quantiles to have been recorded (got quantiles=())")
        values = torch.stack([r[stat] for r in rows])
        if stat == "percentiles" and index is not None:
            values = values[:, index]
        return [r["step"] for r in rows], values

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: quantiles, every, and the records with lists for tensors."""
        return {
            "every": self.every,
            "quantiles": list(self.quantiles),
            "target": self.target,
            "records": [
                {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in r.items()}
                for r in self.records
            ],
        }
