"""The plan of a batch-norm layer: its static options, resolved and checked once.

A :class:`Plan` holds what does not change from one call to the next — momentum, ε, the
channel axis, Batch Renormalization, ghost batches, synchronization, the activation of a
fused tail, the memory mode, moving-average batch norm — and every rule that combines
them, with the messages users see. A layer builds its plan when it is constructed and
again when one of these options is set (``layer.momentum = None``, say);
:func:`bnorm.functional.batch_norm` builds one per distinct set of arguments (cached).
Per call, only what depends on the input is decided (its shape, dtype and device, the
mask, whether torch.compile is tracing, how many processes share the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .options import IDENTITY, Activation, MovingAverage, Renorm

__all__ = [
    "Plan",
    "check_cumulative_average_has_count",
    "check_eps",
    "check_ghost_with_sync",
    "check_moving_average_has_running_stats",
    "check_renorm_has_running_stats",
]


def check_renorm_has_running_stats(renorm: Renorm | None, has_running_stats: bool) -> None:
    """Batch Renormalization corrects towards the running statistics: it needs them."""
    if renorm is not None and not has_running_stats:
        raise ValueError(
            "renorm needs running statistics (got track_running_stats=False or running_mean=None)"
        )


def check_eps(eps: float, batch_statistics: bool) -> None:
    """torch's rule for ε, with its words (``torch.nn.functional.batch_norm``): ε > 0 where
    the batch's statistics normalize (σ²_B may be 0), ε ≥ 0 where the running statistics
    do. A trainable layer is checked at each call, as torch's (it may be built with any ε
    and normalize in eval mode only); a frozen one whenever ε is set."""
    if batch_statistics and not eps > 0:
        raise ValueError(
            f"batch_norm eps must be positive during training, but got {eps}: expected "
            "eps > 0 when normalizing with batch statistics"
        )
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_moving_average_has_running_stats(
    moving_average: MovingAverage | None, has_running_stats: bool
) -> None:
    """A moving-average layer carries its windows from step to step and evaluates with the
    running statistics of its normalizer: it needs the state (``track_running_stats``)."""
    if moving_average is not None and not has_running_stats:
        raise ValueError(
            "expected track_running_stats=True with moving_average (got "
            "track_running_stats=False): the layer keeps its moving averages as buffers"
        )


def _moving_average(option: MovingAverage | bool | None) -> MovingAverage | None:
    """``True`` → the paper's defaults, ``False``/``None`` → off; else a MovingAverage."""
    if option is True:
        return MovingAverage()
    if option is None or option is False:
        return None
    if not isinstance(option, MovingAverage):
        raise TypeError(
            "expected moving_average to be a bnorm.MovingAverage, True or None "
            f"(got {type(option).__name__})"
        )
    return option


def check_moving_average_alone(
    moving_average: MovingAverage | None,
    virtual_batch_size: int | None,
    renorm: Renorm | None,
    memory_efficient: bool,
) -> None:
    """The rules of moving-average batch norm with the other statistics options. Ghost
    batches normalize groups with their own statistics, Batch Renorm corrects the batch
    statistics towards the running ones, the memory-efficient mode recovers x̂ from the
    output with the batch's own statistics: each replaces the statistics that the moving
    average replaces, so none of them combines with it."""
    if moving_average is None:
        return
    for name, on in (
        ("virtual_batch_size", virtual_batch_size is not None),
        ("renorm", renorm is not None),
        ("memory_efficient", memory_efficient),
    ):
        if on:
            value = {"virtual_batch_size": virtual_batch_size, "renorm": renorm}.get(name, True)
            raise ValueError(
                f"expected {name} off with moving_average (got {name}={value!r}): both "
                "replace the batch's statistics; use one of them"
            )


def check_ghost_with_sync(virtual_batch_size: int | None, sync: bool) -> None:
    """Ghost batches split the local batch; with statistics across processes the groups
    would straddle ranks: the two do not combine."""
    if virtual_batch_size is not None and sync:
        raise ValueError(
            "expected virtual_batch_size=None with synchronized statistics (SyncBatchNorm or "
            f"sync=True) (got virtual_batch_size={virtual_batch_size})"
        )


def check_whole_input(memory_efficient: bool, what: str) -> None:
    """The memory-efficient mode recovers x̂ from the output with the statistics of the
    whole local input: not with a mask, ghost batches or synchronized statistics."""
    if memory_efficient and what:
        raise ValueError(
            "memory_efficient=True needs the statistics of the whole local input: it is not "
            f"supported with {what}"
        )


@dataclass(frozen=True)
class Plan:
    """The static options of a batch-norm call, checked once (see the module docstring).

    Build one with :meth:`Plan.build`, which resolves the option values users pass
    (``renorm=True``, an activation name) and checks every rule.
    """

    momentum: float | None = 0.1
    eps: float = 1e-5
    axis: int = 1
    skip_nonfinite: bool = True
    virtual_batch_size: int | None = None
    renorm: Renorm | None = None
    sync: bool = False
    process_group: Any = None
    activation: Activation | None = None
    memory_efficient: bool = False
    moving_average: MovingAverage | None = None

    #: The statistics of plain batch norm — those of the whole local input, none of Batch
    #: Renorm, ghost batches, sync, the memory-efficient mode or moving averages: a
    #: training call may take ATen's kernel (followed by the activation tail, if any).
    plain_statistics: bool = field(init=False, compare=False, repr=False)
    #: Plain batch norm: plain statistics and no activation — a training call may take
    #: ATen's kernel directly (decided here once; per call only the input and the state
    #: can still rule it out).
    plain: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain_statistics", self._plain_statistics())
        object.__setattr__(self, "plain", self.plain_statistics and not self.tail)

    def __getattr__(self, name: str) -> Any:
        # Only for attributes not found: a plan pickled before these fields existed.
        if name in ("plain", "plain_statistics"):
            self.__post_init__()
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _plain_statistics(self) -> bool:
        return (
            self.renorm is None
            and self.virtual_batch_size is None
            and not self.sync
            and not self.memory_efficient
            and self.moving_average is None
        )

    @property
    def tail(self) -> bool:
        """Whether an activation other than the identity follows the normalization."""
        return self.activation is not None and self.activation.name != "identity"

    @staticmethod
    def build(
        *,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        axis: int = 1,
        skip_nonfinite: bool = True,
        virtual_batch_size: int | None = None,
        renorm: Renorm | bool | None = None,
        sync: bool = False,
        process_group: Any = None,
        activation: str | Activation | None = None,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        memory_efficient: bool = False,
        moving_average: MovingAverage | bool | None = None,
    ) -> Plan:
        """Resolve and check the options; raises ``TypeError``/``ValueError`` naming the
        option, what was expected and what was got."""
        if momentum is not None and (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not 0.0 <= momentum <= 1.0
        ):
            raise ValueError(f"expected momentum in [0, 1] or None (got {momentum!r})")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"expected eps to be a number (got {type(eps).__name__})")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"expected axis to be an int (got {type(axis).__name__})")
        if virtual_batch_size is not None and (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size < 1
        ):
            raise ValueError(
                "expected virtual_batch_size to be an int >= 1 or None "
                f"(got {virtual_batch_size!r})"
            )
        if renorm is True:
            renorm = Renorm()
        elif renorm is False:
            renorm = None
        if renorm is not None and not isinstance(renorm, Renorm):
            raise TypeError(
                f"expected renorm to be a bnorm.Renorm, True or None (got {type(renorm).__name__})"
            )
        act = _activation(activation, negative_slope, alpha)
        if memory_efficient and not (act or IDENTITY).invertible:
            raise ValueError(
                "expected an invertible activation for memory_efficient=True: identity, "
                f"leaky_relu with negative_slope > 0 or elu (got {act})"
            )
        moving = _moving_average(moving_average)
        check_moving_average_alone(moving, virtual_batch_size, renorm, bool(memory_efficient))
        check_ghost_with_sync(virtual_batch_size, bool(sync))
        check_whole_input(
            bool(memory_efficient),
            " and ".join(
                w for w, on in (("virtual_batch_size", virtual_batch_size), ("sync", sync)) if on
            ),
        )
        return Plan(
            None if momentum is None else float(momentum),
            float(eps),
            axis,
            bool(skip_nonfinite),
            virtual_batch_size,
            renorm,
            bool(sync),
            process_group,
            act,
            bool(memory_efficient),
            moving,
        )


def _activation(
    activation: str | Activation | None, negative_slope: float, alpha: float
) -> Activation | None:
    if isinstance(activation, str):
        for name, value in (("negative_slope", negative_slope), ("alpha", alpha)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"expected {name} to be a finite number (got {value!r})")
    return Activation.parse(activation, negative_slope, alpha)


def check_cumulative_average_has_count(
    momentum: float | None, num_batches_tracked: object | None
) -> None:
    """``momentum=None`` weighs batch t by 1/t (a cumulative average): updating the running
    statistics needs the count t, ``num_batches_tracked``."""
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
