"""The running-statistics store: the buffers a training step updates in place, written
once per step from inside a kernel or after it (one rule for every path)."""

from __future__ import annotations

from torch import Tensor

Running = tuple[Tensor, Tensor, "float | Tensor"]
"""(running_mean, running_var, α) of a running-statistics update inside a kernel."""


RunningState = tuple[Tensor, Tensor, "float | Tensor", "Tensor | None", "Tensor | None"]
"""(running_mean, running_var, α, num_batches_tracked, num_batches_skipped): the buffers a
training step updates in place (α: the momentum, or 1/t for the cumulative average)."""


def store_running(state: RunningState, new_mean: Tensor, new_var: Tensor, ok: Tensor) -> None:
    """Write a running-statistics update into ``state``'s buffers: the statistics, and one
    more tracked (ok) or skipped (not ok) batch."""
    running_mean, running_var, _, tracked, skipped = state
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    if tracked is not None:
        tracked.add_(ok.to(tracked.dtype))
    if skipped is not None:
        skipped.add_((~ok).to(skipped.dtype))
