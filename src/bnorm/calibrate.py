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

The helpers here (finding the layers, feeding the batches, collecting input moments with
hooks) are shared with :mod:`bnorm.diagnose`.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import modules as _modules
from .functional import Moments, merge_moments, moments

__all__ = ["CalibrationReport", "LayerCalibration", "batch_norm_layers", "recalibrate"]

Forward = Callable[[nn.Module, Any], Any]


# --------------------------------------------------------------------------------------
# Finding the layers


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """bnorm's :class:`~bnorm.modules.FrozenBatchNorm` (any rank), or a look-alike such as
    torchvision's ``FrozenBatchNorm2d`` (fixed ``running_mean``/``running_var``/``weight``/
    ``bias`` tensors and an ``eps``)."""
    frozen_cls = getattr(_modules, "FrozenBatchNorm", None)
    if frozen_cls is not None and isinstance(module, frozen_cls):
        return True
    return type(module).__name__.startswith("FrozenBatchNorm") and all(
        isinstance(getattr(module, a, None), Tensor)
        for a in ("running_mean", "running_var", "weight", "bias")
    )


def is_batch_norm(module: nn.Module) -> bool:
    """A trainable batch-norm layer: a ``torch.nn.modules.batchnorm._BatchNorm`` — torch's
    BatchNorm1d/2d/3d and SyncBatchNorm, and every bnorm layer but the frozen ones."""
    return isinstance(module, _BatchNorm)


def batch_norm_layers(module: nn.Module, *, frozen: bool = False) -> list[tuple[str, nn.Module]]:
    """The batch-norm layers of ``module`` as (qualified name, layer), in registration
    order, each once; with ``frozen=True`` frozen batch norms are included too."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if is_batch_norm(m) or (frozen and is_frozen_batch_norm(m))
    ]


def channel_axis(layer: nn.Module) -> int:
    """The channel axis of a batch-norm layer's input (bnorm's ``axis``; 1 for torch's)."""
    return int(getattr(layer, "axis", 1))


def has_running_stats(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "running_mean", None), Tensor) and isinstance(
        getattr(layer, "running_var", None), Tensor
    )


# --------------------------------------------------------------------------------------
# Feeding the data


def check_count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected {name} to be an int or None (got {type(value).__name__})")
    if value < 1:
        raise ValueError(f"expected {name} >= 1 or None (got {value})")
    return value


def check_data(data: Any) -> None:
    if isinstance(data, Tensor):
        # Iterating a tensor gives its rows: almost certainly a mistake.
        raise TypeError(
            "expected data to be an iterable of batches, e.g. a DataLoader or a list of "
            f"tensors (got a single Tensor of shape {tuple(data.shape)}; wrap it: [tensor])"
        )
    try:
        iter(data)
    except TypeError:
        raise TypeError(
            f"expected data to be an iterable of batches (got {type(data).__name__})"
        ) from None


def batch_input(batch: Any) -> Tensor:
    """The model input of a batch, by the documented default: the batch itself if it is a
    tensor, its first element if it is a tuple/list (``(inputs, targets)``), its
    ``"input"`` entry if it is a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping) and isinstance(batch.get("input"), Tensor):
        return batch["input"]
    kind = type(batch).__name__
    keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else ""
    raise TypeError(
        "expected each batch to be a Tensor, a tuple/list whose first element is the input "
        f"Tensor, or a dict with an 'input' Tensor (got a {kind}{keys}); pass "
        "forward=lambda model, batch: model(...) to say how to run a batch"
    )


def first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def module_device(module: nn.Module) -> torch.device | None:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return None


class Progress:
    """A one-line progress display on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, enabled: bool, total: int | None) -> None:
        self.label = label
        self.enabled = enabled
        self.total = total
        self.start = time.perf_counter()
        self.last = -math.inf

    def update(self, batches: int, samples: int, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        of = f"/{self.total}" if self.total is not None else ""
        line = f"\r{self.label}: batch {batches}{of}, {samples} samples, {now - self.start:.1f} s"
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()


def resolve_progress(progress: Any) -> bool:
    if progress == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        distributed = dist.is_available() and dist.is_initialized()
        return bool(isatty and isatty()) and (not distributed or dist.get_rank() == 0)
    if isinstance(progress, bool):
        return progress
    raise TypeError(f"expected progress to be True, False or 'auto' (got {progress!r})")


def run_batches(
    module: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None,
    num_samples: int | None,
    forward: Forward | None,
    progress: Progress,
) -> tuple[int, int]:
    """Run ``module`` on the batches of ``data`` (without gradients) until the data ends,
    ``num_batches`` batches ran, or ``num_samples`` samples ran. Returns (batches,
    samples). Without ``forward``, the last batch is cut so that exactly ``num_samples``
    samples run; with ``forward`` the batch that reaches ``num_samples`` runs whole."""
    device = module_device(module)
    batches = samples = 0
    iterator: Iterator[Any] = iter(data)
    with torch.no_grad():
        while num_batches is None or batches < num_batches:
            if num_samples is not None and samples >= num_samples:
                break
            try:
                batch = next(iterator)
            except StopIteration:
                break
            if forward is None:
                x = batch_input(batch)
                if num_samples is not None and x.dim() > 0:
                    x = x[: num_samples - samples]
                if device is not None and x.device != device:
                    x = x.to(device)
                module(x)
                size = int(x.shape[0]) if x.dim() > 0 else 1
            else:
                found = first_tensor(batch)
                if found is None and num_samples is not None:
                    raise TypeError(
                        "expected each batch to hold a Tensor whose first dimension counts "
                        f"samples, to honour num_samples (got a {type(batch).__name__} "
                        "without one); use num_batches instead"
                    )
                forward(module, batch)
                size = int(found.shape[0]) if found is not None and found.dim() > 0 else 1
            batches += 1
            samples += size
            progress.update(batches, samples)
    progress.update(batches, samples, final=True)
    return batches, samples


# --------------------------------------------------------------------------------------
# Collecting the moments of each layer's input


def _mask_position(layer: nn.Module) -> int | None:
    """Position of ``mask`` among the positional arguments of ``layer.forward``."""
    try:
        names = list(inspect.signature(layer.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("mask") if "mask" in names else None


class InputMoments:
    """Forward pre-hooks that accumulate the per-channel moments (count, mean, M2) of the
    input each layer sees, merged exactly over calls in float64. bnorm layers' ``mask``
    (positional or keyword) is respected. Use as a context manager: hooks are removed on
    exit, whatever happens."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.moments: dict[str, Moments | None] = {name: None for name, _ in layers}
        self.handles: list[Any] = []

    def __enter__(self) -> InputMoments:
        for name, layer in self.layers:
            self.handles.append(
                layer.register_forward_pre_hook(self._hook(name, layer), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, name: str, layer: nn.Module) -> Callable[..., None]:
        axis = channel_axis(layer)
        mask_index = _mask_position(layer)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor) or x.numel() == 0:
                return  # the layer itself will complain about a bad input
            mask = kwargs.get("mask")
            if mask is None and mask_index is not None and len(args) > mask_index:
                mask = args[mask_index]
            if not isinstance(mask, Tensor):
                mask = None
            batch = moments(x.detach(), axis, None if mask is None else mask.detach())
            batch = Moments(*(t.to(torch.float64) for t in batch))
            # An all-masked batch has count 0 (and mean 0): merge_moments ignores it.
            seen = self.moments[name]
            self.moments[name] = batch if seen is None else merge_moments(seen, batch)

        return hook


def all_gather_moments(
    per_layer: dict[str, Moments | None],
    sizes: dict[str, int],
    process_group: Any = None,
) -> dict[str, Moments | None]:
    """Merge every rank's moments: one ``all_gather`` of a flat float64 tensor holding
    (count, mean, M2) of every layer, then :func:`merge_moments` over ranks in rank order,
    so that every rank computes bit-identical global moments."""
    world = dist.get_world_size(process_group)
    backend = dist.get_backend(process_group)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    parts = []
    for name, size in sizes.items():
        mom = per_layer[name]
        if mom is None:
            parts.append(torch.zeros(3 * size, dtype=torch.float64, device=device))
        else:
            parts.append(torch.cat([t.to(device, torch.float64) for t in mom]))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=process_group)
    merged: dict[str, Moments | None] = {}
    offset = 0
    for name, size in sizes.items():
        total: Moments | None = None
        for rank_flat in gathered:
            chunk = rank_flat[offset : offset + 3 * size].view(3, size)
            mom = Moments(chunk[0], chunk[1], chunk[2])
            if float(mom.count[0]) == 0:
                continue
            total = mom if total is None else merge_moments(total, mom)
        merged[name] = total
        offset += 3 * size
    return merged


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
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


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
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected module to be a torch.nn.Module (got {type(module).__name__})")
    check_data(data)
    num_batches = check_count("num_batches", num_batches)
    num_samples = check_count("num_samples", num_samples)
    if forward is not None and not callable(forward):
        raise TypeError(f"expected forward to be callable or None (got {type(forward).__name__})")
    show = resolve_progress(progress)
    distributed = dist.is_available() and dist.is_initialized()

    report = CalibrationReport(world_size=dist.get_world_size(process_group) if distributed else 1)
    targets: list[tuple[str, Any]] = []  # Any: attributes of batch-norm layers
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

    training_flags = [(m, m.training) for m in module.modules()]
    momenta = [(layer, layer.momentum) for _, layer in targets]
    saved_buffers = [
        (layer, {k: v.detach().clone() for k, v in layer._buffers.items() if v is not None})
        for _, layer in targets
    ]
    total = num_batches
    if total is None and num_samples is None:
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
    try:
        for _, layer in targets:
            layer.training = True
            layer.momentum = 0.0  # batch statistics normalize; running ones stay put
        with InputMoments(targets) as collector:
            batches, samples = run_batches(
                module,
                data,
                num_batches=num_batches,
                num_samples=num_samples,
                forward=forward,
                progress=Progress("recalibrate", show, total),
            )
        gathered = collector.moments
        if distributed:
            sizes = {name: int(layer.running_mean.numel()) for name, layer in targets}
            gathered = all_gather_moments(gathered, sizes, process_group)
    finally:
        for m, flag in training_flags:
            m.training = flag
        for layer, momentum in momenta:
            layer.momentum = momentum
        for layer, buffers in saved_buffers:
            for key, value in buffers.items():
                layer._buffers[key].copy_(value)  # type: ignore[union-attr]

    report.num_batches, report.num_samples = batches, samples
    with torch.no_grad():
        for name, layer in targets:
            report.layers.append(_update_layer(name, layer, gathered[name]))
    order = {name: i for i, (name, _) in enumerate(batch_norm_layers(module, frozen=True))}
    report.layers.sort(key=lambda entry: order[entry.name])
    return report


def _update_layer(name: str, layer: Any, mom: Moments | None) -> LayerCalibration:
    kind = type(layer).__name__
    count = 0 if mom is None else int(mom.count[0])
    if mom is None or count == 0:
        return LayerCalibration(name, kind, "kept: not reached by the data")
    if count < 2:
        return LayerCalibration(name, kind, f"kept: only {count} value per channel", count)
    mean = mom.mean
    var = mom.m2 / (mom.count - 1)
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        return LayerCalibration(name, kind, "kept: non-finite inputs", count)
    running_mean: Tensor = layer.running_mean  # type: ignore[assignment]
    running_var: Tensor = layer.running_var  # type: ignore[assignment]
    old_mean = running_mean.to(device=mean.device, dtype=torch.float64)
    old_var = running_var.to(device=mean.device, dtype=torch.float64)
    eps = float(getattr(layer, "eps", 0.0))
    shift = ((mean - old_mean).abs() / (old_var + eps).sqrt()).max()
    ratio = var / old_var
    running_mean.copy_(mean.to(running_mean.device, running_mean.dtype))
    running_var.copy_(var.to(running_var.device, running_var.dtype))
    return LayerCalibration(
        name,
        kind,
        "updated",
        count,
        mean_shift=float(shift),
        var_ratio_min=float(ratio.min()),
        var_ratio_max=float(ratio.max()),
    )
