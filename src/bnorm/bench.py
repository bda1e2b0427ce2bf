"""Benchmarks behind ``bnorm bench``: ratios against the peer measured in the same run.

Each suite is a function ``suite(args) -> dict`` registered in :data:`SUITES`; it returns
a JSON-serialisable result with a ``"rows"`` list (one dict per measured case) and
``"machine"`` facts. ``bnorm bench SUITE`` prints the table and writes the JSON.
Timings are medians of alternated runs (ours, theirs, ours, ...) in one process, so
both sides see the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

Suite = Callable[[argparse.Namespace], dict[str, Any]]

SUITES: dict[str, Suite] = {}


def register(name: str) -> Callable[[Suite], Suite]:
    """Decorator: make ``fn`` available as ``bnorm bench NAME``."""

    def wrap(fn: Suite) -> Suite:
        SUITES[name] = fn
        return fn

    return wrap


def time_alternated(
    cases: Mapping[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each case, the cases run in turn (a, b, a, b, ...) so
    that every case sees the same machine state; ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table with one column per key of the first row."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "suite",
        nargs="?",
        default="all",
        help="which benchmark to run: 'all' or one of the registered suites "
        "(see the list printed by `bnorm bench list`)",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per side (median taken)")
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


def _load_suites() -> None:
    # Suites register themselves on import; keep the import here so `bnorm --help` stays fast.
    from . import bench_kernels, bench_suites, bench_variants  # noqa: F401


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
        return f"expected a CUDA device for --device {device} (got torch.cuda.is_available() False)"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"expected a CUDA device index < {torch.cuda.device_count()} (got {device!r})"
    return None


def main(args: argparse.Namespace) -> int:
    _load_suites()
    if args.suite == "list":
        print("\n".join(sorted(SUITES)))
        return 0
    if args.suite != "all" and args.suite not in SUITES:
        print(f"bnorm bench: unknown suite {args.suite!r} (expected 'all' or one of {sorted(SUITES)})")
        return 2
    if args.repeats < 1 or args.warmup < 0:
        print(f"bnorm bench: expected --repeats >= 1 and --warmup >= 0 (got {args.repeats}, {args.warmup})")
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
