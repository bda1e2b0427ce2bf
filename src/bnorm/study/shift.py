"""The ``shift`` experiment's measurements: a trained network on corrupted test sets, as
trained and after :func:`bnorm.adapt`.

For each corruption of :data:`bnorm.study.corruptions.CORRUPTIONS` (clean included) the
test set is corrupted (seeded by the run's seed) and the network's accuracy measured:

* ``source`` — as trained (eval mode: the running statistics of training);
* ``bn`` — ``adapt(model, test batches, "bn")``: running statistics := the exact
  statistics of the corrupted test set, then eval mode;
* ``bn_online`` — ``adapt(..., "bn", online=True)``: each test batch of ``ADAPT_BATCH``
  samples normalized with its own statistics (what Tent starts from);
* ``prior`` — ``adapt(..., "prior", online=True, prior_strength=PRIOR_STRENGTH)``: each
  test batch of ``ADAPT_BATCH`` samples normalized with the mix of the source statistics
  (worth N samples) and the batch's own (Schneider et al. 2020's setting);
* ``tent`` — ``adapt(..., "tent")`` online over the same batches, one SGD step per batch
  on the entropy of the predictions (lr ``TENT_LR``, momentum ``TENT_MOMENTUM``), each
  batch predicted before its step.

Each method starts from a copy of the trained network; the test batches are the test
set in its fixed order. Networks without batch norm get ``source`` only.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import Tensor, nn

from .corruptions import CORRUPTIONS, corrupt
from .data import Dataset

__all__ = [
    "ADAPT_BATCH",
    "METHODS",
    "PRIOR_STRENGTH",
    "TENT_LR",
    "TENT_MOMENTUM",
    "corrupted_inputs",
    "shift_check",
]

ADAPT_BATCH = 32  # test batch of the online methods
PRIOR_STRENGTH = 16.0  # N, in samples: the source statistics weigh as much as 16 test images
TENT_LR = 0.01
TENT_MOMENTUM = 0.9
METHODS = ("source", "bn", "bn_online", "prior", "tent")
# The online methods: record key -> bnorm.adapt's method and options (outputs per batch).
ONLINE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "bn_online": ("bn", {"online": True}),
    "prior": ("prior", {"online": True, "prior_strength": PRIOR_STRENGTH}),
    "tent": ("tent", {"lr": TENT_LR, "momentum": TENT_MOMENTUM}),
}


def corrupted_inputs(
    data: Dataset, images: Tensor, name: str, seed: int, standardize: bool = False
) -> Tensor:
    """uint8 ``images`` → floats in [0, 1], corrupted by ``name``, then standardized with
    the training set's statistics if ``standardize`` (as the network's inputs were)."""
    corruption = next(c for c in CORRUPTIONS if c.name == name)
    x = corrupt(data.inputs(images, False), corruption, seed)
    if standardize:
        x = (x - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
    return x


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1).cpu() == labels).double().mean())


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch: int = 1000) -> Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def shift_check(
    model: nn.Module,
    data: Dataset,
    *,
    seed: int,
    standardize: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Accuracy per corruption and method (see the module docstring); the model is left
    untouched (each method adapts a copy)."""
    import bnorm

    started = time.perf_counter()
    has_bn = bool(bnorm.tools.batch_norm_layers(model))
    was_training = model.training
    model.eval()
    labels = data.test_labels
    accuracy: dict[str, dict[str, float]] = {}
    try:
        for corruption in CORRUPTIONS:
            x = corrupted_inputs(data, data.test_images, corruption.name, seed, standardize).to(
                device
            )
            batches = list(x.split(ADAPT_BATCH))
            entry = {"source": _accuracy(_predict(model, x), labels)}
            if has_bn:
                adapted = copy.deepcopy(model)
                bnorm.adapt(adapted, batches, "bn", progress=False)
                entry["bn"] = _accuracy(_predict(adapted, x), labels)
                for key, (method, options) in ONLINE_METHODS.items():
                    report = bnorm.adapt(
                        copy.deepcopy(model), batches, method, progress=False, **options
                    )
                    entry[key] = _accuracy(torch.cat(report.outputs or []), labels)
            accuracy[corruption.name] = entry
    finally:
        model.train(was_training)
    return {
        "corruptions": [c.describe() for c in CORRUPTIONS],
        "adapt_batch": ADAPT_BATCH,
        "prior_strength": PRIOR_STRENGTH,
        "tent": {"optimizer": "sgd", "lr": TENT_LR, "momentum": TENT_MOMENTUM, "steps": 1},
        "accuracy": accuracy,
        "wall_s": time.perf_counter() - started,
    }
