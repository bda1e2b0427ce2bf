"""Training and evaluation for the study: seeded, checkpointed, resumable.

One *run* trains one network (a model, a normalization, a seed, a learning rate) with
plain mini-batch SGD (optionally momentum, weight decay and step decay) and records
test accuracy/loss every ``eval_every`` steps. Determinism: the initial weights come
from ``Generator(seed)`` (:func:`bnorm.study.models.initialize`), and the data order
and augmentation of epoch e from ``Generator(seed · 1,000,003 + e)`` — so the arms with
and without normalization see the same initialization and the same batches, and a run
resumed from a checkpoint (:mod:`bnorm.study.checkpoint`) continues exactly as if it
had not stopped.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .checkpoint import Checkpointer
from .data import Dataset
from .models import ACTIVATIONS, INIT_SCHEMES, MODELS, build_model, initialize

__all__ = [
    "EpochResult",
    "Evaluation",
    "TrainSpec",
    "epoch_batches",
    "evaluate",
    "layer_grad_norms",
    "train_one_epoch",
    "train_run",
]


@dataclass
class TrainSpec:
    """Everything that defines how one network is trained (stored in config.json)."""

    model: str = "mlp"  # a name from bnorm.study.models.MODELS
    hidden: list[int] | None = None  # MLP hidden widths (None: the model's default)
    activation: str | None = None  # MLP nonlinearity: sigmoid | tanh | relu (None: default)
    init: str = "normal"  # normal (N(0, init_std²)) | kaiming | xavier | torch
    init_std: float = 0.1
    batch_size: int = 60
    steps: int | None = 2000  # training length in SGD steps...
    epochs: int | None = None  # ...or in epochs (exactly one of the two is set)
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_milestones: list[float] = field(
        default_factory=list
    )  # fractions of training: lr ×= lr_gamma
    lr_gamma: float = 0.1
    augment: bool = False  # random 4-pixel-padded crop and horizontal flip
    standardize: bool = False  # per-channel (x − mean)/std with the training set's statistics
    eval_every: int = 20  # steps between test-set evaluations (also at step 0 and the end)
    probe: bool = True  # record the 15/50/85th percentiles of the probe unit at each evaluation
    grad_norms: bool = False  # per-layer gradient norms at initialization and at the end
    keep_predictions: bool = False  # store the final test predictions (for disagreement)
    inference_check: bool = False  # BN nets: accuracy after recalibrate(), folded latency
    shift_check: bool = False  # accuracy on corrupted test sets, as trained and adapted
    micro_batches: int = 1  # gradient accumulation: micro-batches of batch_size per SGD step
    accumulate_stats: bool = False  # with micro_batches > 1: bnorm.accumulate around each step
    stats_check: bool = False  # BN nets: drift of the running statistics (bnorm.diagnose)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> None:
        """Raise ValueError for a setting no run can use (checked before any training)."""
        if self.model not in MODELS:
            raise ValueError(f"expected model in {', '.join(MODELS)} (got {self.model!r})")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(
                f"expected activation in {', '.join(ACTIVATIONS)} (got {self.activation!r})"
            )
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"expected init in {', '.join(INIT_SCHEMES)} (got {self.init!r})")
        for name in ("augment", "standardize", "probe", "grad_norms", "keep_predictions",
                     "inference_check", "shift_check", "accumulate_stats", "stats_check"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"expected {name} to be true or false (got {getattr(self, name)!r})"
                )
        if not isinstance(self.lr_milestones, list) or any(
            isinstance(m, bool) or not isinstance(m, (int, float)) for m in self.lr_milestones
        ):
            raise ValueError(
                f"expected lr_milestones to be a list of fractions (got {self.lr_milestones!r})"
            )
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                "expected exactly one of steps and epochs "
                f"(got steps={self.steps}, epochs={self.epochs})"
            )
        for name in ("batch_size", "eval_every", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {name} to be a positive integer (got {value!r})")
        length = self.steps if self.steps is not None else self.epochs
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"expected a positive integer number of steps/epochs (got {length!r})")
        for name in ("lr", "init_std"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"expected {name} to be a positive number (got {value!r})")
        for name in ("momentum", "weight_decay", "lr_gamma"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"expected {name} to be a number ≥ 0 (got {value!r})")
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(
                f"expected lr_milestones as fractions in (0, 1) (got {self.lr_milestones})"
            )
        if self.hidden is not None and (
            not isinstance(self.hidden, list)
            or not self.hidden
            or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden)
        ):
            raise ValueError(
                f"expected hidden to be a list of positive widths (got {self.hidden!r})"
            )

    def steps_per_epoch(self, num_train: int) -> int:
        """Optimizer steps per epoch: each takes ``micro_batches`` batches of ``batch_size``."""
        return num_train // (self.batch_size * self.micro_batches)

    def total_steps(self, num_train: int) -> int:
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return self.epochs * self.steps_per_epoch(num_train)

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of step ``step`` (0-based): ``lr · gamma^k`` after k milestones."""
        passed = sum(step >= round(m * total) for m in self.lr_milestones)
        return self.lr * self.lr_gamma**passed


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
    import torch.distributed as dist

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
    import torch.distributed as dist

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
    import bnorm

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
    from bnorm.tools import batch_norm_layers

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


def inference_check(
    model: nn.Module,
    data: Dataset,
    spec: TrainSpec,
    device: torch.device | str = "cpu",
    repeats: int = 25,
) -> dict[str, Any] | None:
    """From training to inference, for a trained network with batch-norm layers (None
    without): test accuracy with the running (EMA) statistics vs after
    :func:`bnorm.recalibrate` over the training set (exact population statistics), and
    the folded network (:func:`bnorm.fold`): how many layers folded, the largest change
    of a test logit, and its latency against the unfolded one (medians of alternated
    runs, at batch 1 and on the whole test set)."""
    import bnorm
    from bnorm.testing import time_alternated

    if not has_batch_norm(model):
        return None
    test = lambda m: evaluate(  # noqa: E731
        m, data.test_images, data.test_labels, data, standardize=spec.standardize, device=device
    )
    ema = test(model)
    calibrated = copy.deepcopy(model).eval()
    n = int(data.train_labels.shape[0])
    batches = (
        data.inputs(data.train_images[i : i + spec.batch_size], spec.standardize).to(device)
        for i in range(0, n - spec.batch_size + 1, spec.batch_size)
    )
    bnorm.recalibrate(calibrated, batches, progress=False)
    recal = test(calibrated)
    unfolded = copy.deepcopy(model).eval()
    folded, report = bnorm.fold(copy.deepcopy(model).eval(), return_report=True)
    x_all = data.inputs(data.test_images, spec.standardize).to(device)
    x_one = x_all[:1]
    latency: dict[str, dict[str, float]] = {}
    def call(net: nn.Module, x: Tensor) -> Callable[[], object]:
        return lambda: net(x)

    with torch.no_grad():
        diff = float((folded(x_all) - unfolded(x_all)).abs().max())
        for name, x in (("batch_1", x_one), (f"batch_{x_all.shape[0]}", x_all)):
            t = time_alternated(
                {"unfolded": call(unfolded, x), "folded": call(folded, x)}, repeats, warmup=3
            )
            latency[name] = {
                "unfolded_us": 1e6 * t["unfolded"],
                "folded_us": 1e6 * t["folded"],
                "ratio": t["folded"] / t["unfolded"],
            }
    return {
        "ema_accuracy": ema.accuracy,
        "recalibrated_accuracy": recal.accuracy,
        "folded_layers": len(report.folded),
        "not_folded_layers": len(report.not_folded),
        "fold_max_abs_logit_diff": diff,
        "latency": latency,
    }


def stats_check(
    model: nn.Module, data: Dataset, spec: TrainSpec, device: torch.device | str = "cpu"
) -> dict[str, Any] | None:
    """How far a trained network's running statistics are from the exact statistics of
    its batch-norm layers' inputs over the training set (None without batch norms).

    Per layer, :func:`bnorm.diagnose` in ``mode="train"`` (each layer normalizing with
    the statistics of batches of ``batch_size``, as in training, so every layer is judged
    on its own): ``drift`` = max over channels of KL = ½ (z² + r − 1 − ln r), with
    z = (μ_data − μ_run)/√(σ²_run + ε) and r = (σ²_data + ε)/(σ²_run + ε). Also the test
    accuracy after :func:`bnorm.recalibrate` over the same batches (the exact statistics
    in place of the running ones)."""
    import bnorm

    if not has_batch_norm(model):
        return None
    n = int(data.train_labels.shape[0])

    def batches() -> Iterator[Tensor]:
        for i in range(0, n - spec.batch_size + 1, spec.batch_size):
            images = data.train_images[i : i + spec.batch_size]
            yield data.inputs(images, spec.standardize).to(device)

    report = bnorm.diagnose(model, batches(), mode="train", progress=False)
    layers = [entry for entry in report.layers if entry.count > 0]
    calibrated = copy.deepcopy(model)
    bnorm.recalibrate(calibrated, batches(), progress=False)
    recal = evaluate(
        calibrated, data.test_images, data.test_labels, data,
        standardize=spec.standardize, device=device,
    )  # fmt: skip
    drift = [_finite_or_none(entry.drift) for entry in layers]
    finite = [d for d in drift if d is not None]
    return {
        "layers": [entry.name for entry in layers],
        "drift": drift,
        "mean_shift": [_finite_or_none(entry.mean_shift) for entry in layers],
        "var_ratio_min": [_finite_or_none(entry.var_ratio_min) for entry in layers],
        "var_ratio_max": [_finite_or_none(entry.var_ratio_max) for entry in layers],
        "mean_drift": sum(finite) / len(finite) if finite else None,
        "recalibrated_accuracy": recal.accuracy,
    }


def layer_grad_norms(model: nn.Module, x: Tensor, y: Tensor) -> list[float]:
    """‖∂L/∂W_l‖ (Frobenius) for each layer of ``model.weight_layers``, for the mean
    cross-entropy of one batch in training mode. Computed on a copy: the model's
    parameters, gradients and running statistics are left untouched."""
    clone = copy.deepcopy(model)
    clone.train()
    clone.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(clone(x), y).backward()
    norms = []
    layers: list[nn.Module] = getattr(clone, "weight_layers")  # noqa: B009
    for layer in layers:
        weight = layer.weight
        grad = weight.grad if isinstance(weight, Tensor) else None
        norms.append(float(torch.linalg.vector_norm(grad)) if grad is not None else 0.0)
    return norms


# ---------------------------------------------------------------------------- a run


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _percentiles(values: Tensor) -> list[float | None]:
    q = torch.quantile(values.double(), torch.tensor([0.15, 0.50, 0.85], dtype=torch.float64))
    return [_finite_or_none(float(v)) for v in q]


def _new_model(
    spec: TrainSpec, data: Dataset, norm: str, seed: int, device: torch.device | str
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The run's network, initialized from ``Generator(seed)``, and its SGD optimizer."""
    model = build_model(
        spec.model,
        data.image_shape,
        data.num_classes,
        norm,
        hidden=spec.hidden,
        activation=spec.activation,
    )
    initialize(model, torch.Generator().manual_seed(seed), spec.init, spec.init_std)
    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    return model, optimizer


def _new_record(
    spec: TrainSpec, model: nn.Module, norm: str, seed: int, total: int
) -> dict[str, Any]:
    """A run's record before its first step (the JSON-ready dict of metrics.json)."""
    record: dict[str, Any] = {
        "norm": norm,
        "seed": seed,
        "lr": spec.lr,
        "batch_size": spec.batch_size,
        "total_steps": total,
        "steps_done": 0,
        "done": False,
        "diverged_at": None,
        "wall_s": 0.0,
        "curve": {"step": [], "test_accuracy": [], "test_loss": [], "train_loss": []},
    }
    if spec.micro_batches > 1:
        record["micro_batches"] = spec.micro_batches
        record["accumulate_stats"] = spec.accumulate_stats
    if spec.probe:
        record["probe"] = {"unit": 0, "step": [], "p15": [], "p50": [], "p85": []}
    if spec.grad_norms:
        layers: list[nn.Module] = getattr(model, "weight_layers")  # noqa: B009
        record["grad_norms"] = {
            "layers": [type(m).__name__ for m in layers],
            "init": None,
            "final": None,
        }
    return record


def _record_evaluation(
    record: dict[str, Any],
    at_step: int,
    model: nn.Module,
    data: Dataset,
    spec: TrainSpec,
    device: torch.device | str,
    pending_losses: list[float],
) -> None:
    """Evaluate on the test set and append a point to the record's curves (and probe);
    the training losses since the last evaluation give its train_loss and are cleared."""
    ev = evaluate(
        model,
        data.test_images,
        data.test_labels,
        data,
        standardize=spec.standardize,
        device=device,
        probe_unit=0 if spec.probe else None,
    )
    curve = record["curve"]
    curve["step"].append(at_step)
    curve["test_accuracy"].append(ev.accuracy)
    # JSON-ready: None, not NaN, where there is no number (no step yet; diverged).
    curve["test_loss"].append(ev.loss if math.isfinite(ev.loss) else None)
    curve["train_loss"].append(
        sum(pending_losses) / len(pending_losses) if pending_losses else None
    )
    pending_losses.clear()
    if spec.probe and ev.probe is not None:
        p = record["probe"]
        p["step"].append(at_step)
        for key, value in zip(("p15", "p50", "p85"), _percentiles(ev.probe)):
            p[key].append(value)
    if spec.keep_predictions:
        record["predictions"] = ev.predictions.tolist()


def _record_final_checks(
    record: dict[str, Any],
    model: nn.Module,
    data: Dataset,
    spec: TrainSpec,
    *,
    seed: int,
    device: torch.device | str,
    grad_batch: tuple[Tensor, Tensor],
    diverged: bool,
) -> None:
    """The measurements of a trained network that its spec asks for (gradient norms;
    unless it diverged, the inference, shift and running-statistics checks)."""
    if spec.grad_norms:
        record["grad_norms"]["final"] = [
            _finite_or_none(v) for v in layer_grad_norms(model, *grad_batch)
        ]
    if spec.inference_check and not diverged:
        record["inference"] = inference_check(model, data, spec, device)
    if spec.shift_check and not diverged:
        from .shift import shift_check

        record["shift"] = shift_check(
            model, data, seed=seed, standardize=spec.standardize, device=device
        )
    if spec.stats_check and not diverged:
        record["running_stats"] = stats_check(model, data, spec, device)


def train_run(
    spec: TrainSpec,
    data: Dataset,
    *,
    norm: str,
    seed: int,
    device: torch.device | str = "cpu",
    checkpointer: Checkpointer | None = None,
    on_progress: Callable[[int, int, float | None], None] | None = None,
) -> dict[str, Any]:
    """Train one network and return its record (the JSON-ready dict stored under
    ``runs`` in metrics.json). With a ``checkpointer`` it resumes from the last saved
    epoch and saves after every epoch. ``on_progress(step, total, last_accuracy)`` is
    called after every step."""
    spec.validate()
    total = spec.total_steps(int(data.train_labels.shape[0]))
    rank, world = process_rank()
    _check_batch_size(spec, int(data.train_labels.shape[0]), world)
    model, optimizer = _new_model(spec, data, norm, seed, device)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    grad_batch = (
        data.inputs(data.train_images[:500], spec.standardize).to(device),
        data.train_labels[:500].to(device),
    )
    run = _Run(spec, data, model, optimizer, device, total, rank, world)
    run.start(_new_record(spec, model, norm, seed, total), checkpointer, on_progress)
    record = run.record
    if record["done"]:
        return record
    if run.step == 0 and not record["curve"]["step"]:
        if spec.grad_norms:
            record["grad_norms"]["init"] = [
                _finite_or_none(v) for v in layer_grad_norms(model, *grad_batch)
            ]
        run.log_eval(0)
    diverged = run.train(net, seed)
    if record["curve"]["step"][-1] != run.step:
        run.log_eval(run.step)  # the final point (diverged runs stop between evaluations)
    _record_final_checks(
        record,
        model,
        data,
        spec,
        seed=seed,
        device=device,
        grad_batch=grad_batch,
        diverged=diverged,
    )
    record["done"] = True
    run.save(run.epoch - 1, final=True)
    return record


def _check_batch_size(spec: TrainSpec, train_samples: int, world: int) -> None:
    if spec.batch_size < world:
        raise ValueError(f"expected batch_size ≥ the {world} processes (got {spec.batch_size})")
    if spec.steps_per_epoch(train_samples) < 1:
        raise ValueError(
            f"expected batch_size ≤ the {train_samples} training samples "
            f"(got {spec.batch_size})"
        )


class _Run:
    """One :func:`train_run` in progress: its record, the epoch and step reached, the
    training losses since the last evaluation, and where they are checkpointed."""

    def __init__(
        self,
        spec: TrainSpec,
        data: Dataset,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device | str,
        total: int,
        rank: int,
        world: int,
    ) -> None:
        self.spec, self.data, self.model, self.optimizer = spec, data, model, optimizer
        self.device, self.total, self.rank, self.world = device, total, rank, world
        self.record: dict[str, Any] = {}
        self.epoch = self.step = 0
        # Training losses since the last evaluation (their mean is the next train_loss point).
        self.pending_losses: list[float] = []
        self.checkpointer: Checkpointer | None = None
        self.on_progress: Callable[[int, int, float | None], None] | None = None
        self.started = 0.0

    def start(
        self,
        record: dict[str, Any],
        checkpointer: Checkpointer | None,
        on_progress: Callable[[int, int, float | None], None] | None,
    ) -> None:
        """Start with ``record``, or where the checkpointer's last save left off."""
        self.record, self.checkpointer, self.on_progress = record, checkpointer, on_progress
        saved = checkpointer.load(self.model, self.optimizer) if checkpointer is not None else None
        if saved is not None:
            self.record = saved["record"]
            if self.record["done"]:
                return
            self.epoch, self.step = int(saved["epoch"]) + 1, int(saved["step"])
            self.pending_losses = [float(v) for v in saved.get("pending_losses", [])]
        self.started = time.perf_counter() - float(self.record["wall_s"])

    def log_eval(self, at_step: int) -> None:
        _record_evaluation(
            self.record, at_step, self.model, self.data, self.spec, self.device, self.pending_losses
        )

    def after_step(self, at_step: int, loss: float) -> None:
        self.pending_losses.append(loss)
        if at_step % self.spec.eval_every == 0 or at_step == self.total:
            self.log_eval(at_step)
        if self.on_progress is not None:
            accuracies = self.record["curve"]["test_accuracy"]
            self.on_progress(at_step, self.total, accuracies[-1] if accuracies else None)

    def save(self, epoch_done: int, final: bool = False) -> None:
        """Note the progress in the record, and checkpoint it on rank 0 when due (always
        when ``final``)."""
        self.record["steps_done"] = self.step
        self.record["wall_s"] = time.perf_counter() - self.started
        checkpointer = self.checkpointer
        if checkpointer is not None and self.rank == 0 and (final or checkpointer.due()):
            state = {
                "epoch": epoch_done,
                "step": self.step,
                "pending_losses": self.pending_losses,
                "record": self.record,
            }
            checkpointer.save(self.model, self.optimizer, state)

    def train(self, net: nn.Module, seed: int) -> bool:
        """Train ``net`` (the model, or its DistributedDataParallel wrapper) epoch by epoch
        up to the last step, saving after each epoch, or until the loss diverges; returns
        whether it did."""
        distributed = self.world > 1
        diverged = False
        while self.step < self.total and not diverged:
            batches = epoch_batches(self.data, self.spec, seed, self.epoch, self.device)
            result = train_one_epoch(
                net,
                shard_batches(batches, self.rank, self.world) if distributed else batches,
                self.optimizer,
                step=self.step,
                max_steps=self.total,
                lr_at=lambda s: self.spec.lr_at(s, self.total),
                after_step=self.after_step,
                distributed=distributed,
                micro_batches=self.spec.micro_batches,
                accumulate_stats=self.spec.accumulate_stats,
            )
            self.step, diverged = result.step, result.diverged
            if diverged:
                self.record["diverged_at"] = self.step
            elif self.step < self.total:
                self.save(self.epoch)
            self.epoch += 1
        return diverged
