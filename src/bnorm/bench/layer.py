"""``bnorm bench layer``: bnorm.BatchNorm2d against torch.nn.BatchNorm2d."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from ..modules import BatchNorm2d
from ..testing import RESNET20_SHAPES, geometric_mean, time_alternated

LAYER_TARGET = 1.05  # the bar: bnorm at most 5% slower than torch
PER_CALL_TARGET_US = 3.0  # fixed cost of a call: at most 3 µs over torch's (the goal)
PER_CALL_SHAPE = (8, 16, 4, 4)  # so small that the fixed cost is most of the time


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
    overall = geometric_mean(ratios)
    worst = max(ratios)
    verdict = "meets" if worst <= LAYER_TARGET else "misses"
    per_call = _per_call_cost(args, step)
    return {
        "rows": rows,
        "per_call": per_call,
        "overall_ratio": overall,
        "worst_ratio": worst,
        "target_ratio": LAYER_TARGET,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "quick": args.quick,
        "summary": [
            f"bnorm/torch, forward+backward in training: overall (geometric mean) "
            f"{overall:.3f}x, worst {worst:.3f}x; {verdict} the <= {LAYER_TARGET:.2f}x bar",
            *(
                f"fixed cost per call ({row['shape']}, 1 thread, {row['options']}): "
                f"bnorm {row['bnorm_us']:.1f} us, torch {row['torch_us']:.1f} us, "
                f"{row['extra_us']:+.1f} us (target <= {PER_CALL_TARGET_US:.0f} us)"
                for row in per_call
            ),
        ],
    }


def _per_call_cost(
    args: argparse.Namespace,
    step: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Callable[[], None]],
) -> list[dict[str, object]]:
    """The fixed cost of one training forward+backward: a tiny input, one thread, each
    sample a loop of calls; bnorm with its default guard against non-finite batches and
    without it (``skip_nonfinite=False``, torch's behaviour)."""
    calls = 20 if args.quick else 200
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x = torch.randn(*PER_CALL_SHAPE).requires_grad_()
        dy = torch.randn(*PER_CALL_SHAPE)
        c = PER_CALL_SHAPE[1]
        rows: list[dict[str, object]] = []
        for options, ours in (
            ("default", BatchNorm2d(c)),
            ("skip_nonfinite=False", BatchNorm2d(c, skip_nonfinite=False)),
        ):
            sides = {"torch": step(torch.nn.BatchNorm2d(c), x, dy), "bnorm": step(ours, x, dy)}
            loops = {name: _looped(fn, calls) for name, fn in sides.items()}
            t = time_alternated(loops, args.repeats, args.warmup)
            torch_us, bnorm_us = (1e6 * t[name] / calls for name in ("torch", "bnorm"))
            rows.append(
                {
                    "shape": "x".join(map(str, PER_CALL_SHAPE)),
                    "options": options,
                    "torch_us": torch_us,
                    "bnorm_us": bnorm_us,
                    "extra_us": bnorm_us - torch_us,
                    "target_us": PER_CALL_TARGET_US,
                }
            )
        return rows
    finally:
        torch.set_num_threads(threads)


def _looped(fn: Callable[[], None], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run
