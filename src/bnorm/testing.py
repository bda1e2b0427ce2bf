"""Helpers shared by bnorm's tests and benchmarks (``bnorm bench``).

* :func:`free_port`, :func:`spawn_gloo` — real multi-process runs on this machine: a free
  TCP port, and ``world`` processes joined in one gloo process group on localhost, each
  running a worker whose return value comes back to the caller;
* :func:`time_alternated` — median seconds per call of several cases run in turn, so that
  every case sees the same machine state;
* :func:`saved_tensor_bytes` — the bytes autograd saves for backward while a call runs;
* :func:`geometric_mean` — of ratios (benchmarks) and gradient norms (the study);
* reference models: :class:`TorchTail` (torch's layers for ``act(BN(x) + residual)``),
  :class:`ResNet20` (CIFAR ResNet-20 with a choice of batch norm), its batch-norm input
  shapes :data:`RESNET20_SHAPES`, and :func:`randomize_statistics` (a trained-looking
  batch norm: non-trivial running statistics and affine parameters).

This module imports only the layers (:mod:`bnorm.modules`) and torch.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .modules import BatchNorm2d, BatchNormAct2d

# ResNet-20 on CIFAR at batch 128: (N, C, side) of the inputs of its three stages' BNs.
RESNET20_SHAPES = [(128, 16, 32), (128, 32, 16), (128, 64, 8)]


# --- summary statistics ------------------------------------------------------------------


def geometric_mean(values: Iterable[float | None]) -> float | None:
    """``exp(mean(log v))`` over the positive finite ``values`` (None and others are
    skipped); None when there is none."""
    logs = [math.log(v) for v in values if v is not None and 0 < v < math.inf]
    return math.exp(sum(logs) / len(logs)) if logs else None


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it; it may be taken again
    before it is used, which is as good as localhost tests can do)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_gloo(
    worker: Callable[..., Any],
    world: int,
    *args: Any,
    timeout_s: float = 60.0,
    threads: int = 1,
    teardown: bool = True,
) -> list[Any]:
    """Run ``worker(rank, world, *args)`` in ``world`` spawned processes joined in one gloo
    process group on 127.0.0.1 (a :func:`free_port`, collectives timing out after
    ``timeout_s``, ``torch.set_num_threads(threads)`` in each); return what each rank's
    worker returned, in rank order (saved with :func:`torch.save` in a temporary folder).

    ``worker`` must be picklable (a module-level function). ``teardown=False`` is for a
    group whose collective is meant to time out: such a group cannot be destroyed cleanly
    (gloo may abort at interpreter exit), so each rank saves its result and leaves with
    ``os._exit(0)`` without destroying the group.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(
            _gloo_rank,
            args=(worker, world, free_port(), outdir, args, timeout_s, threads, teardown),
            nprocs=world,
            join=True,
        )
        return [
            torch.load(Path(outdir) / f"rank{rank}.pt", weights_only=False)
            for rank in range(world)
        ]


def _gloo_rank(
    rank: int,
    worker: Callable[..., Any],
    world: int,
    port: int,
    outdir: str,
    args: tuple[Any, ...],
    timeout_s: float,
    threads: int,
    teardown: bool,
) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        torch.save(worker(rank, world, *args), Path(outdir) / f"rank{rank}.pt")
    finally:
        if teardown:
            dist.destroy_process_group()
    if not teardown:
        os._exit(0)


# --- time and memory ---------------------------------------------------------------------


def time_alternated(
    cases: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    *,
    device: torch.device | None = None,
    inner: int = 1,
    settle: int = 0,
) -> dict[str, float]:
    """Median seconds per call of each case (see :func:`time_alternated_samples`)."""
    samples = time_alternated_samples(
        cases, repeats, warmup, device=device, inner=inner, settle=settle
    )
    return {name: statistics.median(v) for name, v in samples.items()}


def time_alternated_samples(
    cases: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    *,
    device: torch.device | None = None,
    inner: int = 1,
    settle: int = 0,
) -> dict[str, list[float]]:
    """Seconds per call of each case, ``repeats`` samples each, the cases run in turn (a,
    b, a, b, ...) so that every case sees the same machine state; ``warmup`` untimed rounds
    first.

    Each sample times ``inner`` calls: with the host clock, or on a CUDA ``device``
    between two CUDA events (the queue drained first with ``torch.cuda.synchronize``).
    ``settle`` untimed calls of the same case come right before each sample: a training
    step's allocations then meet the heap its own previous step left (as in a training
    loop), not the one the other case's step left."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    cuda = device is not None and device.type == "cuda"
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            for _ in range(settle):
                fn()
            if cuda:
                torch.cuda.synchronize(device)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner)
    return samples


def saved_tensor_bytes(fn: Callable[[], Any], exclude: nn.Module | None = None) -> tuple[int, Any]:
    """(bytes, fn()): the bytes of the distinct storages that autograd saves for backward
    while ``fn`` runs (recorded with :func:`torch.autograd.graph.saved_tensors_hooks`;
    a view counts its whole storage, a storage saved twice counts once), leaving out the
    parameters and buffers of ``exclude`` (they exist whether or not anything is saved)."""
    skip = set()
    if exclude is not None:
        tensors = (*exclude.parameters(), *exclude.buffers())
        skip = {t.untyped_storage().data_ptr() for t in tensors}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


# --- reference models --------------------------------------------------------------------


def _activation(y: Tensor, activation: str, negative_slope: float = 0.01) -> Tensor:
    if activation == "leaky_relu":
        return TF.leaky_relu(y, negative_slope)
    return torch.relu(y)


class TorchTail(nn.Module):
    """torch's layers for ``act(BN(x) + residual)``: ``nn.BatchNorm2d``, an out-of-place
    add and ``torch.relu``/``F.leaky_relu``."""

    def __init__(
        self, channels: int, activation: str = "relu", negative_slope: float = 0.01
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return _activation(y, self.activation, self.negative_slope)


RESNET20_NORMS = ("torch", "bnorm", "bnorm-act", "bnorm-act-me", "none")


def _norm_layer(norm: str, channels: int, activation: str) -> nn.Module:
    if norm == "torch":
        return nn.BatchNorm2d(channels)
    if norm == "bnorm":
        return BatchNorm2d(channels)
    if norm in ("bnorm-act", "bnorm-act-me"):
        me = norm == "bnorm-act-me"
        return BatchNormAct2d(channels, activation=activation, memory_efficient=me)
    return nn.Identity()


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm_layer(norm, cout, activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm_layer(norm, cout, activation)
        self.stride = stride
        self.extra = cout - cin
        self.fused = norm.startswith("bnorm-act")
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        if self.stride != 1 or self.extra:
            # Option A (He et al. 2016): subsample, zero-pad the new channels.
            half = self.extra // 2
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = TF.pad(shortcut, (0, 0, 0, 0, half, self.extra - half))
        if self.fused:  # BatchNormAct2d: the activation, and the add, inside the layer
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), shortcut)
        out = _activation(self.bn1(self.conv1(x)), self.activation)
        return _activation(self.bn2(self.conv2(out)) + shortcut, self.activation)


class ResNet20(nn.Module):
    """ResNet-20 for 32×32 CIFAR images (He et al. 2016, §4.2): a 3×3 conv to 16
    channels, three stages of three basic blocks (16, 32, 64 channels; stride 2 at the
    start of stages 2 and 3; identity shortcuts with zero-padded channels, option A),
    global average pooling and a linear classifier; 0.27M parameters. Every conv is
    bias-free and followed by a batch norm, ``norm`` one of :data:`RESNET20_NORMS`:
    ``"torch"`` (``nn.BatchNorm2d``), ``"bnorm"`` (``bnorm.BatchNorm2d``), the activation
    separate; ``"bnorm-act"`` (``bnorm.BatchNormAct2d``, the add and the activation fused),
    ``"bnorm-act-me"`` (the same, memory-efficient); ``"none"`` (no BN).
    ``activation``: ``"relu"`` or ``"leaky_relu"`` (slope 0.01).

    Shape: (N, 3, 32, 32) -> (N, num_classes).
    """

    def __init__(self, norm: str = "torch", activation: str = "relu", num_classes: int = 10):
        super().__init__()
        if norm not in RESNET20_NORMS:
            raise ValueError(f"expected norm in {RESNET20_NORMS} (got {norm!r})")
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = _norm_layer(norm, 16, activation)
        self.fused = norm.startswith("bnorm-act")
        self.activation = activation
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1, norm, activation))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if not self.fused:
            y = _activation(y, self.activation)
        y = self.layers(y)
        return self.fc(y.mean(dim=(2, 3)))


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode, every batch norm in it (every module with a
    ``running_mean`` tensor) given non-trivial statistics and affine parameters: mean
    U(−1, 1), variance U(0.25, 1.75), weight U(0.5, 1.5), bias U(−0.5, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(mean, Tensor) and isinstance(var, Tensor):
                c = mean.numel()
                mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(weight, Tensor):
                    weight.copy_(torch.rand(c, generator=g) + 0.5)
                if isinstance(bias, Tensor):
                    bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()
