"""Swap the batch-norm layers of a model for another family, keeping their state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    SyncBatchNorm,
)
from .layers import batch_norm_layers, is_batch_norm, is_frozen_batch_norm

__all__ = ["ConversionReport", "convert"]

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
        for name in ("skip_nonfinite", "renorm", "virtual_batch_size", "moving_average"):
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
    ``moving_average=True``,
    ``process_group=...``, ``memory_efficient=True``).

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
    ``moving_average``) are
    dropped and listed in the report's ``dropped``, since in eval mode the running
    statistics normalize either way. Every such layer must be in eval mode, and every
    batch-norm layer must have a torch equivalent (``axis=1``, a rank-specific class, no
    activation), else a ``ValueError`` names them and nothing is converted.

    Children are replaced in place (like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``);
    returns ``(module, report)``, where ``module`` is a new object only when ``module``
    itself is a converted layer.
    """
    family, classes = _family(target)
    if family.startswith("torch") and options:
        raise ValueError(
            f"expected no options for torch's layers (got {sorted(options)})"
        )
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
