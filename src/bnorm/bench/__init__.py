"""Benchmarks behind ``bnorm bench``: ratios against the peer measured in the same run.

Each suite is a function ``suite(args) -> dict`` listed in :data:`SUITES`; it returns
a JSON-serialisable result with a ``"rows"`` list (one dict per measured case) and
``"machine"`` facts. ``bnorm bench SUITE`` prints the table and writes the JSON.
Timings are medians of alternated runs (ours, theirs, ours, ...) in one process, so
both sides see the same machine state (:func:`bnorm.testing.time_alternated`).

Modules: ``layer`` (bnorm.BatchNorm2d vs torch's), ``fold`` (bnorm.fold's inference
latency), ``kernels`` (the fused kernels: layer, bandwidth, model, memory; on a GPU),
``variants`` (renorm, ghost, mask vs plain), ``sync`` (SyncBatchNorm over gloo ranks);
``report`` (machine facts, tables).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .fold import fold_suite
from .kernels import kernels_suite
from .layer import layer_suite
from .report import format_table, machine_info
from .sync import sync_suite
from .variants import variants_suite

Suite = Callable[[argparse.Namespace], dict[str, Any]]

# The suites by name, a static table: ``bnorm bench NAME`` runs one, ``bnorm bench all``
# each, in sorted order.
SUITES: dict[str, Suite] = {
    "fold": fold_suite,
    "kernels": kernels_suite,
    "layer": layer_suite,
    "sync": sync_suite,
    "variants": variants_suite,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "suite",
        nargs="?",
        default="all",
        help="which benchmark to run: 'all' or one of the suites "
        "(see the list printed by `bnorm bench list`)",
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed runs per side (median taken)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per side first")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases (a smoke run)")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the JSON result here (default: print only)"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="'cuda' (or 'cuda:N'): run `bnorm bench kernels` on the GPU against cuDNN's "
        "batch norm; default: the CPU benchmarks",
    )


def _check_device(args: argparse.Namespace) -> str | None:
    """Why ``--device`` cannot be used as given, or None."""
    device = getattr(args, "device", None)
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        return f"expected --device cpu or cuda[:N] (got {device!r})"
    if dev.type == "cpu":
        return None
    if args.suite != "kernels":
        return f"expected the suite 'kernels' with --device {device} (got {args.suite!r})"
    if not torch.cuda.is_available():
        return (
            f"expected a CUDA device for --device {device} "
            "(got torch.cuda.is_available() False)"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"expected a CUDA device index < {torch.cuda.device_count()} (got {device!r})"
    return None


def main(args: argparse.Namespace) -> int:
    if args.suite == "list":
        print("\n".join(sorted(SUITES)))
        return 0
    if args.suite != "all" and args.suite not in SUITES:
        print(
            f"bnorm bench: unknown suite {args.suite!r} "
            f"(expected 'all' or one of {sorted(SUITES)})"
        )
        return 2
    if args.repeats < 1 or args.warmup < 0:
        print(
            "bnorm bench: expected --repeats >= 1 and --warmup >= 0 "
            f"(got {args.repeats}, {args.warmup})"
        )
        return 2
    error = _check_device(args)
    if error:
        print(f"bnorm bench: {error}")
        return 2
    names = sorted(SUITES) if args.suite == "all" else [args.suite]
    results: dict[str, Any] = {"machine": machine_info(), "suites": {}}
    for name in names:
        result = SUITES[name](args)
        results["suites"][name] = result
        print(f"\n== {name} ==")
        print(format_table(result.get("rows", [])))
        for line in result.get("summary", []):
            print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(args.out)
        print(f"\nwrote {args.out}")
    return 0
