"""``bnorm bench sync``: SyncBatchNorm over 2 gloo ranks (processes on this machine)
relative to local bnorm BN on the same per-rank batch."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from ..distributed import all_gather_tensor, all_reduce_sum
from ..modules import BatchNorm2d, SyncBatchNorm
from ..testing import spawn_gloo, time_alternated
from .variants import resnet20_shapes, train_step

WORLD = 2


def _sync_rows(
    rank: int, world: int, shapes: list[tuple[int, int, int]], repeats: int, warmup: int
) -> list[dict[str, Any]]:
    """One rank's rows (run in a process of :func:`bnorm.testing.spawn_gloo`)."""
    rows = []
    for n, c, side in shapes:
        torch.manual_seed(rank)
        x = torch.randn(n, c, side, side, requires_grad=True)
        dy = torch.randn(n, c, side, side)
        stats, sums = torch.randn(3, c), torch.randn(2, c)

        def collectives(stats: torch.Tensor = stats, sums: torch.Tensor = sums) -> None:
            all_gather_tensor(stats)
            all_reduce_sum(sums)

        cases = {
            "local": train_step(BatchNorm2d(c), x, dy),
            "sync": train_step(SyncBatchNorm(c), x, dy),
            "collectives": collectives,
        }
        t = time_alternated(cases, repeats, warmup)
        rows.append(
            {
                "per_rank_shape": f"{n}x{c}x{side}x{side}",
                "local_ms": 1e3 * t["local"],
                "sync_ms": 1e3 * t["sync"],
                "collectives_ms": 1e3 * t["collectives"],
                "sync/local": t["sync"] / t["local"],
                "(sync-collectives)/local": (t["sync"] - t["collectives"]) / t["local"],
            }
        )
    return rows


def sync_suite(args: argparse.Namespace) -> dict[str, Any]:
    shapes = [(n // WORLD, c, s) for n, c, s in resnet20_shapes(args.quick)]
    rows = spawn_gloo(
        _sync_rows,
        WORLD,
        shapes,
        args.repeats,
        args.warmup,
        timeout_s=120,
        threads=max(1, (os.cpu_count() or 2) // WORLD),
    )[0]
    return {
        "rows": rows,
        "summary": [
            f"SyncBatchNorm over {WORLD} gloo ranks (one process each) vs local BN on the "
            "same per-rank batch; ratios include the collectives' latency, measured alone "
            "(one all_gather of 3xC and one all_reduce of 2xC values) as collectives_ms"
        ],
    }
