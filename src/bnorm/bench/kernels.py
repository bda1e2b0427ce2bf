"""``bnorm bench kernels``: the fused BN + activation (+ residual) kernels against PyTorch.

Five parts, every timing a median of alternated runs in one process (see
:func:`bnorm.testing.time_alternated`), each sample right after an untimed call of the
same case (``settle``: its allocations meet the heap its own previous call left, as in a
training loop — otherwise the glibc allocator's state after the other case decides how
many fresh pages a call faults in, which moved single timings by up to 2×; the page
faults per call are reported):

* layer — forward+backward in training of BN+ReLU and BN+add+ReLU at ResNet-20 shapes
  (N=128; C=16/32/64 at 32²/16²/8²) and one DRAM-bound shape (512×64×8×8, 8 MB per
  tensor), NCHW and channels_last: ``bnorm.BatchNormAct2d``
  against torch eager (``nn.BatchNorm2d`` then ``torch.relu``, out of place; target
  ≤ 0.5×) and against ``torch.compile`` of the same torch ops (target ≤ 1.0×);
* bound — each shape's fused fwd+bwd (the Function forced, whatever size the layer would
  run it from) against its minimal traffic: the passes over one activation-sized tensor
  that its kernels must make (forward 3, 4 with a residual; backward 5, 7 with a
  residual) at the bandwidth of a copy whose source and destination together are the
  same working set, timed among the layers (same cache state): ``achieved/bound`` is 1.0
  when the kernels move that traffic at the copy's speed; ``bound/eager`` is the least
  bnorm/eager that traffic allows. The fixed-cost columns time each shape's channels and
  size at batch 2: torch eager, the layer as shipped (torch's own ops there, see
  :func:`bnorm.kernels.fused_pays`) and the fused Function forced;
* small batches — BN+add+ReLU at batches 2-32 of the same shapes: the layer as shipped
  (fused kernels or torch's ops by size) against torch eager (target ≤ 1.1×);
* model — a CIFAR ResNet-20 training step (32×32, SGD; batch 16 and 128 in eager mode,
  128 under ``torch.compile(model)``): bnorm layers vs torch layers (target ≤ 0.75×), and
  the BN step over the same network without BN (target ≤ 1.10×; the time BN adds,
  bnorm's over torch's: target ≤ 1/3), with quartiles and page faults per step, and in
  eager mode the same step with every fused layer replaced by a :class:`StreamingFloor`
  (the kernels' minimal passes as ATen streaming ops in a Python Function: the floor of
  both ratios at this machine's speed);
* memory — bytes saved for backward (:func:`bnorm.testing.saved_tensor_bytes`) per
  conv→BN→act block and per ResNet-20, relative to one activation / to torch; ResNet-20
  (ReLU) in a :func:`bnorm.memory_saving` scope (target ≤ 0.6× torch), with the most its
  hooks hold during backward, and :func:`torch.compile` of the torch model (what its
  partitioner saves); the training-step time of the scope against plain bnorm (batch 32,
  alternated).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ..kernels import bn_act, native
from ..kernels.memory import memory_saving
from ..modules import BatchNormAct2d
from ..testing import (
    RESNET20_SHAPES,
    ResNet20,
    TorchTail,
    geometric_mean,
    saved_tensor_bytes,
    time_alternated,
    time_alternated_samples,
)
from .report import format_table

LAYER_TARGET_EAGER = 0.5
LAYER_TARGET_COMPILED = 1.0
MODEL_TARGET_TORCH = 0.75
MODEL_TARGET_NO_BN = 1.10
MODEL_TARGET_BN_COST = 1 / 3
MEMORY_TARGET_BLOCK = 2.0
MEMORY_SAVING_TARGET = 0.6


# --- the compared layers -----------------------------------------------------------


def _fwd_bwd(
    layer: nn.Module, x: Tensor, dy: Tensor, residual: Tensor | None, mask: Tensor | None = None
) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        if residual is not None:
            residual.grad = None
        layer.zero_grad(set_to_none=True)
        if mask is None:
            layer(x, residual).backward(dy)
        else:
            layer(x, residual, mask).backward(dy)

    return run


def _fwd(layer: nn.Module, x: Tensor, residual: Tensor | None) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            layer(x, residual)

    return run


def copy_bandwidth(nbytes: int, repeats: int, warmup: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (one read and one write of ``nbytes``), the
    copy repeated alone (so a small tensor stays in the cache: an upper bound)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    t = time_alternated({"copy": lambda: dst.copy_(src)}, repeats, warmup)["copy"]
    return 2 * nbytes / t


def _copy_case(nbytes: int) -> Callable[[], None]:
    """``dst.copy_(src)`` to time among the kernels: alternated with them it sees the same
    cache state, so its bandwidth is the fair yardstick for theirs."""
    src = torch.randn(nbytes // 4)
    return _copy_of(src, torch.empty_like(src))


def _copy_of(src: Tensor, dst: Tensor) -> Callable[[], None]:
    def run() -> None:
        dst.copy_(src)

    return run


def layer_part(args: argparse.Namespace) -> dict[str, Any]:
    # Every case compiles its own torch baseline (12 cases share TorchTail.forward's code
    # object): above Dynamo's default limit of 8 the later baselines would run eagerly.
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 64)
    try:
        return _layer_part(args)
    finally:
        torch._dynamo.config.recompile_limit = limit


# Each fused kernel's minimal traffic, in passes over one activation-sized tensor
# (docs/kernels.md): the forward reads x for the statistics, then reads x (and r) and
# writes y; the backward reads dy and x (and r) for its sums (writing dr = dz with a
# residual), then reads dy and x (dr and x) again and writes dx.
FWD_PASSES = {"BN+ReLU": 3, "BN+add+ReLU": 4}
BWD_PASSES = {"BN+ReLU": 5, "BN+add+ReLU": 7}
# The distinct activation-sized tensors fwd+bwd touch (x, y, dy, dx; with a residual also
# r and dr): the copy that yardsticks the kernels has this working set.
WORKING_SET = {"BN+ReLU": 4, "BN+add+ReLU": 6}
# The fixed cost is measured at this batch (each shape's channels and size).
FIXED_COST_BATCH = 2
# A DRAM-bound shape (8 MB per tensor; the working sets, 32-48 MB, exceed the caches):
# target <= 0.65x eager, the ratio of minimal passes to torch's.
DRAM_SHAPE = (512, 64, 8)


def _fused_forced(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with the fused Function at every size (see :func:`bnorm.kernels.fused_pays`):
    the kernels' own time and bandwidth, whatever the layer would choose."""

    def run() -> None:
        thresholds = bn_act.FUSED_MIN_NUMEL, bn_act.NATIVE_MIN_NUMEL
        bn_act.FUSED_MIN_NUMEL = bn_act.NATIVE_MIN_NUMEL = 0
        try:
            fn()
        finally:
            bn_act.FUSED_MIN_NUMEL, bn_act.NATIVE_MIN_NUMEL = thresholds

    return run


def _tensors(n: int, c: int, side: int, fmt: torch.memory_format, pattern: str) -> Any:
    torch.manual_seed(0)
    x = torch.randn(n, c, side, side).to(memory_format=fmt).requires_grad_()
    dy = torch.randn(n, c, side, side).to(memory_format=fmt)
    res = None
    if pattern == "BN+add+ReLU":
        res = torch.randn(n, c, side, side).to(memory_format=fmt).requires_grad_()
    return x, dy, res


def _fixed_cost(
    c: int, side: int, fmt: torch.memory_format, pattern: str, args: argparse.Namespace
) -> dict[str, float]:
    """fwd+bwd times (s) at the smallest batch: torch eager, the layer as shipped (which
    runs torch's ops there), the fused Function forced — its fixed cost — and an empty
    Python ``autograd.Function`` with the layer's inputs (``floor``: what any fused
    Function written in Python costs before its kernels run)."""
    x, dy, res = _tensors(FIXED_COST_BATCH, c, side, fmt, pattern)
    eager, ours = TorchTail(c), BatchNormAct2d(c, activation="relu")
    return time_alternated(
        {
            "eager": _fwd_bwd(eager, x, dy, res),
            "bnorm": _fwd_bwd(ours, x, dy, res),
            "fused": _fused_forced(_fwd_bwd(ours, x, dy, res)),
            "floor": _empty_function(ours, x, dy, res),
        },
        max(args.repeats, 20),
        args.warmup,
        settle=1,
    )


class _Empty(torch.autograd.Function):
    """An autograd.Function that saves its inputs and returns fresh outputs, as the fused
    one does, without computing anything: the floor of a Python Function's cost."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor, r: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w, b, r)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w, b, r = ctx.saved_tensors
        dr = None if r is None else torch.empty_like(x)
        return torch.empty_like(x), torch.empty_like(w), torch.empty_like(b), dr


def _empty_function(
    layer: nn.Module, x: Tensor, dy: Tensor, residual: Tensor | None
) -> Callable[[], None]:
    weight, bias = layer.weight, layer.bias

    def run() -> None:
        x.grad = None
        if residual is not None:
            residual.grad = None
        layer.zero_grad(set_to_none=True)
        _Empty.apply(x, weight, bias, residual).backward(dy)

    return run


def _layer_part(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    shapes = RESNET20_SHAPES if args.quick else [*RESNET20_SHAPES, DRAM_SHAPE]
    for n, c, side in shapes:
        n = 16 if args.quick else n
        nbytes = n * c * side * side * 4
        copy_bps = copy_bandwidth(nbytes, args.repeats, args.warmup)
        for layout in ("NCHW", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for pattern in ("BN+ReLU", "BN+add+ReLU"):
                x, dy, res = _tensors(n, c, side, fmt, pattern)
                eager, ours = TorchTail(c), BatchNormAct2d(c, activation="relu")
                compiled = cast(nn.Module, torch.compile(TorchTail(c)))
                # A copy whose source and destination together are the kernels' working
                # set, timed among them: the same cache effects, so a fair yardstick.
                half = WORKING_SET[pattern] * nbytes // 2
                t = time_alternated(
                    {
                        "eager": _fwd_bwd(eager, x, dy, res),
                        "compiled": _fwd_bwd(compiled, x, dy, res),
                        # Not reported: the case right after the compiled baseline (13-50
                        # ms here) ran ~15% slow even settled, and that case was bnorm's.
                        "after_compiled": _fwd_bwd(eager, x, dy, res),
                        "bnorm": _fwd_bwd(ours, x, dy, res),
                        "fused": _fused_forced(_fwd_bwd(ours, x, dy, res)),
                        "fused_fwd": _fused_forced(_fwd(ours, x, res)),
                        "copy": _copy_case(half),
                    },
                    args.repeats,
                    args.warmup,
                    settle=1,
                )
                faults = [_page_faults(_fwd_bwd(m, x, dy, res)) for m in (eager, ours)]
                small = _fixed_cost(c, side, fmt, pattern, args)
                fwd_bytes = FWD_PASSES[pattern] * nbytes
                bwd_bytes = BWD_PASSES[pattern] * nbytes
                t_bwd = max(t["fused"] - t["fused_fwd"], 1e-9)
                copy_ws = 2 * half / t["copy"]
                # The least time fwd+bwd can take: the minimal passes at the working-set
                # copy's bandwidth (no fixed cost), and with the measured fixed cost added.
                traffic_s = (fwd_bytes + bwd_bytes) / copy_ws
                rows.append(
                    {
                        "pattern": pattern,
                        "shape": f"{n}x{c}x{side}x{side}",
                        "layout": layout,
                        "eager_ms": 1e3 * t["eager"],
                        "compiled_ms": 1e3 * t["compiled"],
                        "bnorm_ms": 1e3 * t["bnorm"],
                        "fused_ms": 1e3 * t["fused"],
                        "bnorm/eager": t["bnorm"] / t["eager"],
                        "fused/eager": t["fused"] / t["eager"],
                        "bnorm/compiled": t["bnorm"] / t["compiled"],
                        "passes": f"{FWD_PASSES[pattern]}+{BWD_PASSES[pattern]}",
                        "fwd_GB/s": fwd_bytes / t["fused_fwd"] / 1e9,
                        "bwd_GB/s": bwd_bytes / t_bwd / 1e9,
                        "copy_GB/s": copy_bps / 1e9,
                        "copy_ws_GB/s": copy_ws / 1e9,
                        "bound_ms": 1e3 * traffic_s,
                        # achieved/bound: 1.0 = the fused fwd+bwd moved its minimal traffic
                        # at the working-set copy's speed.
                        "achieved/bound": traffic_s / t["fused"],
                        "bound/eager": traffic_s / t["eager"],
                        "fixed_eager_us": 1e6 * small["eager"],
                        "fixed_bnorm_us": 1e6 * small["bnorm"],
                        "fixed_fused_us": 1e6 * small["fused"],
                        "fixed_function_floor_us": 1e6 * small["floor"],
                        "fixed_bnorm/eager": small["bnorm"] / small["eager"],
                        # fresh pages the OS maps in per fwd+bwd (allocations not reused)
                        "faults eager, bnorm": faults,
                    }
                )
    vs_eager = [r["bnorm/eager"] for r in rows]
    vs_compiled = [r["bnorm/compiled"] for r in rows]
    achieved = [r["achieved/bound"] for r in rows]
    bounds = [r["bound/eager"] for r in rows]
    fixed = [r["fixed_bnorm/eager"] for r in rows]
    fixed_fused = [r["fixed_fused_us"] - r["fixed_eager_us"] for r in rows]
    floor = [r["fixed_function_floor_us"] / r["fixed_eager_us"] for r in rows]
    return {
        "rows": rows,
        "summary": [
            f"layer fwd+bwd, bnorm/torch eager: geomean {geometric_mean(vs_eager):.2f}x, worst "
            f"{max(vs_eager):.2f}x (target <= {LAYER_TARGET_EAGER}x)",
            f"layer fwd+bwd, bnorm/torch.compile: geomean {geometric_mean(vs_compiled):.2f}x, "
            "worst "
            f"{max(vs_compiled):.2f}x (target <= {LAYER_TARGET_COMPILED}x)",
            f"bound: the fused kernels' minimal passes at the bandwidth of a copy of the same "
            f"working set take {min(bounds):.2f}..{max(bounds):.2f}x torch eager's time; the "
            f"fused fwd+bwd achieves {min(achieved):.0%}..{max(achieved):.0%} of that bound",
            f"fixed cost (batch {FIXED_COST_BATCH}): bnorm/torch eager "
            f"{min(fixed):.2f}..{max(fixed):.2f}x (target <= 1.0x); the fused Function forced "
            f"there costs {min(fixed_fused):.0f}..{max(fixed_fused):.0f} us more than torch; an "
            f"empty Python autograd.Function with the same inputs alone takes "
            f"{min(floor):.2f}..{max(floor):.2f}x torch eager's whole fwd+bwd",
        ],
    }


# --- small batches ---------------------------------------------------------------------

SMALL_BATCHES = (2, 8, 16, 32)
SMALL_TARGET = 1.1


def small_batch_part(args: argparse.Namespace) -> dict[str, Any]:
    """BN+add+ReLU fwd+bwd at batches 2-32 of the ResNet-20 shapes, both layouts: the
    layer as shipped (which picks the fused kernels or torch's ops by size, see
    :func:`bnorm.kernels.fused_pays`) against torch eager (target ≤ 1.1×; ≤ 1.0× at
    2×64×8×8)."""
    rows: list[dict[str, Any]] = []
    batches = (2, 8) if args.quick else SMALL_BATCHES
    for _, c, side in RESNET20_SHAPES:
        for layout in ("NCHW", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for n in batches:
                x, dy, res = _tensors(n, c, side, fmt, "BN+add+ReLU")
                eager, ours = TorchTail(c), BatchNormAct2d(c, activation="relu")
                inner = max(1, 4096 * 64 // (n * c * side * side))
                t = time_alternated(
                    {"eager": _fwd_bwd(eager, x, dy, res), "bnorm": _fwd_bwd(ours, x, dy, res)},
                    max(args.repeats, 20),
                    args.warmup,
                    inner=inner,
                    settle=1,
                )
                fused = bn_act.fused_pays(x, False, ours._plan.activation, res)
                rows.append(
                    {
                        "shape": f"{n}x{c}x{side}x{side}",
                        "layout": layout,
                        "path": "fused" if fused else "torch ops",
                        "eager_us": 1e6 * t["eager"],
                        "bnorm_us": 1e6 * t["bnorm"],
                        "bnorm/eager": t["bnorm"] / t["eager"],
                    }
                )
    worst = max(rows, key=lambda r: r["bnorm/eager"])
    at_2x64 = [r["bnorm/eager"] for r in rows if r["shape"] == "2x64x8x8"]
    return {
        "rows": rows,
        "summary": [
            f"small batches ({', '.join(map(str, batches))}), BN+add+ReLU fwd+bwd bnorm/torch "
            f"eager: worst {worst['bnorm/eager']:.2f}x at {worst['shape']} {worst['layout']} "
            f"(target <= {SMALL_TARGET}x); at 2x64x8x8 "
            f"{', '.join(f'{v:.2f}x' for v in at_2x64)} (NCHW, channels_last; target <= 1.0x)"
        ],
    }


# --- ResNet-20 -----------------------------------------------------------------------

# The suite's names for bnorm.testing.ResNet20's norms: bnorm's layers here are the fused
# BatchNormAct2d ("bnorm-me": memory-efficient).
RESNET20_NORM = {
    "torch": "torch", "bnorm": "bnorm-act", "bnorm-me": "bnorm-act-me", "none": "none"
}


def _train_step(model: nn.Module, x: Tensor, target: Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        TF.cross_entropy(model(x), target).backward()
        opt.step()

    return run


class _StreamingFloor(torch.autograd.Function):
    """The floor under a fused BN + add + activation layer written as a Python
    ``autograd.Function``: the fused kernels' minimal passes over memory, each one ATen
    streaming op and none doing any of batch norm's arithmetic — forward: a sum of x (the
    statistics' read), then x + r (x without a residual) into y; backward: dy + x·r into dr
    and dr + x into dx with a residual, a dot of dy and x and dy + x into dx without (5 and
    7 passes; the layer's are 3-4 and 5-7). Its outputs are not batch norm's."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None
    ) -> Tensor:
        x.sum()
        y = torch.add(x, residual) if residual is not None else x.clone()
        ctx.save_for_backward(x, residual)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, residual = ctx.saved_tensors
        c = x.shape[1]
        if residual is not None:
            dr = torch.addcmul(dy, x, residual)
            dx = torch.add(dr, x)
        else:
            dr = None
            torch.dot(dy.reshape(-1), x.reshape(-1))
            dx = torch.add(dy, x)
        return dx, x.new_zeros(c), x.new_zeros(c), dr


class StreamingFloor(nn.Module):
    """A stand-in for ``BatchNormAct2d(C)`` that runs :class:`_StreamingFloor`: a ResNet-20
    step with these in place of its layers is the floor of the bnorm step at this machine's
    streaming speed and Python ``autograd.Function`` cost."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return _StreamingFloor.apply(x, self.weight, self.bias, residual)  # type: ignore[no-any-return]


def streaming_floor_model() -> nn.Module:
    """ResNet-20 with bnorm's fused layers, each replaced by a :class:`StreamingFloor`."""
    model = ResNet20(RESNET20_NORM["bnorm"])
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, BatchNormAct2d):
                setattr(module, name, StreamingFloor(child.num_features))
    return model


def model_part(args: argparse.Namespace) -> dict[str, Any]:
    """The ResNet-20 step at batch 16 and 128 (16 only with ``--quick``) in eager mode and
    at the largest batch under torch.compile: medians with quartiles of alternated samples,
    each sample one step after an untimed one of the same model (see ``settle`` in
    :func:`bnorm.testing.time_alternated_samples`), the ratios' quartiles taken within
    each round (:func:`_paired_quartiles`), and the page faults per step. In eager
    mode also the step with every bnorm layer replaced by a :class:`StreamingFloor`: the
    floor under bnorm/no-BN and the BN cost that minimal traffic through a Python Function
    allows here."""
    batches = (16,) if args.quick else (16, 128)
    repeats = max(5, args.repeats // 2)
    rows = []
    summary = []
    for mode, n in [*(("eager", b) for b in batches), ("compiled", batches[-1])]:
        torch.manual_seed(0)
        x = torch.randn(n, 3, 32, 32)
        target = torch.randint(0, 10, (n,))
        models: dict[str, nn.Module] = {}
        for norm in ("torch", "bnorm", "none", *(("floor",) if mode == "eager" else ())):
            torch.manual_seed(0)
            if norm == "floor":
                models[norm] = streaming_floor_model()
                continue
            model = ResNet20(RESNET20_NORM[norm])
            models[norm] = cast(nn.Module, torch.compile(model)) if mode == "compiled" else model
        start = time.perf_counter()
        steps = {norm: _train_step(m, x, target) for norm, m in models.items()}
        if mode == "compiled":
            for step in steps.values():
                step()  # compile outside the timing
        compile_s = time.perf_counter() - start
        # (batch 16's steps are short: three times the rounds, for the same spread; batch
        # 128's BN cost is a few % of its step, within one slow spell of a shared host:
        # twice the rounds)
        rounds = repeats * (3 if n <= 16 else 2)
        samples = time_alternated_samples(steps, rounds, max(1, args.warmup), settle=1)
        t = {k: statistics.median(v) for k, v in samples.items()}
        q = {k: statistics.quantiles(v, n=4) for k, v in samples.items()}
        paired = _paired_quartiles(samples)
        faults = {norm: _page_faults(step) for norm, step in steps.items()}
        row = {
            "mode": mode,
            "batch": n,
            "torch_ms": 1e3 * t["torch"],
            "bnorm_ms": 1e3 * t["bnorm"],
            "no_bn_ms": 1e3 * t["none"],
            # quartiles of the samples: the spread
            "torch_ms_q1_q3": [round(1e3 * q["torch"][0], 2), round(1e3 * q["torch"][2], 2)],
            "bnorm_ms_q1_q3": [round(1e3 * q["bnorm"][0], 2), round(1e3 * q["bnorm"][2], 2)],
            "no_bn_ms_q1_q3": [round(1e3 * q["none"][0], 2), round(1e3 * q["none"][2], 2)],
            "bnorm/torch": t["bnorm"] / t["torch"],
            "bnorm/no_bn": t["bnorm"] / t["none"],
            "torch/no_bn": t["torch"] / t["none"],
            # The time BN adds to the step, bnorm's over torch's (target <= 1/3).
            "bn_cost/torch": (t["bnorm"] - t["none"]) / (t["torch"] - t["none"]),
            # The spread: quartiles of the same ratios taken within each round of samples.
            "bnorm/no_bn_q1_q3": paired["bnorm"][0],
            "bn_cost/torch_q1_q3": paired["bnorm"][1],
            "rounds": rounds,
            "faults/step torch, bnorm, no-BN": [faults["torch"], faults["bnorm"], faults["none"]],
        }
        if mode == "compiled":
            row["compile_s"] = compile_s
        else:
            row["floor_ms"] = 1e3 * t["floor"]
            row["floor_ms_q1_q3"] = [round(1e3 * q["floor"][0], 2), round(1e3 * q["floor"][2], 2)]
            row["floor/no_bn"] = t["floor"] / t["none"]
            row["floor bn_cost/torch"] = (t["floor"] - t["none"]) / (t["torch"] - t["none"])
            row["floor/no_bn_q1_q3"] = paired["floor"][0]
            row["floor bn_cost/torch_q1_q3"] = paired["floor"][1]
        rows.append(row)
        target_torch = MODEL_TARGET_TORCH if mode == "eager" else 1.0
        summary.append(
            f"ResNet-20 step ({mode}, batch {n}): bnorm/torch {row['bnorm/torch']:.2f}x "
            f"(target <= {target_torch}x), bnorm/no-BN {row['bnorm/no_bn']:.2f}x (target <= "
            f"{MODEL_TARGET_NO_BN}x), torch/no-BN {row['torch/no_bn']:.2f}x, BN cost bnorm/torch "
            f"{row['bn_cost/torch']:.2f} (target <= {MODEL_TARGET_BN_COST:.2f}); within-round "
            f"quartiles: bnorm/no-BN {_span(row['bnorm/no_bn_q1_q3'])}, BN cost "
            f"{_span(row['bn_cost/torch_q1_q3'])}"
        )
        if mode == "eager":
            summary.append(
                f"  its floor (minimal passes, each one ATen streaming op, in a Python "
                f"Function): floor/no-BN {row['floor/no_bn']:.2f}x, BN cost floor/torch "
                f"{row['floor bn_cost/torch']:.2f} (within-round quartiles "
                f"{_span(row['floor/no_bn_q1_q3'])}, {_span(row['floor bn_cost/torch_q1_q3'])})"
            )
    return {"rows": rows, "summary": summary}


def _paired_quartiles(
    samples: dict[str, list[float]],
) -> dict[str, tuple[list[float], list[float]]]:
    """For each model but torch's and no-BN's: the first and third quartiles of its step
    over no-BN's, and of its BN cost over torch's, taken within each round (the samples of
    one round ran back to back, so a slow spell of the machine moves them together)."""
    out = {}
    for name in samples:
        if name in ("torch", "none"):
            continue
        rounds = list(zip(samples[name], samples["none"], samples["torch"], strict=True))
        ratio = [s / none for s, none, _ in rounds]
        cost = [(s - none) / (torch_ - none) for s, none, torch_ in rounds if torch_ != none]
        out[name] = (_quartiles(ratio), _quartiles(cost))
    return out


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [round(q[0], 3), round(q[2], 3)]


def _span(q: list[float]) -> str:
    return f"{q[0]:.2f}..{q[1]:.2f}"


def _page_faults(fn: Callable[[], None], calls: int = 3) -> float | None:
    """Minor page faults per call of ``fn`` (fresh memory the OS maps in and zeroes: the
    cost of allocations the allocator did not reuse); None where not measurable."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


# --- memory ----------------------------------------------------------------------------


def memory_part(args: argparse.Namespace) -> dict[str, Any]:
    n = 16 if args.quick else 128
    rows: list[dict[str, Any]] = []
    c, side = 16, 32
    activation_bytes = n * c * side * side * 4
    layers: dict[str, Callable[[str], nn.Module]] = {
        "torch": lambda act: TorchTail(c, act),
        "bnorm": lambda act: BatchNormAct2d(c, activation=act),
        "bnorm memory_efficient": lambda act: BatchNormAct2d(
            c, activation=act, memory_efficient=True
        ),
    }
    for pattern in ("conv-BN-act", "conv-BN-add-act"):
        for name, make in layers.items():
            act = "leaky_relu" if name.endswith("efficient") else "relu"
            block = nn.ModuleDict({"conv": nn.Conv2d(c, c, 3, 1, 1, bias=False), "norm": make(act)})
            x = torch.randn(n, c, side, side, requires_grad=True)
            res = x if pattern == "conv-BN-add-act" else None

            def run(
                block: nn.ModuleDict = block, x: Tensor = x, res: Tensor | None = res
            ) -> Tensor:
                return block["norm"](block["conv"](x), res)

            nbytes, _ = saved_tensor_bytes(run, exclude=block)
            rows.append(
                {
                    "what": f"{pattern} block",
                    "layers": f"{name} ({act})",
                    "saved_MB": nbytes / 2**20,
                    "saved/activation": nbytes / activation_bytes,
                }
            )
    x = torch.randn(n, 3, 32, 32)
    resnets = (
        ("torch", "relu"),
        ("bnorm", "relu"),
        ("torch", "leaky_relu"),
        ("bnorm-me", "leaky_relu"),
    )
    for norm, act in resnets:
        model = ResNet20(RESNET20_NORM[norm], act)

        def forward(model: nn.Module = model) -> Tensor:
            return model(x)

        nbytes, _ = saved_tensor_bytes(forward, exclude=model)
        rows.append(
            {
                "what": f"ResNet-20, batch {n}",
                "layers": f"{norm} ({act})",
                "saved_MB": nbytes / 2**20,
                "saved/activation": nbytes / activation_bytes,
            }
        )
    model = ResNet20("bnorm-act", "relu")
    scope = memory_saving()
    scope._track_peak = True
    with scope:
        out = model(x)
    nbytes = scope.stored_bytes(exclude=model)
    out.sum().backward()
    rows.append(
        {
            "what": f"ResNet-20, batch {n}",
            "layers": "bnorm memory_saving (relu)",
            "saved_MB": nbytes / 2**20,
            "saved/activation": nbytes / activation_bytes,
            "peak_in_backward_MB": scope.peak_bytes / 2**20,
        }
    )
    torch_relu = next(
        r for r in rows if r["what"].startswith("ResNet-20") and r["layers"] == "torch (relu)"
    )["saved_MB"]
    for r in rows:
        resnet = r["what"].startswith("ResNet-20")
        r["saved/torch_relu"] = r["saved_MB"] / torch_relu if resnet else None
        r.setdefault("peak_in_backward_MB", None)
    me_block = next(
        r for r in rows if r["what"] == "conv-BN-act block" and "efficient" in r["layers"]
    )
    return {
        "rows": rows,
        "summary": [
            f"memory-efficient conv->BN->act block saves {me_block['saved/activation']:.3f}x "
            f"the activation (target <= {MEMORY_TARGET_BLOCK}x); activation = "
            f"{activation_bytes / 2**20:.1f} MB ({n}x{c}x{side}x{side} float32)",
            f"ResNet-20 (ReLU) in bnorm.memory_saving() saves {rows[-1]['saved/torch_relu']:.2f}x "
            f"torch's bytes (target <= {MEMORY_SAVING_TARGET}x); its hooks hold at most "
            f"{scope.peak_bytes / 2**20:.1f} MB during backward",
        ],
    }


def memory_cost_part(args: argparse.Namespace) -> dict[str, Any]:
    """What ``torch.compile(model)`` saves for the torch ResNet-20 (ReLU) — its
    partitioner's choice, recorded with the same hooks (the compiled graph saves through
    them) — and the time of a training step (forward + backward, no optimizer) in a
    :func:`bnorm.memory_saving` scope against plain bnorm layers (alternated medians)."""
    n = 16 if args.quick else 128
    torch.manual_seed(0)
    x = torch.randn(n, 3, 32, 32)
    model = ResNet20("torch", "relu")
    compiled = cast(nn.Module, torch.compile(model))
    compiled(x).sum().backward()  # compile outside the measurement
    compiled_bytes, _ = saved_tensor_bytes(lambda: compiled(x), exclude=model)
    torch_bytes, _ = saved_tensor_bytes(lambda: model(x), exclude=model)
    rows: list[dict[str, Any]] = [
        {
            "what": f"ResNet-20, batch {n}",
            "layers": "torch.compile(torch model) (relu)",
            "saved_MB": compiled_bytes / 2**20,
            "saved/activation": None,
            "saved/torch_relu": compiled_bytes / torch_bytes,
            "peak_in_backward_MB": None,
        }
    ]
    nt = 16 if args.quick else 32
    xt = torch.randn(nt, 3, 32, 32)
    net = ResNet20("bnorm-act", "relu")

    def plain() -> None:
        net.zero_grad(set_to_none=True)
        net(xt).sum().backward()

    def saving() -> None:
        net.zero_grad(set_to_none=True)
        with memory_saving():
            out = net(xt)
        out.sum().backward()

    t = time_alternated({"plain": plain, "saving": saving}, args.repeats, max(1, args.warmup))
    step = {
        "batch": nt,
        "bnorm_ms": 1e3 * t["plain"],
        "memory_saving_ms": 1e3 * t["saving"],
        "memory_saving/bnorm": t["saving"] / t["plain"],
    }
    return {
        "rows": rows,
        "step": step,
        "summary": [
            f"torch.compile(torch ResNet-20) saves {compiled_bytes / 2**20:.1f} MB "
            f"({compiled_bytes / torch_bytes:.2f}x eager torch)",
            f"ResNet-20 step (fwd+bwd, batch {nt}): memory_saving/plain bnorm "
            f"{step['memory_saving/bnorm']:.2f}x ({step['memory_saving_ms']:.1f} vs "
            f"{step['bnorm_ms']:.1f} ms)",
        ],
    }


# --- on a device: each kernel against torch's (cuDNN) batch norm ------------------------


# pattern: (bnorm layer options, torch activation, residual?, mask?)
DEVICE_PATTERNS: dict[str, tuple[dict[str, Any], str, bool, bool]] = {
    "BN+ReLU": ({"activation": "relu"}, "relu", False, False),
    "BN+add+ReLU": ({"activation": "relu"}, "relu", True, False),
    "BN+add+leaky_relu memory_efficient": (
        {"activation": "leaky_relu", "memory_efficient": True}, "leaky_relu", True, False
    ),
    "ghost(32) BN+ReLU": ({"activation": "relu", "virtual_batch_size": 32}, "relu", False, False),
    "masked(90%) BN+ReLU": ({"activation": "relu"}, "relu", False, True),
}


def device_layer_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Forward+backward in training of each kernel (fused BN+act(+add), memory-efficient,
    the moments kernel with ghost batches and with a mask) against torch's layers on the
    same device (on CUDA, ``nn.BatchNorm2d`` is cuDNN's batch norm, then the add and the
    activation), float32 at ResNet-20 shapes, NCHW and channels_last. Bandwidth: the
    minimal traffic of the fused kernels (forward 3 tensor passes, backward 5; +1 and +2
    with a residual; the mask's bytes not counted) over a ``dst.copy_(src)`` of one
    activation timed among them (2 passes)."""
    rows: list[dict[str, Any]] = []
    for n, c, side in RESNET20_SHAPES:
        n = 64 if args.quick else n
        nbytes = n * c * side * side * 4
        src = torch.randn(n, c, side, side, device=device)
        dst = torch.empty_like(src)
        for layout in ("NCHW", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for pattern, (options, act, with_res, with_mask) in DEVICE_PATTERNS.items():
                torch.manual_seed(0)
                x = torch.randn(n, c, side, side).to(device, memory_format=fmt).requires_grad_()
                dy = torch.randn(n, c, side, side).to(device, memory_format=fmt)
                res = None
                if with_res:
                    res = torch.randn(n, c, side, side).to(device, memory_format=fmt)
                    res.requires_grad_()
                mask = (torch.rand(n, side, side) < 0.9).to(device) if with_mask else None
                ours = BatchNormAct2d(c, **options).to(device)
                theirs = TorchTail(c, act).to(device)
                t = time_alternated(
                    {
                        "torch": _fwd_bwd(theirs, x, dy, res),
                        "bnorm": _fwd_bwd(ours, x, dy, res, mask),
                        "copy": _copy_of(src, dst),
                    },
                    args.repeats,
                    args.warmup,
                    device=device,
                    inner=10,
                )
                extra = 1 if with_res else 0
                traffic = (3 + extra + 5 + 2 * extra) * nbytes
                copy_bps = 2 * nbytes / t["copy"]
                rows.append(
                    {
                        "pattern": pattern,
                        "shape": f"{n}x{c}x{side}x{side}",
                        "layout": layout,
                        "torch_ms": 1e3 * t["torch"],
                        "bnorm_ms": 1e3 * t["bnorm"],
                        "bnorm/torch": t["bnorm"] / t["torch"],
                        "bnorm_GB/s": traffic / t["bnorm"] / 1e9,
                        "copy_GB/s": copy_bps / 1e9,
                        "bnorm/copy": traffic / t["bnorm"] / copy_bps,
                        "torch/copy": traffic / t["torch"] / copy_bps,
                    }
                )
    ratios = [r["bnorm/torch"] for r in rows]
    fractions = [r["bnorm/copy"] for r in rows]
    return {
        "rows": rows,
        "summary": [
            f"device {device}: layer fwd+bwd, bnorm/torch: geomean {geometric_mean(ratios):.2f}x, "
            f"worst {max(ratios):.2f}x",
            f"bandwidth: kernels reach {min(fractions):.0%}..{max(fractions):.0%} of a device "
            "copy of the same size (minimal traffic, fwd+bwd)",
        ],
    }


def kernels_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Layer (with bandwidth), model and memory parts; the layer table is the main one.
    With ``--device cuda``: the kernels against torch's cuDNN batch norm on the GPU
    (:func:`device_layer_part`) only."""
    device = getattr(args, "device", None)
    if device is not None and torch.device(device).type != "cpu":
        result = device_layer_part(args, torch.device(device))
        if torch.device(device).type == "cuda":
            result["device_name"] = torch.cuda.get_device_name(torch.device(device))
        return result
    # One torch.compile'd TorchTail per case: all share TorchTail.forward's code object,
    # whose default recompile limit (8) would silently send later cases to eager.
    with torch._dynamo.config.patch(recompile_limit=64):
        layer = layer_part(args)
        small = small_batch_part(args)
        model = model_part(args)
        cost = memory_cost_part(args)
    memory = memory_part(args)
    summary = list(layer["summary"])
    summary += ["", "small batches:", format_table(small["rows"]), *small["summary"]]
    summary += ["", "ResNet-20 training step:", format_table(model["rows"]), *model["summary"]]
    summary += ["", "saved for backward:", format_table(memory["rows"] + cost["rows"])]
    summary += [*memory["summary"], *cost["summary"]]
    return {
        "rows": layer["rows"],
        "small_batch_rows": small["rows"],
        "model_rows": model["rows"],
        "kernels": "native" if native.available() else "compiled",
        "memory_rows": memory["rows"] + cost["rows"],
        "memory_saving_step": cost["step"],
        "summary": summary,
        "torch_threads": torch.get_num_threads(),
    }
