"""One run: train one network (a model, a normalization, a seed) and record it —
seeded, checkpointed, resumable.

:func:`train_run` builds the network (initial weights from ``Generator(seed)``,
:func:`bnorm.study.models.initialize`), trains it with plain mini-batch SGD (optionally
momentum, weight decay and step decay; the loop is :mod:`bnorm.study.loop`), records
test accuracy/loss every ``eval_every`` steps, and at the end the measurements its
:class:`~bnorm.study.spec.TrainSpec` asks for (:mod:`bnorm.study.measurements`). The arms
with and without normalization start from the same weights and see the same batches;
a run resumed from a checkpoint (:mod:`bnorm.study.checkpoint`) continues exactly as if
it had not stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import Checkpointer
from .data import Dataset
from .loop import (
    epoch_batches,
    evaluate,
    layer_grad_norms,
    process_rank,
    shard_batches,
    train_one_epoch,
)
from .measurements import final_checks, finite_or_none
from .models import build_model, initialize
from .spec import TrainSpec

__all__ = ["TrainSpec", "train_run"]


def _percentiles(values: Tensor) -> list[float | None]:
    q = torch.quantile(values.double(), torch.tensor([0.15, 0.50, 0.85], dtype=torch.float64))
    return [finite_or_none(float(v)) for v in q]


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
        "cpu_s": 0.0,  # this process's CPU time (all its threads), not disturbed by other load
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
                finite_or_none(v) for v in layer_grad_norms(model, *grad_batch)
            ]
        run.log_eval(0)
    diverged = run.train(net, seed)
    if record["curve"]["step"][-1] != run.step:
        run.log_eval(run.step)  # the final point (diverged runs stop between evaluations)
    final_checks(
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
        self.cpu_started = 0.0

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
        self.cpu_started = time.process_time() - float(self.record.get("cpu_s", 0.0))

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
        self.record["cpu_s"] = time.process_time() - self.cpu_started
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
