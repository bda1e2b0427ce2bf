"""``bnorm bench fold``: bnorm.fold against the unfolded model and torch.fx's fuse, on
ResNet-20 and on the batch-norm vision models of Hugging Face transformers (when it
imports)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch.fx.experimental.optimization import fuse

from ..testing import ResNet20, randomize_statistics, time_alternated
from ..tools import fold
from .report import format_table

FOLD_BATCHES = (1, 64)
REAL_MODEL_BATCHES = (1, 32)
FOLD_TARGET_BATCH1 = 0.8  # the bar: folded <= 0.8x unfolded at batch 1
FOLD_TARGET_BATCH64 = 1.0  # and never slower at batch 64


def transformers_models() -> dict[str, Callable[[], torch.nn.Module]]:
    """The batch-norm vision models of Hugging Face ``transformers`` in tiny configs, built
    from their config classes with random weights (no download), for 3×32×32 images and 3
    classes; empty when transformers does not import. Each factory returns a fresh model
    in training mode (seeded: the same weights every call)."""
    try:
        hf: Any = importlib.import_module("transformers")  # Any: its stubs are loose
    except ImportError:
        return {}
    configs: dict[str, Callable[[], tuple[Any, Any]]] = {
        "ResNet": lambda: (
            hf.ResNetForImageClassification,
            hf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
        ),
        "MobileNetV1": lambda: (
            hf.MobileNetV1ForImageClassification,
            hf.MobileNetV1Config(depth_multiplier=0.25, image_size=32, num_labels=3),
        ),
        "MobileNetV2": lambda: (
            hf.MobileNetV2ForImageClassification,
            hf.MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=3),
        ),
        "EfficientNet": lambda: (
            hf.EfficientNetForImageClassification,
            # hidden_dim: the channels of the top conv, round_filters(1280) at width 0.25
            hf.EfficientNetConfig(
                width_coefficient=0.25,
                depth_coefficient=0.25,
                image_size=32,
                hidden_dim=320,
                num_labels=3,
            ),
        ),
        "RegNet": lambda: (
            hf.RegNetForImageClassification,
            hf.RegNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3
            ),
        ),
        "LeViT": lambda: (
            hf.LevitForImageClassification,
            hf.LevitConfig(
                image_size=32,
                hidden_sizes=[16, 32, 48],
                num_attention_heads=[1, 2, 3],
                depths=[1, 1, 1],
                key_dim=[8, 8, 8],
                num_labels=3,
            ),
        ),
        "MobileViT": lambda: (
            hf.MobileViTForImageClassification,
            hf.MobileViTConfig(
                image_size=32,
                hidden_sizes=[16, 24, 32],
                neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
                num_labels=3,
            ),
        ),
    }

    def factory(make: Callable[[], tuple[Any, Any]]) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            torch.manual_seed(0)
            cls, config = make()
            model = cls(config)
            with torch.no_grad():  # transformers zero-initializes some heads: random instead
                for p in model.parameters():
                    if p.dim() >= 2 and not p.any():
                        p.normal_(0.0, p.shape[1] ** -0.5)
            return model  # type: ignore[no-any-return]

        return build

    return {name: factory(make) for name, make in configs.items()}


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
    Third (when transformers imports): :func:`transformers_models`, each folded with an
    example input, layers folded and folded/unfolded latency at batch 1 and 32.
    """
    batches = (1, 8) if args.quick else FOLD_BATCHES
    faults = _PageFaults()
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
            row, line, met = _model_row(args, faults, norm, variants, batch)
            rows.append(row)
            summary.append(line)
            checks.append(met)
    conv_rows = [row for batch in batches for row in _conv_rows(args, faults, batch)]
    summary.append(_conv_summary(conv_rows))
    real_rows = _real_model_rows(args, faults)
    if real_rows:
        summary.append(
            "transformers' batch-norm vision models (tiny configs, random weights), "
            "bnorm.fold(model, example_inputs=(x,)):\n" + format_table(real_rows)
        )
    else:
        summary.append("transformers is not installed: no real-model rows")
    summary.append(
        "all goals met"
        if all(checks)
        else "some goals missed (timings on a shared machine are noisy)"
    )
    return {"rows": rows, "conv_rows": conv_rows, "real_rows": real_rows, "summary": summary}


try:
    import resource

    def _minor_faults() -> int:
        """Minor page faults of this process so far."""
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

except ImportError:  # not on Unix: no page-fault counts

    def _minor_faults() -> int:
        return 0


class _PageFaults:
    """Timed forwards that also count the minor page faults they cause, by name."""

    def __init__(self) -> None:
        self.tally: dict[str, list[int]] = {}  # name -> [page faults, forwards]

    def forward(
        self, model: torch.nn.Module, x: torch.Tensor, loops: int, name: str = ""
    ) -> Callable[[], None]:
        """A case for time_alternated: ``loops`` forwards of ``model`` on ``x``."""
        tally = self.tally.setdefault(name, [0, 0])

        def run() -> None:
            before = _minor_faults()
            with torch.no_grad():
                for _ in range(loops):
                    model(x)
            tally[0] += _minor_faults() - before
            tally[1] += loops

        return run

    def per_forward(self) -> dict[str, int]:
        return {name: f // max(n, 1) for name, (f, n) in self.tally.items()}


def _check_outputs(variants: dict[str, torch.nn.Module], x: torch.Tensor) -> None:
    """Every variant gives the unfolded model's outputs (relative error <= 1e-5)."""
    with torch.no_grad():
        reference = variants["unfolded"](x)
        for name, variant in variants.items():
            err = float((variant(x) - reference).abs().max() / reference.abs().max())
            if err > 1e-5:
                raise RuntimeError(f"{name} changed the outputs (relative error {err:.2e})")


def _model_row(
    args: argparse.Namespace,
    faults: _PageFaults,
    norm: str,
    variants: dict[str, torch.nn.Module],
    batch: int,
) -> tuple[dict[str, object], str, bool]:
    """Time the model's variants at one batch size: the row, its summary line, and
    whether the folded model met its goal."""
    x = torch.randn(batch, 3, 32, 32)
    loops = 20 if batch == 1 else 1
    _check_outputs(variants, x)
    faults.tally.clear()
    t = time_alternated(
        {name: faults.forward(v, x, loops, name) for name, v in variants.items()},
        args.repeats,
        args.warmup,
    )
    per_forward = faults.per_forward()
    fx = "fx fuse" in t
    row: dict[str, object] = {
        "model": f"ResNet-20 ({norm} BN)",
        "batch": batch,
        "unfolded_ms": 1e3 * t["unfolded"] / loops,
        "folded_ms": 1e3 * t["bnorm.fold"] / loops,
        "fx_fuse_ms": 1e3 * t["fx fuse"] / loops if fx else None,
        "folded/unfolded": t["bnorm.fold"] / t["unfolded"],
        "fx/unfolded": t["fx fuse"] / t["unfolded"] if fx else None,
        "page_faults/forward": "/".join(str(per_forward[name]) for name in variants),
    }
    target = FOLD_TARGET_BATCH1 if batch == 1 else FOLD_TARGET_BATCH64
    ratio = t["bnorm.fold"] / t["unfolded"]
    line = (
        f"{row['model']}, batch {batch}: folded {ratio:.3f}x unfolded "
        f"(goal <= {target:.2f}x: {'met' if ratio <= target else 'missed'})"
        + (f"; fx fuse {t['fx fuse'] / t['unfolded']:.3f}x" if fx else "")
    )
    return row, line, ratio <= target


def _real_model_rows(args: argparse.Namespace, faults: _PageFaults) -> list[dict[str, object]]:
    """One row per model of :func:`transformers_models` and batch size: batch-norm layers,
    how many ``bnorm.fold`` folds with an example input (the torch.export graph) and
    without one (torch.fx and nn.Sequential order only), and the
    latency of the folded against the unfolded model (eval, no_grad, 3×32×32 inputs)."""
    rows: list[dict[str, object]] = []
    batches = (1,) if args.quick else REAL_MODEL_BATCHES
    for name, make in transformers_models().items():
        model = randomize_statistics(make())
        x = torch.randn(1, 3, 32, 32)
        folded, report = fold(model, example_inputs=(x,), return_report=True)
        _, without_example = fold(model, return_report=True)  # torch.fx and Sequential only
        layers = len(report.folded) + len(report.not_folded)
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            variants: dict[str, torch.nn.Module] = {
                "unfolded": _Logits(model),
                "bnorm.fold": _Logits(folded),
            }
            _check_outputs(variants, x)
            loops = 10 if batch == 1 else 1
            t = time_alternated(
                {k: faults.forward(v, x, loops, k) for k, v in variants.items()},
                args.repeats,
                args.warmup,
            )
            rows.append(
                {
                    "model": name,
                    "bn_layers": layers,
                    "folded": len(report.folded),
                    "folded_no_example": len(without_example.folded),
                    "batch": batch,
                    "unfolded_ms": 1e3 * t["unfolded"] / loops,
                    "folded_ms": 1e3 * t["bnorm.fold"] / loops,
                    "folded/unfolded": t["bnorm.fold"] / t["unfolded"],
                }
            )
    return rows


class _Logits(torch.nn.Module):
    """A model that returns a ModelOutput, as one that returns its logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits  # type: ignore[no-any-return]


def _conv_rows(
    args: argparse.Namespace, faults: _PageFaults, batch: int
) -> list[dict[str, object]]:
    """Is a conv with bias slower than a bias-free conv + batch norm here? One row per
    ResNet-20 conv shape."""
    rows: list[dict[str, object]] = []
    for channels, side in ((16, 32), (32, 16), (64, 8)):
        torch.manual_seed(0)
        x = torch.randn(batch, channels, side, side)
        with_bias = torch.nn.Conv2d(channels, channels, 3, 1, 1, bias=True).eval()
        no_bias = torch.nn.Conv2d(channels, channels, 3, 1, 1, bias=False).eval()
        conv_bn = torch.nn.Sequential(no_bias, randomize_statistics(torch.nn.BatchNorm2d(channels)))
        loops = 20 if batch == 1 else 1
        t = time_alternated(
            {
                "bias": faults.forward(with_bias, x, loops),
                "conv+bn": faults.forward(conv_bn, x, loops),
                "no bias": faults.forward(no_bias, x, loops),
            },
            args.repeats,
            args.warmup,
        )
        rows.append(
            {
                "conv": f"{channels}->{channels} 3x3 @{side}x{side}",
                "batch": batch,
                "bias_us": 1e6 * t["bias"] / loops,
                "conv+bn_us": 1e6 * t["conv+bn"] / loops,
                "no_bias_us": 1e6 * t["no bias"] / loops,
                "bias/(conv+bn)": t["bias"] / t["conv+bn"],
            }
        )
    return rows


def _conv_summary(conv_rows: list[dict[str, object]]) -> str:
    slower = [r for r in conv_rows if float(r["bias/(conv+bn)"]) > 1.0]  # type: ignore[arg-type]
    return (
        "conv with bias vs bias-free conv + BN, per ResNet-20 shape:\n"
        + format_table(conv_rows)
        + (
            "\n=> the folded form (conv with bias) is the faster one in every case"
            if not slower
            else f"\n=> conv with bias is slower in {len(slower)} case(s): see rows"
        )
    )
