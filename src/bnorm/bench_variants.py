"""``bnorm bench variants`` and ``bnorm bench sync``: the cost of BN's variants.

* variants — forward+backward of Batch Renorm, ghost and masked BN relative to plain
  bnorm BN, at ResNet-20 shapes (target ≤ 1.2×).
* sync — SyncBatchNorm over 2 gloo ranks (processes on this machine) relative to local
  bnorm BN on the same per-rank batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .bench import register, time_alternated
from .distributed import all_gather_tensor, all_reduce_sum
from .functional import Renorm
from .modules import BatchNorm2d, SyncBatchNorm

# ResNet-20 on CIFAR: batch 128, (channels, side) of its three stages.
RESNET20_SHAPES = [(128, 16, 32), (128, 32, 16), (128, 64, 8)]


def _shapes(quick: bool) -> list[tuple[int, int, int]]:
    return [(16, c, s) for _, c, s in RESNET20_SHAPES] if quick else RESNET20_SHAPES


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, **kw: Any) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        layer(x, **kw).backward(dy)

    return run


@register("variants")
def variants_suite(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    worst = 0.0
    for n, c, side in _shapes(args.quick):
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
        cases = {
            "plain": _step(plain, x, dy),
            "renorm": _step(renorm, x, dy),
            "ghost": _step(ghost, x, dy),
            "masked": _step(plain, x, dy, mask=mask),
        }
        t = time_alternated(cases, args.repeats, args.warmup)
        row: dict[str, Any] = {"shape": f"{n}x{c}x{side}x{side}", "plain_ms": 1e3 * t["plain"]}
        for name in ("renorm", "ghost", "masked"):
            ratio = t[name] / t["plain"]
            row[f"{name}/plain"] = ratio
            worst = max(worst, ratio)
        rows.append(row)
    return {
        "rows": rows,
        "summary": [f"worst variant/plain ratio: {worst:.2f}x (target <= 1.2x)"],
        "ghost_virtual_batch_size": "batch/4",
        "mask_valid_fraction": 0.9,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sync_worker(rank: int, world: int, port: int, out: str, shapes: list, repeats: int, warmup: int) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
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
                "local": _step(BatchNorm2d(c), x, dy),
                "sync": _step(SyncBatchNorm(c), x, dy),
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
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


@register("sync")
def sync_suite(args: argparse.Namespace) -> dict[str, Any]:
    import torch.multiprocessing as mp

    world = 2
    shapes = [(n // world, c, s) for n, c, s in _shapes(args.quick)]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.pt")
        mp.spawn(
            _sync_worker,
            args=(world, _free_port(), out, shapes, args.repeats, args.warmup),
            nprocs=world,
            join=True,
        )
        rows = torch.load(out, weights_only=False)
    return {
        "rows": rows,
        "summary": [
            f"SyncBatchNorm over {world} gloo ranks (one process each) vs local BN on the "
            "same per-rank batch; ratios include the collectives' latency, measured alone "
            "(one all_gather of 3xC and one all_reduce of 2xC values) as collectives_ms"
        ],
    }
