"""The suites of ``bnorm bench``; each registers itself with :func:`bnorm.bench.register`."""

from __future__ import annotations

from .bench import register

# --- layer: bnorm.BatchNorm2d vs torch.nn.BatchNorm2d ---------------------------------
# (Imports are local so that suites appended by different hands need no shared header.)

LAYER_SHAPES = [(128, 16, 32), (128, 32, 16), (128, 64, 8)]  # ResNet-20: N, C, side
LAYER_TARGET = 1.05  # the bar: bnorm at most 5% slower than torch


@register("layer")
def layer_suite(args) -> dict[str, object]:  # args: argparse.Namespace of bnorm.bench
    """Forward+backward in training of one ``bnorm.BatchNorm2d`` against one
    ``torch.nn.BatchNorm2d`` at the ResNet-20 shapes, NCHW and channels_last.

    Each timed sample is one step (x.grad, parameter grads cleared; forward; backward with
    a fixed upstream gradient) of each layer in turn, so both see the same machine state;
    the ratio is median(bnorm)/median(torch). ``--quick`` uses batch 16.
    """
    import math

    import torch

    from .bench import time_alternated
    from .modules import BatchNorm2d

    def step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):  # -> () -> None
        def run() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)

        return run

    rows: list[dict[str, object]] = []
    ratios: list[float] = []
    for n, c, side in LAYER_SHAPES:
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
    overall = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
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


# --- fold: bnorm.fold vs unfolded vs torch.fx.experimental.optimization.fuse ----------

FOLD_BATCHES = (1, 64)
FOLD_TARGET_BATCH1 = 0.8  # the bar: folded <= 0.8x unfolded at batch 1
FOLD_TARGET_BATCH64 = 1.0  # and never slower at batch 64


def cifar_resnet20(norm: str = "torch", num_classes: int = 10):  # -> torch.nn.Module
    """ResNet-20 for 32×32 CIFAR images (He et al. 2016, §4.2): a 3×3 conv to 16
    channels, three stages of three basic blocks (16, 32, 64 channels; stride 2 at the
    start of stages 2 and 3; identity shortcuts with zero-padded channels, option A),
    global average pooling and a linear classifier; 0.27M parameters. Every conv is
    bias-free and followed by a batch norm: torch's (``norm="torch"``) or bnorm's
    (``norm="bnorm"``). Shape: (N, 3, 32, 32) -> (N, num_classes)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from .modules import BatchNorm2d

    if norm not in ("torch", "bnorm"):
        raise ValueError(f"expected norm 'torch' or 'bnorm' (got {norm!r})")
    bn = nn.BatchNorm2d if norm == "torch" else BatchNorm2d

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = bn(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = bn(cout)
            self.stride = stride
            self.extra = cout - cin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x
            if self.stride != 1 or self.extra:
                shortcut = x[:, :, :: self.stride, :: self.stride]
                half = self.extra // 2
                shortcut = F.pad(shortcut, (0, 0, 0, 0, half, self.extra - half))
            return F.relu(out + shortcut)

    class ResNet20(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn = bn(16)
            blocks, cin = [], 16
            for cout, stride in ((16, 1), (32, 2), (64, 2)):
                for i in range(3):
                    blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                    cin = cout
            self.layers = nn.Sequential(*blocks)
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.bn(self.conv(x)))
            x = self.layers(x)
            return self.fc(x.mean(dim=(2, 3)))

    return ResNet20()


def _trained_looking(model):  # -> model, in eval mode with non-trivial statistics
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)
    return model.eval()


@register("fold")
def fold_suite(args) -> dict[str, object]:  # args: argparse.Namespace of bnorm.bench
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
    import torch
    from torch.fx.experimental.optimization import fuse

    from .bench import format_table, time_alternated
    from .tools.fold import fold

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
        model = _trained_looking(cifar_resnet20(norm))
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
            norm_layer = _trained_looking(torch.nn.BatchNorm2d(channels))
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
        "all goals met" if all(checks) else "some goals missed (timings on a shared machine are noisy)"
    )
    return {"rows": rows, "conv_rows": conv_rows, "summary": summary}
