"""The training loop and evaluation: one epoch of SGD, the test-set evaluation, and the
batches they consume.

Determinism: the data order and augmentation of epoch e come from
``Generator(seed · 1,000,003 + e)`` (:func:`epoch_batches`), so the arms with and
without normalization see the same batches, and a run resumed after epoch e continues
exactly as if it had not stopped. Under ``torchrun`` every rank trains on its share of
each batch (:func:`shard_batches`) inside DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

import bnorm
from bnorm.tools import batch_norm_layers

from .data import Dataset
from .models import raw_weight
from .spec import TrainSpec

__all__ = [
    "EpochResult",
    "Evaluation",
    "epoch_batches",
    "evaluate",
    "has_batch_norm",
    "layer_grad_norms",
    "process_rank",
    "shard_batches",
    "train_one_epoch",
]


# ------------------------------------------------------------------------------ batches


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """Random crop of the 4-pixel zero-padded image (same size) and horizontal flip."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = dy.view(n, 1, 1) + torch.arange(h).view(1, h, 1)
    cols = dx.view(n, 1, 1) + torch.arange(w).view(1, 1, w)
    cols = torch.where(
        flip.view(n, 1, 1), dx.view(n, 1, 1) + (w - 1 - torch.arange(w)).view(1, 1, w), cols
    )
    out = padded.permute(0, 2, 3, 1)[torch.arange(n).view(n, 1, 1), rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


def epoch_batches(
    data: Dataset, spec: TrainSpec, seed: int, epoch: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[Tensor, Tensor]]:
    """The (inputs, labels) batches of one epoch: a permutation of the training set drawn
    from ``Generator(seed · 1,000,003 + epoch)``, cut into full batches (the remainder is
    dropped so that every batch has ``batch_size`` samples)."""
    gen = _epoch_generator(seed, epoch)
    n = data.train_labels.shape[0]
    order = torch.randperm(n, generator=gen)
    for start in range(0, n - spec.batch_size + 1, spec.batch_size):
        idx = order[start : start + spec.batch_size]
        images = data.train_images[idx]
        if spec.augment:
            images = _augment(images, gen)
        x = data.inputs(images, spec.standardize)
        yield x.to(device), data.train_labels[idx].to(device)


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialized
    (e.g. under ``torchrun``), in which case every rank trains on its share of each batch
    inside DistributedDataParallel."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def shard_batches(
    batches: Iterable[tuple[Tensor, Tensor]], rank: int, world: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s part of each global batch: consecutive slices of (nearly) equal size."""
    for x, y in batches:
        yield x.tensor_split(world)[rank], y.tensor_split(world)[rank]


def _global_mean(loss: Tensor, count: int) -> float:
    """The mean loss over the global batch (one all_reduce), so that every rank sees the
    same value and takes the same decisions (divergence, logging)."""
    both = torch.stack(
        [loss.detach().double() * count, torch.tensor(float(count), dtype=torch.float64)]
    )
    dist.all_reduce(both)
    return float(both[0] / both[1])


# ------------------------------------------------------------------- train / evaluate


def _start_step(
    optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float] | None, step: int
) -> None:
    """Set the learning rate of step ``step`` (if ``lr_at`` is given) and clear the gradients."""
    if lr_at is not None:
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _loss_value(loss: Tensor, count: int, distributed: bool) -> float:
    """The batch's loss as a number: the global batch's mean when ``distributed``."""
    return _global_mean(loss, count) if distributed else loss.detach().item()


class EpochResult(NamedTuple):
    step: int  # steps done after this epoch (counting from the start of training)
    mean_loss: float  # mean training loss over the epoch's steps (NaN if none)
    diverged: bool  # a step's loss was not finite; training stopped there


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    step: int = 0,
    max_steps: int | None = None,
    lr_at: Callable[[int], float] | None = None,
    after_step: Callable[[int, float], None] | None = None,
    distributed: bool = False,
    micro_batches: int = 1,
    accumulate_stats: bool = False,
) -> EpochResult:
    """One pass of SGD over ``batches`` with the cross-entropy loss.

    Each step sets the learning rate to ``lr_at(step)`` (if given), minimizes
    ``L = −(1/B) Σ_b log softmax(model(x))_{b, y_b}``, then calls ``after_step(step + 1,
    loss)``. Stops early at ``max_steps`` or at the first non-finite loss. With
    ``distributed`` (``model`` wrapped in DistributedDataParallel, ``batches`` this
    rank's shards), the loss reported and checked is the global batch's mean.

    With ``micro_batches=k`` > 1 (gradient accumulation) a step takes k consecutive
    batches, each forward and backward on its own (so each batch-norm layer normalizes
    each micro-batch with its own statistics), with the loss ``(1/k) Σ_j L_j`` — the mean
    over the k·B samples; an incomplete last group is dropped. ``accumulate_stats`` wraps
    the k micro-batches of each step in :func:`bnorm.accumulate` (one running-statistics
    update per step from their merged moments, instead of one per micro-batch).

    Shape:
        batches: (B, *) inputs with (B,) int64 labels.
    """
    model.train()
    if micro_batches > 1:
        return _train_accumulating(
            model, batches, optimizer, step=step, max_steps=max_steps, lr_at=lr_at,
            after_step=after_step, distributed=distributed, micro_batches=micro_batches,
            accumulate_stats=accumulate_stats,
        )  # fmt: skip
    total = 0.0
    count = 0
    for x, y in batches:
        if max_steps is not None and step >= max_steps:
            break
        _start_step(optimizer, lr_at, step)
        loss = nn.functional.cross_entropy(model(x), y)
        value = _loss_value(loss, int(y.shape[0]), distributed)
        if not math.isfinite(value):
            return EpochResult(step, total / count if count else math.nan, True)
        loss.backward()
        optimizer.step()
        step += 1
        total += value
        count += 1
        if after_step is not None:
            after_step(step, value)
            model.train()  # after_step may have evaluated (eval mode), also inside a DDP wrapper
    return EpochResult(step, total / count if count else math.nan, False)


def _train_accumulating(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    max_steps: int | None,
    lr_at: Callable[[int], float] | None,
    after_step: Callable[[int, float], None] | None,
    distributed: bool,
    micro_batches: int,
    accumulate_stats: bool,
) -> EpochResult:
    """:func:`train_one_epoch` with ``micro_batches`` > 1 (see there)."""
    use_block = accumulate_stats and has_batch_norm(model)
    total = 0.0
    count = 0
    iterator = iter(batches)
    while max_steps is None or step < max_steps:
        group = list(itertools.islice(iterator, micro_batches))
        if len(group) < micro_batches:
            break
        _start_step(optimizer, lr_at, step)
        values = []
        with bnorm.accumulate(model) if use_block else contextlib.nullcontext():
            for x, y in group:
                loss = nn.functional.cross_entropy(model(x), y)
                value = _loss_value(loss, int(y.shape[0]), distributed)
                if not math.isfinite(value):
                    break
                (loss / micro_batches).backward()
                values.append(value)
        if len(values) < micro_batches:
            return EpochResult(step, total / count if count else math.nan, True)
        optimizer.step()
        step += 1
        value = sum(values) / micro_batches
        total += value
        count += 1
        if after_step is not None:
            after_step(step, value)
            model.train()
    return EpochResult(step, total / count if count else math.nan, False)


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a trainable batch-norm layer (:func:`bnorm.tools.is_batch_norm`)."""
    return bool(batch_norm_layers(model))


class Evaluation(NamedTuple):
    loss: float  # mean cross-entropy over the set (NaN if the outputs are not finite)
    accuracy: float  # fraction of correct argmax predictions
    predictions: Tensor  # (N,) int64 predicted classes
    probe: Tensor | None  # values of the probe unit over the set (None without probe_unit)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    data: Dataset,
    *,
    standardize: bool = False,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
    probe_unit: int | None = None,
) -> Evaluation:
    """Loss and accuracy of ``model`` in evaluation mode on uint8 ``images`` (converted
    as in training), and, with ``probe_unit``, every value that unit of ``model.probe``
    takes over the set (all positions of that channel for a convolutional probe).
    The model's train/eval mode is restored afterwards.

    Shape:
        images: (N, C, H, W) uint8; labels: (N,); predictions: (N,).
    """
    was_training = model.training
    model.eval()
    captured: list[Tensor] = []
    handle = None
    if probe_unit is not None:
        probe = getattr(model, "probe", None)
        if probe is None:
            raise TypeError(f"expected a model with a probe module (got {type(model).__name__})")

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            captured.append(output[:, probe_unit].reshape(-1).float().cpu())

        handle = probe.register_forward_hook(hook)
    loss_sum = 0.0
    correct = 0
    predictions: list[Tensor] = []
    try:
        for start in range(0, labels.shape[0], batch_size):
            x = data.inputs(images[start : start + batch_size], standardize).to(device)
            y = labels[start : start + batch_size].to(device)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            pred = logits.argmax(dim=1)
            correct += int((pred == y).sum())
            predictions.append(pred.cpu())
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    n = max(labels.shape[0], 1)
    return Evaluation(
        loss_sum / n,
        correct / n,
        torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long),
        torch.cat(captured) if captured else None,
    )



def layer_grad_norms(model: nn.Module, x: Tensor, y: Tensor) -> list[float]:
    """‖∂L/∂W_l‖ (Frobenius) for each layer of ``model.weight_layers``, for the mean
    cross-entropy of one batch in training mode (of a parametrized weight, e.g. a
    centralized one, its raw tensor's: what SGD updates). Computed on a copy: the model's
    parameters, gradients and running statistics are left untouched."""
    clone = copy.deepcopy(model)
    clone.train()
    clone.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(clone(x), y).backward()
    norms = []
    layers: list[nn.Module] = getattr(clone, "weight_layers")  # noqa: B009
    for layer in layers:
        grad = raw_weight(layer).grad
        norms.append(float(torch.linalg.vector_norm(grad)) if grad is not None else 0.0)
    return norms

