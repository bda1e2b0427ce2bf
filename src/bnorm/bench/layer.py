"""``bnorm bench layer``: bnorm.BatchNorm2d against torch.nn.BatchNorm2d."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from ..modules import BatchNorm2d
from ..testing import RESNET20_SHAPES, time_alternated
from .report import geomean

LAYER_TARGET = 1.05  # the bar: bnorm at most 5% slower than torch


def layer_suite(args: argparse.Namespace) -> dict[str, object]:
    """Forward+backward in training of one ``bnorm.BatchNorm2d`` against one
    ``torch.nn.BatchNorm2d`` at the ResNet-20 shapes, NCHW and channels_last.

    Each timed sample is one step (x.grad, parameter grads cleared; forward; backward with
    a fixed upstream gradient) of each layer in turn, so both see the same machine state;
    the ratio is median(bnorm)/median(torch). ``--quick`` uses batch 16.
    """

    def step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)

        return run

    rows: list[dict[str, object]] = []
    ratios: list[float] = []
    for n, c, side in RESNET20_SHAPES:
        n = 16 if args.quick else n
        for layout in ("NCHW", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            torch.manual_seed(0)
            x = torch.randn(n, c, side, side).to(memory_format=fmt).requires_grad_()
            dy = torch.randn(n, c, side, side).to(memory_format=fmt)
            ours, theirs = BatchNorm2d(c), torch.nn.BatchNorm2d(c)
            t = time_alternated(
                {"torch": step(theirs, x, dy), "bnorm": step(ours, x, dy)},
                args.repeats,
                args.warmup,
            )
            ratio = t["bnorm"] / t["torch"]
            ratios.append(ratio)
            rows.append(
                {
                    "shape": f"{n}x{c}x{side}x{side}",
                    "layout": layout,
                    "torch_ms": 1e3 * t["torch"],
                    "bnorm_ms": 1e3 * t["bnorm"],
                    "bnorm/torch": ratio,
                }
            )
    overall = geomean(ratios)
    worst = max(ratios)
    verdict = "meets" if worst <= LAYER_TARGET else "misses"
    return {
        "rows": rows,
        "overall_ratio": overall,
        "worst_ratio": worst,
        "target_ratio": LAYER_TARGET,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "quick": args.quick,
        "summary": [
            f"bnorm/torch, forward+backward in training: overall (geometric mean) "
            f"{overall:.3f}x, worst {worst:.3f}x; {verdict} the <= {LAYER_TARGET:.2f}x bar"
        ],
    }
