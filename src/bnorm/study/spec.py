"""How one network is trained: :class:`TrainSpec`, and the one copy of its rules.

Every setting's rule (a positive integer, a positive number, a name from a table…) is
checked by :meth:`TrainSpec.check_setting`, and the one rule between settings — exactly
one of ``steps`` and ``epochs`` — by :meth:`TrainSpec.check_length`. :meth:`TrainSpec.validate`
applies both to a whole spec; the configuration (:mod:`bnorm.study.config`) applies the
same methods to the values given on the command line and in config files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from .models import ACTIVATIONS, INIT_SCHEMES, MODELS

__all__ = ["TrainSpec"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _widths(value: Any) -> bool:
    return value is None or (
        isinstance(value, list) and bool(value) and all(_positive_int(h) for h in value)
    )


def _fractions(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(m) and 0 < m < 1 for m in value)


_POSITIVE_INT = (_positive_int, "to be a positive integer")
_POSITIVE_NUMBER = (lambda v: _is_number(v) and v > 0, "to be a positive number")
_NON_NEGATIVE = (lambda v: _is_number(v) and v >= 0, "to be a number ≥ 0")
_BOOLEAN = (lambda v: isinstance(v, bool), "to be true or false")


def _one_of(names: tuple[str, ...] | dict[str, Any], optional: bool = False) -> tuple[
    Callable[[Any], bool], str
]:
    return (lambda v: (optional and v is None) or v in names, f"in {', '.join(names)}")


# Each setting's rule: (is the value valid, what was expected). ``steps`` and ``epochs``
# may be None here; check_length says which of the two must be set.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": _one_of(MODELS),
    "hidden": (_widths, "to be a list of positive widths"),
    "activation": _one_of(ACTIVATIONS, optional=True),
    "init": _one_of(INIT_SCHEMES),
    "init_std": _POSITIVE_NUMBER,
    "batch_size": _POSITIVE_INT,
    "steps": (lambda v: v is None or _positive_int(v), "to be a positive integer"),
    "epochs": (lambda v: v is None or _positive_int(v), "to be a positive integer"),
    "lr": _POSITIVE_NUMBER,
    "momentum": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "lr_milestones": (_fractions, "to be a list of fractions in (0, 1)"),
    "lr_gamma": _NON_NEGATIVE,
    "eval_every": _POSITIVE_INT,
    "micro_batches": _POSITIVE_INT,
}


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
    recalibrate_check: bool = False  # BN nets: test accuracy after bnorm.recalibrate

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def check_setting(cls, name: str, value: Any) -> None:
        """Raise ValueError unless ``value`` is valid for the setting ``name`` on its own
        (every field has a rule: the booleans are true or false, the rest in ``_RULES``)."""
        valid, expected = _RULES.get(name, _BOOLEAN)
        if not valid(value):
            raise ValueError(f"expected {name} {expected} (got {value!r})")

    @staticmethod
    def check_length(steps: int | None, epochs: int | None, *, required: bool = True) -> None:
        """Raise ValueError if both ``steps`` and ``epochs`` are set — or, when
        ``required``, neither: a run's length is one of the two."""
        if steps is not None and epochs is not None:
            raise ValueError(
                f"expected steps or epochs, not both (got steps={steps}, epochs={epochs})"
            )
        if required and steps is None and epochs is None:
            raise ValueError("expected exactly one of steps and epochs (got neither)")

    def validate(self) -> None:
        """Raise ValueError for a setting no run can use (checked before any training)."""
        for name in self.field_names():
            self.check_setting(name, getattr(self, name))
        self.check_length(self.steps, self.epochs)

    def steps_per_epoch(self, num_train: int) -> int:
        """Optimizer steps per epoch: each takes ``micro_batches`` batches of ``batch_size``."""
        return num_train // (self.batch_size * self.micro_batches)

    def total_steps(self, num_train: int) -> int:
        """SGD steps of the whole run: ``steps``, or ``epochs`` × steps per epoch."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return self.epochs * self.steps_per_epoch(num_train)

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of step ``step`` (0-based): ``lr · gamma^k`` after k milestones."""
        passed = sum(step >= round(m * total) for m in self.lr_milestones)
        return self.lr * self.lr_gamma**passed
