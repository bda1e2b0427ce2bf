"""Gradient accumulation that keeps the running statistics honest.

With k micro-batches per optimizer step, a batch-norm layer updates its running
statistics k times per step, each time from one micro-batch: the momentum then means
``1 − (1 − m)^k`` per step, and each update sees 1/k of the batch. :func:`accumulate`
wraps the k forwards of one step; inside it the running statistics stay at their
step-start values, and on exit each layer is updated **once**, from the exact moments
of everything it saw in the block — as if it had seen the step's micro-batches
concatenated in one forward.

Every call of a layer in the block contributes its per-channel moments (count m_b,
mean μ_b, M2_b), masked positions excluded; they are merged exactly (Chan et al., the law
of total variance, :func:`bnorm.functional.merge_moments`)::

    n = Σ_b m_b,   μ = (1/n) Σ_b m_b μ_b,   M2 = Σ_b (M2_b + m_b (μ_b − μ)²)

and the layer takes one update with torch's convention (α = momentum, or 1/t for
``momentum=None``, t counting this step)::

    running_mean ← (1 − α) · running_mean + α · μ
    running_var  ← (1 − α) · running_var  + α · M2/(n − 1)

For bnorm's :class:`~bnorm.SyncBatchNorm` (and ``BatchNormAct(sync=True)``) the moments
are merged across the ranks of the layer's process group too (one ``all_gather`` per
step and group), so every rank gets the update of every rank's every micro-batch
concatenated; other layers stay local, as under ``DistributedDataParallel``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import world_size
from ..functional import Moments, moments, pool_moments, update_running_stats
from ..modules import SyncBatchNorm
from ._inputs import InputMoments, all_gather_moments, call_input, mask_position
from ._state import COUNTERS, SavedState
from .layers import batch_norm_layers, channel_axis, check_module, has_running_stats

__all__ = ["Accumulation", "accumulate"]

# Layers currently inside an accumulate block (to refuse nested or overlapping blocks).
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _is_sync(layer: nn.Module) -> bool:
    """Does the layer merge its batch statistics across ranks in training?"""
    return (
        isinstance(layer, (SyncBatchNorm, nn.SyncBatchNorm))
        or getattr(layer, "sync", False) is True
    )


@dataclass
class _Target:
    """One managed layer, its step-start momentum and buffers (saved by the block's
    :class:`~bnorm.tools._state.SavedState`), and how often it ran in training mode."""

    name: str
    layer: Any  # a batch-norm layer (bnorm's or torch's)
    momentum: float | None
    buffers: dict[str, Tensor]
    calls: int = 0


class _TrainingMoments(InputMoments):
    """:class:`~bnorm.tools._inputs.InputMoments` for a block: records the moments of the
    calls made in training mode only, counts them, and before each such call puts a Batch
    Renorm layer's ``num_batches_tracked`` back to its step-start value (so its schedule
    sees the step start). Each call's (count, mean, M2) is kept as computed and the calls are
    merged once, at the end (:meth:`merged`): a block's calls cost one statistics pass
    each, not a merge each."""

    def __init__(self, targets: list[_Target]) -> None:
        super().__init__([(t.name, t.layer) for t in targets])
        self.targets = {t.name: t for t in targets}
        # Per layer and call: (count, mean, biased variance); count an int, or a (C,)
        # tensor for masked inputs.
        self.calls: dict[str, list[tuple[int | Tensor, Tensor, Tensor]]] = {
            t.name: [] for t in targets
        }

    def _hook(self, name: str, layer: nn.Module) -> Callable[..., None]:
        axis = channel_axis(layer)
        mask_index = mask_position(layer)
        target = self.targets[name]
        seen = self.calls[name]
        # Only Batch Renorm reads a counter in its forward (the schedule's step); the
        # others are put back once, on exit.
        counters = [
            (key, value)
            for key, value in target.buffers.items()
            if key == "num_batches_tracked" and getattr(layer, "renorm", None) is not None
        ]

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not module.training:
                return
            with torch.no_grad():
                for key, value in counters:
                    buffer = module._buffers.get(key)
                    if buffer is not None:
                        buffer.copy_(value)
            target.calls += 1
            call = call_input(args, kwargs, mask_index)
            if call is None:
                return  # nothing to count
            x, mask = call
            if mask is not None or not x.is_floating_point() or x.dim() < 2:
                mom = moments(x, axis, mask)
                seen.append((mom.count, mom.mean, mom.m2 / mom.count.clamp_min(1)))
                return
            # ATen's statistics pass (the one the layer's own kernel makes): cheaper than
            # var_mean on small inputs; (mean, biased variance) in float32 or wider.
            x1 = x.movedim(axis, 1) if axis % x.dim() != 1 else x
            mean, var = torch.batch_norm_update_stats(x1, None, None, 0.0)
            seen.append((x1.numel() // x1.shape[1], mean, var))

        return hook

    def merged(self) -> dict[str, Moments | None]:
        """Per layer, the moments of all its recorded calls merged in float64 (law of
        total variance, :func:`bnorm.functional.pool_moments`); None if none."""
        out: dict[str, Moments | None] = {}
        for name, seen in self.calls.items():
            if not seen:
                out[name] = None
                continue
            means = torch.stack([mean for _, mean, _ in seen]).to(torch.float64)
            variances = torch.stack([var for _, _, var in seen]).to(torch.float64)
            sizes = [count for count, _, _ in seen]
            if all(isinstance(c, int) for c in sizes):
                counts = torch.tensor(sizes, dtype=torch.float64, device=means.device)
                counts = counts.unsqueeze(1).expand_as(means)
            else:
                counts = torch.stack(
                    [
                        c.to(means) if isinstance(c, Tensor) else torch.full_like(means[0], c)
                        for c in sizes
                    ]
                )
            out[name] = pool_moments(Moments(counts, means, variances * counts))
        return out


class Accumulation:
    """The context manager returned by :func:`accumulate` (see there).

    Attributes:
        layers: the qualified names of the layers it manages (training mode, running
            statistics), in registration order; chosen again on each entry, so one
            object may serve every step (``with block:`` once per step).
        counts: after a successful exit, the values per channel each managed layer's
            update merged (over every rank for sync layers); 0 for a layer that was
            called only on empty inputs; layers not called in the block are absent.
    """

    def __init__(self, module: nn.Module) -> None:
        check_module(module)
        if not batch_norm_layers(module):
            raise ValueError(
                "expected a module with at least one batch-norm layer "
                f"(got none in {type(module).__name__})"
            )
        self.module = module
        self.layers = [name for name, _ in self._select()]
        self.counts: dict[str, int] = {}
        self._targets: list[_Target] = []
        self._state: SavedState | None = None
        self._collector: _TrainingMoments | None = None

    def _select(self) -> list[tuple[str, Any]]:
        """The layers to manage now (training mode, running statistics); a ValueError
        for a momentum that is neither None nor in [0, 1]."""
        chosen: list[tuple[str, Any]] = []  # Any: attributes of batch-norm layers
        for name, layer in batch_norm_layers(self.module):
            if not (
                layer.training
                and has_running_stats(layer)
                and getattr(layer, "track_running_stats", True)
            ):
                continue  # eval mode or no running statistics: untouched
            if getattr(layer, "moving_average", None) is not None:
                raise ValueError(
                    f"expected no moving_average layer in an accumulate block (got layer "
                    f"{name or '(module)'} with moving_average={layer.moving_average}): its "
                    "running statistics follow its moving window, not the batches' moments"
                )
            momentum: Any = layer.momentum
            if momentum is not None and (
                isinstance(momentum, bool)
                or not isinstance(momentum, (int, float))
                or not 0.0 <= momentum <= 1.0
            ):
                raise ValueError(
                    f"expected layer {name or '(module)'} to have momentum in [0, 1] or None "
                    f"(got {momentum!r})"
                )
            chosen.append((name, layer))
        return chosen

    def __enter__(self) -> Accumulation:
        if self._collector is not None:
            raise RuntimeError("bnorm.accumulate: this block is already active (nested use)")
        chosen = self._select()  # the modes of now: the block may be reused step after step
        for name, layer in chosen:
            if layer in _ACTIVE:
                raise RuntimeError(
                    f"bnorm.accumulate: layer {name or '(module)'} is already inside an "
                    "accumulate block; nested or overlapping blocks are not supported"
                )
        self.layers = [name for name, _ in chosen]
        state = SavedState(layers=[layer for _, layer in chosen])
        self._state = state
        self._targets = [
            _Target(name, layer, layer.momentum, state.buffers(layer)) for name, layer in chosen
        ]
        self.counts = {}
        collector = _TrainingMoments(self._targets)
        collector.__enter__()
        self._collector = collector
        for target in self._targets:
            _ACTIVE.add(target.layer)
            # With α = 0 a micro-batch's update leaves the running statistics as they are.
            target.layer.momentum = 0.0
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        collector, state = self._collector, self._state
        assert collector is not None and state is not None  # (set by __enter__)
        collector.__exit__(exc_type, exc, tb)
        self._collector = self._state = None
        try:
            state.restore_momenta()
            for target in self._targets:
                _ACTIVE.discard(target.layer)
            state.restore_buffers(COUNTERS)
            if exc_type is not None:
                state.restore_buffers()
                return
            with torch.no_grad():
                merged = self._merged(collector.merged())
                for target in self._targets:
                    if target.calls:
                        self._update(target, merged[target.name])
        except BaseException:
            state.restore_buffers()
            raise
        finally:
            self._targets = []

    # ----------------------------------------------------------------------------------

    def _merged(self, local: dict[str, Moments | None]) -> dict[str, Moments | None]:
        """Each layer's moments of the step: sync layers' merged over their group's
        ranks (one all_gather per process group), the others' local."""
        merged = dict(local)
        groups: dict[int, tuple[Any, list[_Target]]] = {}
        for target in self._targets:
            if _is_sync(target.layer):
                group = getattr(target.layer, "process_group", None)
                if world_size(group) > 1:
                    groups.setdefault(id(group), (group, []))[1].append(target)
        for group, members in groups.values():
            sizes = {t.name: int(t.layer.running_mean.numel()) for t in members}
            merged.update(
                all_gather_moments({t.name: local[t.name] for t in members}, sizes, group)
            )
        return merged

    def _update(self, target: _Target, mom: Moments | None) -> None:
        layer = target.layer
        tracked = layer._buffers.get("num_batches_tracked")
        count = 0 if mom is None else int(mom.count.max())
        self.counts[target.name] = count
        if mom is None or count == 0:
            # Only empty inputs: nothing learned; counted, as torch counts an empty batch.
            if tracked is not None:
                tracked.add_(1)
            return
        if target.momentum is None and tracked is None:
            return  # a cumulative average needs the count (the layer would have refused)
        var = mom.m2 / mom.count.clamp_min(1)
        update_running_stats(
            layer.running_mean,
            layer.running_var,
            mom.mean,
            var,
            mom.count,
            target.momentum,
            tracked,
            layer._buffers.get("num_batches_skipped"),
            skip_nonfinite=bool(getattr(layer, "skip_nonfinite", False)),
        )


def accumulate(module: nn.Module) -> Accumulation:
    """Update the running statistics once per optimizer step under gradient accumulation.

    Wrap the k micro-batch forwards (and backwards) of one optimizer step::

        for step in range(steps):
            with bnorm.accumulate(model):
                for x, y in micro_batches:
                    loss = criterion(model(x), y) / k
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    For every batch-norm layer of ``module`` in training mode that keeps running
    statistics — bnorm's (any variant: ghost batches, Batch Renorm, masks, BatchNormAct,
    SyncBatchNorm) and torch's ``nn.BatchNorm*`` — the running statistics are not updated
    per micro-batch. On exit each such layer is updated **once**, from the exact moments of
    all the values it saw in the block (masked positions excluded; every call counts)::

        n = Σ_b m_b,  μ = (1/n) Σ_b m_b μ_b,  M2 = Σ_b (M2_b + m_b (μ_b − μ)²)
        running_mean ← (1 − α) · running_mean + α · μ
        running_var  ← (1 − α) · running_var  + α · M2/(n − 1)

    with α the layer's momentum (1/t for ``momentum=None``, t counting this step), i.e.
    the update of one forward over the step's micro-batches concatenated;
    ``num_batches_tracked`` grows by one per block. Normalization stays per micro-batch:
    each forward still normalizes with its own micro-batch's statistics (its ghost
    batches', its ranks' for sync layers), exactly as without the block — only the
    running statistics differ. Every micro-batch sees the step-start running statistics
    and ``num_batches_tracked`` (Batch Renorm's r, d and schedule).

    Across ranks: bnorm's ``SyncBatchNorm`` and ``BatchNormAct(sync=True)`` merge the
    moments of every rank of their process group at exit (one ``all_gather`` per group
    and step; every rank must leave the block), so the update equals one update with every
    rank's every micro-batch concatenated. Other layers are updated from the local
    micro-batches, as under ``DistributedDataParallel``.

    A layer with ``skip_nonfinite=True`` (bnorm's default) whose merged statistics contain
    NaN/inf keeps its running statistics and counts the step in ``num_batches_skipped``;
    torch's layers take the non-finite update, as torch would. If an exception leaves the
    block, every managed layer's buffers are put back to their step-start values and the
    exception propagates (on every rank that raised; peers then fail in their next
    collective). Layers in eval mode (when the block is entered) or without running
    statistics are untouched.

    Run each micro-batch's backward inside the block: the exit update writes the running
    statistics in place, so a graph built inside and differentiated after it fails
    autograd's in-place check. While the block is active the managed layers' ``momentum``
    attribute reads 0.0 (its value is restored on exit).

    Args:
        module: the model; its batch-norm layers may be anywhere inside.

    Returns:
        An :class:`Accumulation` context manager: one ``with`` at a time, as often as
        needed (the layers are chosen by their mode on each entry).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: ``module`` has no batch-norm layer, or a layer's momentum is not in
            [0, 1] or None.
        RuntimeError: on entering, if a layer is already inside another accumulate block.
    """
    return Accumulation(module)
