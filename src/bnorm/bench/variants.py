"""``bnorm bench variants``: the cost of BN's variants — forward+backward of Batch
Renorm, ghost, masked and moving-average BN relative to plain bnorm BN, at ResNet-20
shapes (target ≤ 1.2×)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from ..modules import BatchNorm2d
from ..options import MovingAverage, Renorm
from ..testing import RESNET20_SHAPES, time_alternated


def resnet20_shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(N, C, side) of ResNet-20's batch norms: batch 128, or 16 with ``quick``."""
    return [(16, c, s) for _, c, s in RESNET20_SHAPES] if quick else RESNET20_SHAPES


def train_step(
    layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, **kw: Any
) -> Callable[[], None]:
    """One training step of ``layer`` (``x.grad`` cleared, forward with ``kw``, backward
    of ``dy``), to time."""

    def run() -> None:
        x.grad = None
        layer(x, **kw).backward(dy)

    return run


def variants_suite(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    worst = 0.0
    for n, c, side in resnet20_shapes(args.quick):
        torch.manual_seed(0)
        x = torch.randn(n, c, side, side, requires_grad=True)
        dy = torch.randn(n, c, side, side)
        mask = torch.rand(n, side, side) > 0.1
        plain = BatchNorm2d(c)
        renorm = BatchNorm2d(c, renorm=Renorm(3.0, 5.0, 0, 0, 0))
        with torch.no_grad():  # running statistics away from the batch's: clipping active
            renorm.get_buffer("running_mean").fill_(0.5)
            renorm.get_buffer("running_var").fill_(2.0)
        ghost = BatchNorm2d(c, virtual_batch_size=max(2, n // 4))
        # No warm-up: every timed step averages over the (full) window.
        moving = BatchNorm2d(c, moving_average=MovingAverage(window=16, warmup_steps=0))
        cases = {
            "plain": train_step(plain, x, dy),
            "renorm": train_step(renorm, x, dy),
            "ghost": train_step(ghost, x, dy),
            "masked": train_step(plain, x, dy, mask=mask),
            "moving_average": train_step(moving, x, dy),
        }
        t = time_alternated(cases, args.repeats, args.warmup)
        row: dict[str, Any] = {"shape": f"{n}x{c}x{side}x{side}", "plain_ms": 1e3 * t["plain"]}
        for name in ("renorm", "ghost", "masked", "moving_average"):
            ratio = t[name] / t["plain"]
            row[f"{name}/plain"] = ratio
            worst = max(worst, ratio)
        rows.append(row)
    return {
        "rows": rows,
        "summary": [f"worst variant/plain ratio: {worst:.2f}x (target <= 1.2x)"],
        "ghost_virtual_batch_size": "batch/4",
        "mask_valid_fraction": 0.9,
        "moving_average": "window 16, no warm-up",
    }
