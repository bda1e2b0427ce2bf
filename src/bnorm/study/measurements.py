"""What is measured on a trained network, after its last step (each asked for by a
:class:`~bnorm.study.spec.TrainSpec` flag): :func:`final_checks` runs those its spec asks
for and stores them in the run's record.

* ``recalibrate_check`` — test accuracy after :func:`bnorm.recalibrate` over the training
  set (:func:`recalibrated_accuracy`): the exact statistics in place of the running ones;
* ``inference_check`` — the same, and the folded network (:func:`inference_check`);
* ``stats_check`` — the drift of the running statistics (:func:`stats_check`);
* ``shift_check`` — accuracy on corrupted test sets, as trained and adapted
  (:func:`bnorm.study.shift.shift_check`);
* ``grad_norms`` — the per-layer gradient norms of the trained network.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

import bnorm
from bnorm.testing import time_alternated
from bnorm.tools import batch_norm_layers

from .data import Dataset
from .loop import evaluate, has_batch_norm, layer_grad_norms
from .shift import shift_check
from .spec import TrainSpec

__all__ = [
    "final_checks",
    "finite_or_none",
    "inference_check",
    "recalibrated_accuracy",
    "stats_check",
]


def finite_or_none(value: float) -> float | None:
    """``value``, or None where it is not finite (JSON has no NaN)."""
    return value if math.isfinite(value) else None


def _training_batches(
    data: Dataset, spec: TrainSpec, device: torch.device | str
) -> Iterator[Tensor]:
    """The training set in order, cut into batches of ``batch_size`` (the remainder
    dropped), as the network's inputs."""
    n = int(data.train_labels.shape[0])
    for i in range(0, n - spec.batch_size + 1, spec.batch_size):
        images = data.train_images[i : i + spec.batch_size]
        yield data.inputs(images, spec.standardize).to(device)


def _test_accuracy(
    model: nn.Module, data: Dataset, spec: TrainSpec, device: torch.device | str
) -> float:
    return evaluate(
        model, data.test_images, data.test_labels, data,
        standardize=spec.standardize, device=device,
    ).accuracy  # fmt: skip


def _recalibrated(
    model: nn.Module, data: Dataset, spec: TrainSpec, device: torch.device | str
) -> nn.Module:
    """A copy of ``model`` whose running statistics :func:`bnorm.recalibrate` replaced by
    the exact statistics of its batch-norm layers' inputs over the training set, each
    layer normalizing batches of ``batch_size`` as in training."""
    calibrated = copy.deepcopy(model)
    bnorm.recalibrate(calibrated, _training_batches(data, spec, device), progress=False)
    return calibrated


def recalibrated_accuracy(
    model: nn.Module, data: Dataset, spec: TrainSpec, device: torch.device | str = "cpu"
) -> float | None:
    """Test accuracy (eval mode) of ``model`` after :func:`bnorm.recalibrate` over the
    training set in batches of ``batch_size``. Against the accuracy with the running
    statistics it separates what the running statistics cost at test time from what
    training with batch statistics cost. None without batch norms. (Moving-average layers
    get the second moment of their inputs about 0, which is what they normalize with.)"""
    if not batch_norm_layers(model):
        return None
    return _test_accuracy(_recalibrated(model, data, spec, device), data, spec, device)


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
    if not has_batch_norm(model):
        return None
    ema = _test_accuracy(model, data, spec, device)
    recal = _test_accuracy(_recalibrated(model, data, spec, device), data, spec, device)
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
        "ema_accuracy": ema,
        "recalibrated_accuracy": recal,
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
    if not has_batch_norm(model):
        return None
    report = bnorm.diagnose(
        model, _training_batches(data, spec, device), mode="train", progress=False
    )
    layers = [entry for entry in report.layers if entry.count > 0]
    recal = _test_accuracy(_recalibrated(model, data, spec, device), data, spec, device)
    drift = [finite_or_none(entry.drift) for entry in layers]
    finite = [d for d in drift if d is not None]
    return {
        "layers": [entry.name for entry in layers],
        "drift": drift,
        "mean_shift": [finite_or_none(entry.mean_shift) for entry in layers],
        "var_ratio_min": [finite_or_none(entry.var_ratio_min) for entry in layers],
        "var_ratio_max": [finite_or_none(entry.var_ratio_max) for entry in layers],
        "mean_drift": sum(finite) / len(finite) if finite else None,
        "recalibrated_accuracy": recal,
    }


def final_checks(
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
    """Store in ``record`` the measurements of the trained ``model`` that ``spec`` asks
    for: the gradient norms (``grad_norms["final"]``), and unless it diverged
    ``recalibrated_accuracy``, ``inference``, ``shift`` and ``running_stats``."""
    if spec.grad_norms:
        record["grad_norms"]["final"] = [
            finite_or_none(v) for v in layer_grad_norms(model, *grad_batch)
        ]
    if diverged:
        return
    if spec.recalibrate_check:
        record["recalibrated_accuracy"] = recalibrated_accuracy(model, data, spec, device)
    if spec.inference_check:
        record["inference"] = inference_check(model, data, spec, device)
    if spec.shift_check:
        record["shift"] = shift_check(
            model, data, seed=seed, standardize=spec.standardize, device=device
        )
    if spec.stats_check:
        record["running_stats"] = stats_check(model, data, spec, device)
