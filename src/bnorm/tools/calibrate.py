"""Exact population statistics for the batch-norm layers of a trained model.

The running statistics a batch-norm layer keeps during training are an exponential
moving average of batch statistics taken while the weights moved: noisy, and lagging
the final weights. :func:`recalibrate` replaces them with the exact statistics of the
layer's inputs over a data set, with the weights fixed (Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm", call it *precise BN*).

Each batch b contributes the per-channel moments (m_b, μ_b, M2_b) of the values the layer
saw (:func:`bnorm.functional.moments`; masked positions excluded); the moments are merged
exactly (:func:`bnorm.functional.merge_moments`, Chan et al.), which is the law of total
variance::

    n = Σ_b m_b,   E[x] = (1/n) Σ_b m_b μ_b,
    Var[x] = 1/(n − 1) · Σ_b (M2_b + m_b (μ_b − E[x])²)        (unbiased, as torch stores)

— the mean and unbiased variance of all the values concatenated, whatever the batch
sizes (not the average of the batch variances).

Finding the layers (:mod:`bnorm.tools.layers`), feeding the batches and collecting the
input moments with hooks (``bnorm.tools._inputs``), and saving and restoring the model's
state (``bnorm.tools._state``) are shared with the other tools.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional import Moments
from ._inputs import (
    Forward,
    Progress,
    all_gather_moments,
    check_run_arguments,
    collect_input_moments,
    format_table,
    resolve_progress,
)
from .layers import (
    batch_norm_layers,
    check_module,
    has_running_stats,
    is_frozen_batch_norm,
    layer_statistics,
)

__all__ = ["CalibrationReport", "LayerCalibration", "recalibrate"]


# --------------------------------------------------------------------------------------
# The report


@dataclass
class LayerCalibration:
    """What :func:`recalibrate` did to one layer.

    ``count``: values per channel it saw; ``mean_shift``: max over channels of
    |new mean − old mean| / √(old var + ε) (the shift in old-σ units);
    ``var_ratio_min``/``var_ratio_max``: extremes over channels of new var / old var;
    ``status``: ``"updated"`` or why the old statistics were kept.
    """

    name: str
    kind: str
    status: str
    count: int = 0
    mean_shift: float = math.nan
    var_ratio_min: float = math.nan
    var_ratio_max: float = math.nan


@dataclass
class CalibrationReport:
    """Per-layer summary of a :func:`recalibrate` run (``print`` it, or ``to_dict()``)."""

    layers: list[LayerCalibration] = field(default_factory=list)
    num_batches: int = 0
    num_samples: int = 0
    world_size: int = 1

    @property
    def updated(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.status == "updated"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_batches": self.num_batches,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        head = (
            f"recalibrated {len(self.updated)} of {len(self.layers)} batch-norm layers on "
            f"{self.num_samples} samples ({self.num_batches} batches"
            + (f" on each of {self.world_size} ranks" if self.world_size > 1 else "")
            + ")"
        )
        rows = [("layer", "type", "values/ch", "mean shift (σ)", "var ratio", "status")]
        for layer in self.layers:
            ratio = (
                f"{layer.var_ratio_min:.3g}..{layer.var_ratio_max:.3g}"
                if layer.status == "updated"
                else "-"
            )
            shift = f"{layer.mean_shift:.3g}" if layer.status == "updated" else "-"
            rows.append((layer.name, layer.kind, str(layer.count), shift, ratio, layer.status))
        return "\n".join([head, *format_table(rows)])


# --------------------------------------------------------------------------------------
# recalibrate


def recalibrate(
    module: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    num_samples: int | None = None,
    forward: Forward | None = None,
    progress: bool | str = "auto",
    process_group: Any = None,
) -> CalibrationReport:
    """Replace the running statistics of every batch-norm layer of ``module`` (bnorm's and
    torch's) by the exact population statistics of its inputs over ``data``.

    For each layer, the n values per channel it sees over all the batches (masked
    positions excluded; a layer called several times per batch counts every call) give::

        running_mean = (1/n) Σ x,   running_var = 1/(n − 1) Σ (x − running_mean)²

    — for a moving-average layer (``moving_average=``), which normalizes with the second
    moment about 0, ``running_mean = 0`` and ``running_var = (1/n) Σ x²`` instead
    (:func:`bnorm.tools.layers.layer_statistics`) —
    computed by merging per-batch moments (count, mean, M2) in float64 — equal to the
    statistics of all the values concatenated, for any batch sizes (the law of total
    variance; see the module docstring). Weights are fixed and no gradients are computed.
    During the pass the batch-norm layers are in training mode, so each normalizes with
    its batch's statistics as in training (the distribution the running statistics stand
    for); their running statistics are not touched until the end. Other modules keep
    their mode: call ``model.eval()`` first to switch dropout off.

    Args:
        module: the model (its batch-norm layers may be anywhere inside).
        data: an iterable of batches (a DataLoader, a list...). By default a batch is the
            input tensor itself, a tuple/list whose first element is the input (e.g.
            ``(images, labels)``), or a dict with an ``"input"`` tensor; the input is moved
            to the module's device. Pass ``forward`` for anything else.
        num_batches: stop after this many batches (default: all of ``data``).
        num_samples: stop after this many samples (first dimension of the input; the last
            batch is cut to fit unless ``forward`` is given, then it runs whole).
        forward: ``forward(module, batch)`` runs the model on one batch (its return value
            is ignored), e.g. ``lambda m, b: m(b["ids"], mask=b["mask"])``.
        progress: show a progress line on stderr: True, False, or "auto" (when stderr is
            a terminal, on rank 0).
        process_group: when torch.distributed is initialized, the group whose ranks'
            statistics are merged (default: the whole world). This is a collective call:
            every rank of the group must call it. One ``all_gather`` of every layer's
            float64 (count, mean, M2), merged in rank order, so every rank ends with the
            same global statistics, bit for bit. Ranks may run different numbers of
            batches (bnorm's SyncBatchNorm layers, which synchronize in each forward,
            excepted).

    Returns:
        A :class:`CalibrationReport`: per layer, how many values it saw and how far its
        statistics moved. Layers that saw no values, fewer than two, or non-finite values
        keep their old statistics (with that status); frozen batch norms and layers
        without running statistics are listed as skipped.

    The module is left as it was found — training flags, momentum, buffers other than the
    running statistics (``num_batches_tracked`` included), hooks — also when an exception
    interrupts the pass (then the running statistics are unchanged too).

    Shape:
        whatever ``module`` takes; each layer's running statistics: (C,).
    """
    check_module(module)
    num_batches, num_samples = check_run_arguments(data, num_batches, num_samples, forward)
    show = resolve_progress(progress)
    distributed = dist.is_available() and dist.is_initialized()

    report = CalibrationReport(world_size=dist.get_world_size(process_group) if distributed else 1)
    targets = _targets(module, report)
    # Batch statistics normalize; the running ones are written below, from the merged
    # moments, only once the pass has succeeded.
    gathered, batches, samples = collect_input_moments(
        module,
        targets,
        [layer for _, layer in targets],
        data,
        training=True,
        num_batches=num_batches,
        num_samples=num_samples,
        forward=forward,
        progress=Progress("recalibrate", show, _total_batches(data, num_batches, num_samples)),
    )
    if distributed:
        sizes = {name: int(layer.running_mean.numel()) for name, layer in targets}
        gathered = all_gather_moments(gathered, sizes, process_group)

    report.num_batches, report.num_samples = batches, samples
    with torch.no_grad():
        for name, layer in targets:
            report.layers.append(_update_layer(name, layer, gathered[name]))
    sort_by_model_order(report.layers, batch_norm_layers(module, frozen=True))
    return report


def _targets(module: nn.Module, report: CalibrationReport) -> list[tuple[str, Any]]:
    """The layers to recalibrate (Any: attributes of batch-norm layers); the others are
    entered in ``report`` as skipped. Raises when there is none."""
    targets: list[tuple[str, Any]] = []
    for name, layer in batch_norm_layers(module, frozen=True):
        kind = type(layer).__name__
        if is_frozen_batch_norm(layer):
            report.layers.append(LayerCalibration(name, kind, "skipped: frozen"))
        elif not has_running_stats(layer):
            report.layers.append(LayerCalibration(name, kind, "skipped: no running statistics"))
        else:
            targets.append((name, layer))
    if not targets:
        raise ValueError(
            "expected a module with at least one batch-norm layer that keeps running "
            f"statistics (got none in {type(module).__name__})"
        )
    return targets


def _total_batches(data: Any, num_batches: int | None, num_samples: int | None) -> int | None:
    """How many batches the pass will run, where known (for the progress line)."""
    if num_batches is not None or num_samples is not None:
        return num_batches
    try:
        return len(data)
    except TypeError:
        return None


def sort_by_model_order(entries: list[Any], layers: list[tuple[str, nn.Module]]) -> None:
    """Sort report ``entries`` (each with a ``name``) in the order of ``layers`` (the
    model's batch-norm layers by name)."""
    order = {name: i for i, (name, _) in enumerate(layers)}
    entries.sort(key=lambda entry: order[entry.name])


def statistics_shift(
    layer: Any, mean: Tensor, var: Tensor, old_mean: Tensor, old_var: Tensor
) -> tuple[float, float, float]:
    """How far the statistics (``mean``, ``var``) are from the layer's old ones: the
    largest |mean − old mean| / √(old var + ε) over channels, and the extremes of
    var / old var (the ``mean_shift``, ``var_ratio_min``, ``var_ratio_max`` of the
    reports)."""
    eps = float(getattr(layer, "eps", 0.0))
    shift = ((mean - old_mean).abs() / (old_var + eps).sqrt()).max()
    ratio = var / old_var
    return float(shift), float(ratio.min()), float(ratio.max())


def _update_layer(name: str, layer: Any, mom: Moments | None) -> LayerCalibration:
    kind = type(layer).__name__
    count = 0 if mom is None else int(mom.count[0])
    if mom is None or count == 0:
        return LayerCalibration(name, kind, "kept: not reached by the data")
    if count < 2:
        return LayerCalibration(name, kind, f"kept: only {count} value per channel", count)
    mean, var = layer_statistics(layer, mom)
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        return LayerCalibration(name, kind, "kept: non-finite inputs", count)
    running_mean: Tensor = layer.running_mean  # type: ignore[assignment]
    running_var: Tensor = layer.running_var  # type: ignore[assignment]
    old_mean = running_mean.to(device=mean.device, dtype=torch.float64)
    old_var = running_var.to(device=mean.device, dtype=torch.float64)
    shift, ratio_min, ratio_max = statistics_shift(layer, mean, var, old_mean, old_var)
    running_mean.copy_(mean.to(running_mean.device, running_mean.dtype))
    running_var.copy_(var.to(running_var.device, running_var.dtype))
    return LayerCalibration(
        name,
        kind,
        "updated",
        count,
        mean_shift=shift,
        var_ratio_min=ratio_min,
        var_ratio_max=ratio_max,
    )
