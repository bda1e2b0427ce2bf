"""``bnorm bench fold``: bnorm.fold against the unfolded model and torch.fx's fuse."""

from __future__ import annotations

import argparse

import torch
from torch.fx.experimental.optimization import fuse

from ..testing import ResNet20, randomize_statistics, time_alternated
from ..tools import fold
from .report import format_table

FOLD_BATCHES = (1, 64)
FOLD_TARGET_BATCH1 = 0.8  # the bar: folded <= 0.8x unfolded at batch 1
FOLD_TARGET_BATCH64 = 1.0  # and never slower at batch 64


def fold_suite(args: argparse.Namespace) -> dict[str, object]:
    """Inference latency of ResNet-20 (CIFAR, 32×32) folded by ``bnorm.fold`` against the
    unfolded model and ``torch.fx.experimental.optimization.fuse``, at batch 1 and 64.

    Each timed sample runs every variant in turn (unfolded, bnorm.fold, fx fuse) under
    ``torch.no_grad()``; batch-1 samples are 20 forwards each. Ratios are of medians.
    ``page_faults/forward`` (unfolded/folded/fx): minor page faults per forward — at batch
    64 the activations are MiB-sized, and whether glibc's malloc hands back memory it
    already touched or freshly mapped pages (trimmed and re-grown heap) swings a forward
    by up to ~2x from one process to the next, independently of the arithmetic; read the
    batch-64 ratios together with this column.
    Second table: one conv of each ResNet-20 shape, with bias (what folding produces)
    against bias-free conv followed by an eval batch norm (what it replaces).
    """
    try:
        import resource

        def minor_faults() -> int:
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except ImportError:  # not on Unix: no page-fault counts

        def minor_faults() -> int:
            return 0

    faults: dict[str, list[int]] = {}  # name -> [page faults, forwards]

    def forward(model: torch.nn.Module, x: torch.Tensor, loops: int, name: str = ""):
        tally = faults.setdefault(name, [0, 0])

        def run() -> None:
            before = minor_faults()
            with torch.no_grad():
                for _ in range(loops):
                    model(x)
            tally[0] += minor_faults() - before
            tally[1] += loops

        return run

    batches = (1, 8) if args.quick else FOLD_BATCHES
    rows: list[dict[str, object]] = []
    summary: list[str] = []
    checks: list[bool] = []
    for norm in ("torch", "bnorm"):
        torch.manual_seed(0)
        model = randomize_statistics(ResNet20(norm))
        variants = {"unfolded": model, "bnorm.fold": fold(model)}
        if norm == "torch":
            variants["fx fuse"] = fuse(model)
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            loops = 20 if batch == 1 else 1
            with torch.no_grad():
                reference = model(x)
                for name, variant in variants.items():
                    err = float((variant(x) - reference).abs().max() / reference.abs().max())
                    if err > 1e-5:
                        raise RuntimeError(f"{name} changed the outputs (relative error {err:.2e})")
            faults.clear()
            t = time_alternated(
                {name: forward(v, x, loops, name) for name, v in variants.items()},
                args.repeats,
                args.warmup,
            )
            per_forward = {name: f // max(n, 1) for name, (f, n) in faults.items()}
            row: dict[str, object] = {
                "model": f"ResNet-20 ({norm} BN)",
                "batch": batch,
                "unfolded_ms": 1e3 * t["unfolded"] / loops,
                "folded_ms": 1e3 * t["bnorm.fold"] / loops,
                "fx_fuse_ms": 1e3 * t["fx fuse"] / loops if "fx fuse" in t else None,
                "folded/unfolded": t["bnorm.fold"] / t["unfolded"],
                "fx/unfolded": t["fx fuse"] / t["unfolded"] if "fx fuse" in t else None,
                "page_faults/forward": "/".join(str(per_forward[name]) for name in variants),
            }
            rows.append(row)
            target = FOLD_TARGET_BATCH1 if batch == 1 else FOLD_TARGET_BATCH64
            ratio = t["bnorm.fold"] / t["unfolded"]
            checks.append(ratio <= target)
            summary.append(
                f"{row['model']}, batch {batch}: folded {ratio:.3f}x unfolded "
                f"(goal <= {target:.2f}x: {'met' if ratio <= target else 'missed'})"
                + (f"; fx fuse {t['fx fuse'] / t['unfolded']:.3f}x" if "fx fuse" in t else "")
            )

    # Is a conv with bias slower than a bias-free conv + batch norm here?
    conv_rows: list[dict[str, object]] = []
    for batch in batches:
        for channels, side in ((16, 32), (32, 16), (64, 8)):
            torch.manual_seed(0)
            x = torch.randn(batch, channels, side, side)
            with_bias = torch.nn.Conv2d(channels, channels, 3, 1, 1, bias=True).eval()
            no_bias = torch.nn.Conv2d(channels, channels, 3, 1, 1, bias=False).eval()
            norm_layer = randomize_statistics(torch.nn.BatchNorm2d(channels))
            loops = 20 if batch == 1 else 1

            def conv_bn(x: torch.Tensor = x, c=no_bias, b=norm_layer) -> torch.Tensor:
                return b(c(x))

            wrapped = torch.nn.Module()
            wrapped.forward = conv_bn  # type: ignore[method-assign]
            t = time_alternated(
                {
                    "bias": forward(with_bias, x, loops),
                    "conv+bn": forward(wrapped, x, loops),
                    "no bias": forward(no_bias, x, loops),
                },
                args.repeats,
                args.warmup,
            )
            conv_rows.append(
                {
                    "conv": f"{channels}->{channels} 3x3 @{side}x{side}",
                    "batch": batch,
                    "bias_us": 1e6 * t["bias"] / loops,
                    "conv+bn_us": 1e6 * t["conv+bn"] / loops,
                    "no_bias_us": 1e6 * t["no bias"] / loops,
                    "bias/(conv+bn)": t["bias"] / t["conv+bn"],
                }
            )
    slower = [r for r in conv_rows if float(r["bias/(conv+bn)"]) > 1.0]  # type: ignore[arg-type]
    summary.append(
        "conv with bias vs bias-free conv + BN, per ResNet-20 shape:\n"
        + format_table(conv_rows)
        + (
            "\n=> the folded form (conv with bias) is the faster one in every case"
            if not slower
            else f"\n=> conv with bias is slower in {len(slower)} case(s): see rows"
        )
    )
    summary.append(
        "all goals met"
        if all(checks)
        else "some goals missed (timings on a shared machine are noisy)"
    )
    return {"rows": rows, "conv_rows": conv_rows, "summary": summary}
