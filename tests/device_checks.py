"""Checks of bnorm's layers on a given device, shared by tests/test_cuda.py (on the GPU)
and tests/test_device_checks.py (the same checks on the CPU, so that their logic is
exercised where no GPU is available).

* :func:`check_layer` — one training step of a layer case (plain, BatchNormAct with each
  activation and the residual, memory-efficient, masks, ghost batches, Batch Renorm) in a
  dtype and memory layout: the output, the gradients of input, residual, γ and β, and the
  running statistics against an explicit float64 reference on the CPU (written with
  plain torch ops, differentiated by autograd) and, where the statistics are those of
  whole (ghost) batches, against torch's own batch norm on the device (cuDNN on CUDA)
  followed by the add and the activation;
* :func:`check_sync_world1` — SyncBatchNorm with a process group of one rank, and the
  moments kernel's collective path forced on (one all_gather, one all_reduce);
* :func:`check_fold_and_recalibrate` — bnorm.recalibrate against float64 statistics of
  the concatenated inputs, bnorm.fold against the unfolded model's outputs;
* :func:`check_mixed_dtypes` — half-precision input, weight and bias with float32 running
  statistics (FSDP2's mixed precision) in every layer kind and option, against the
  float32 computation on the same values cast at the end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import Tensor, nn

import bnorm
from bnorm.kernels import batch_norm_moments_train
from bnorm.testing import free_port

EPS = 1e-5
MOMENTUM = 0.1
SLOPE = 0.1
ALPHA = 0.7
R_MAX, D_MAX = 1.5, 0.5
SHAPE = (8, 3, 5, 6)  # N, C, H, W


@dataclass(frozen=True)
class Case:
    name: str
    activation: str | None = None  # None: bnorm.BatchNorm2d, else bnorm.BatchNormAct2d
    residual: bool = False
    memory_efficient: bool = False
    mask: bool = False
    ghost: int | None = None
    renorm: bool = False

    @property
    def torch_comparable(self) -> bool:
        """Whether torch's batch norm computes the same statistics (per ghost batch)."""
        return not self.mask and not self.renorm


CASES = [
    Case("plain"),
    Case("relu+residual", "relu", residual=True),
    Case("leaky_relu", "leaky_relu"),
    Case("elu+residual", "elu", residual=True),
    Case("silu", "silu"),
    Case("gelu+residual", "gelu", residual=True),
    Case("memory_efficient-leaky_relu+residual", "leaky_relu", True, memory_efficient=True),
    Case("memory_efficient-elu", "elu", memory_efficient=True),
    Case("mask", mask=True),
    Case("mask+relu+residual", "relu", residual=True, mask=True),
    Case("ghost", ghost=4),
    Case("ghost+silu+residual", "silu", residual=True, ghost=4),
    Case("renorm", renorm=True),
    Case("renorm+mask+gelu", "gelu", mask=True, renorm=True),
]
CASE_IDS = [c.name for c in CASES]

# Relative tolerance per input dtype (outputs and gradients, as a fraction of the largest
# reference value): float32 rounding of sums over a few hundred values; one rounding to
# the half-precision dtype of the output (2^-11, 2^-8) and of the input gradient.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

ACTIVATIONS = {
    None: lambda z: z,
    "relu": torch.relu,
    "leaky_relu": lambda z: TF.leaky_relu(z, SLOPE),
    "elu": lambda z: TF.elu(z, ALPHA),
    "silu": TF.silu,
    "gelu": TF.gelu,
}


def make_layer(case: Case, device: torch.device | str) -> nn.Module:
    options: dict = {"momentum": MOMENTUM, "eps": EPS}
    if case.ghost is not None:
        options["virtual_batch_size"] = case.ghost
    if case.renorm:
        options["renorm"] = bnorm.Renorm(R_MAX, D_MAX, 0, 0, 0)
    if case.activation is None:
        layer: nn.Module = bnorm.BatchNorm2d(SHAPE[1], **options)
    else:
        layer = bnorm.BatchNormAct2d(
            SHAPE[1], activation=case.activation, negative_slope=SLOPE, alpha=ALPHA,
            memory_efficient=case.memory_efficient, **options,
        )  # fmt: skip
    g = torch.Generator().manual_seed(7)
    c = SHAPE[1]
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g) * 0.5)
        layer.running_mean.copy_(torch.randn(c, generator=g))
        layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return layer.to(device)


def make_data(case: Case, dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor | None]:
    """CPU tensors, rounded to ``dtype`` (the reference starts from the same values)."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = SHAPE
    return {
        "x": (torch.randn(SHAPE, generator=g) * 2 + 1).to(dtype),
        "dy": torch.randn(SHAPE, generator=g).to(dtype),
        "residual": torch.randn(SHAPE, generator=g).to(dtype) if case.residual else None,
        "mask": torch.rand(n, h, w, generator=g) > 0.3 if case.mask else None,
    }


Data = dict[str, "Tensor | None"]


def reference_step(case: Case, layer: nn.Module, data: Data) -> dict[str, Tensor]:
    """The training step in float64 on the CPU, from the definitions: per (ghost) batch,
    the mean and biased variance over the valid positions; Batch Renorm's r, d from the
    running statistics before the update (constants); act(γ x̂ + β + residual); running
    statistics from the valid positions of the whole batch (unbiased variance)."""
    f64 = torch.float64
    x = data["x"].to(f64).requires_grad_()  # type: ignore[union-attr]
    w = layer.weight.detach().cpu().to(f64).requires_grad_()
    b = layer.bias.detach().cpu().to(f64).requires_grad_()
    rm = layer.running_mean.detach().cpu().to(f64)
    rv = layer.running_var.detach().cpu().to(f64)
    res = data["residual"]
    res = None if res is None else res.to(f64).requires_grad_()
    mask = data["mask"]
    view = (1, -1, 1, 1)
    groups = SHAPE[0] // case.ghost if case.ghost else 1
    masks = mask.chunk(groups) if mask is not None else [None] * groups
    outs = []
    for xg, mg in zip(x.chunk(groups), masks):
        valid = torch.ones_like(xg[:, 0], dtype=torch.bool) if mg is None else mg
        vals = xg.movedim(1, -1)[valid]  # (m, C)
        mean, var = vals.mean(0), vals.var(0, unbiased=False)
        xhat = (xg - mean.view(view)) / torch.sqrt(var.view(view) + EPS)
        if case.renorm:
            with torch.no_grad():
                sigma = torch.sqrt(rv + EPS)
                r = (torch.sqrt(var + EPS) / sigma).clamp(1 / R_MAX, R_MAX)
                d = ((mean - rm) / sigma).clamp(-D_MAX, D_MAX)
            xhat = xhat * r.view(view) + d.view(view)
        outs.append(xhat * w.view(view) + b.view(view))
    z = torch.cat(outs)
    if res is not None:
        z = z + res
    y = ACTIVATIONS[case.activation](z)
    y.backward(data["dy"].to(f64))  # type: ignore[union-attr]
    valid_all = torch.ones(SHAPE[0], *SHAPE[2:], dtype=torch.bool) if mask is None else mask
    vals = x.detach().movedim(1, -1)[valid_all]
    out = {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": w.grad,
        "dbias": b.grad,
        "running_mean": (1 - MOMENTUM) * rm + MOMENTUM * vals.mean(0),
        "running_var": (1 - MOMENTUM) * rv + MOMENTUM * vals.var(0, unbiased=True),
    }
    if res is not None:
        out["dresidual"] = res.grad
    return out  # type: ignore[return-value]


def _on(t: Tensor | None, device, fmt) -> Tensor:
    """A fresh copy of ``t`` on ``device`` in memory format ``fmt`` (``.to`` may return
    ``t`` itself, whose gradient would then accumulate across the compared steps)."""
    assert t is not None
    return t.to(device).clone(memory_format=fmt)


def torch_step(case: Case, layer: nn.Module, data: dict[str, Tensor | None], device, fmt) -> dict:
    """The same step with torch's batch norm (``torch.nn.functional.batch_norm``: cuDNN on
    CUDA) per ghost batch on ``device`` in the input's dtype, then the add and the
    activation. The running statistics only without ghost batches."""
    x = _on(data["x"], device, fmt).requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    rm, rv = layer.running_mean.detach().clone(), layer.running_var.detach().clone()
    res = data["residual"]
    res = None if res is None else _on(res, device, fmt).requires_grad_()
    groups = SHAPE[0] // case.ghost if case.ghost else 1
    z = torch.cat([
        TF.batch_norm(xg, rm if groups == 1 else None, rv if groups == 1 else None, w, b,
                      training=True, momentum=MOMENTUM, eps=EPS)
        for xg in x.chunk(groups)
    ])  # fmt: skip
    if res is not None:
        z = z + res
    y = ACTIVATIONS[case.activation](z)
    y.backward(_on(data["dy"], device, fmt))
    out = {"y": y.detach(), "dx": x.grad, "dweight": w.grad, "dbias": b.grad}
    if res is not None:
        out["dresidual"] = res.grad
    if groups == 1:
        out["running_mean"], out["running_var"] = rm, rv
    return out


def bnorm_step(case: Case, layer: nn.Module, data: dict[str, Tensor | None], device, fmt) -> dict:
    x = _on(data["x"], device, fmt).requires_grad_()
    res = data["residual"]
    res = None if res is None else _on(res, device, fmt).requires_grad_()
    mask = None if data["mask"] is None else data["mask"].to(device)
    layer.zero_grad(set_to_none=True)
    if case.activation is None:
        y = layer(x, mask=mask)
    else:
        y = layer(x, residual=res, mask=mask)
    assert y.dtype == x.dtype and y.device == x.device
    assert y.is_contiguous(memory_format=fmt), "the output keeps the input's memory layout"
    y.backward(_on(data["dy"], device, fmt))
    out = {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": layer.weight.grad,
        "dbias": layer.bias.grad,
        "running_mean": layer.running_mean.detach().clone(),
        "running_var": layer.running_var.detach().clone(),
    }
    if res is not None:
        out["dresidual"] = res.grad
    return out


def assert_matches(got: dict, want: dict, tol: float, what: str) -> None:
    for key, expected in want.items():
        assert key in got, f"{what}: {key} missing"
        expected = expected.detach().to("cpu", torch.float64)
        value = got[key].detach().to("cpu", torch.float64)
        scale = max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(
            value, expected, rtol=tol, atol=tol * scale,
            msg=lambda text, key=key: f"{what}, {key}: {text}",
        )  # fmt: skip


def check_layer(case: Case, device: torch.device | str, dtype: torch.dtype, layout: str) -> None:
    """One training step of ``case`` on ``device``: against the float64 reference, and
    against torch's batch norm on the device where comparable (see the module docstring)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    data = make_data(case, dtype)
    layer = make_layer(case, device)
    reference = reference_step(case, make_layer(case, "cpu"), data)
    theirs = torch_step(case, make_layer(case, device), data, device, fmt)
    ours = bnorm_step(case, layer, data, device, fmt)
    tol = TOLERANCE[dtype]
    assert_matches(ours, reference, tol, f"{case.name} {dtype} {layout} vs float64")
    assert int(layer.num_batches_tracked) == 1
    if case.torch_comparable:
        # Both sides round to the dtype: twice the tolerance against the reference.
        assert_matches(ours, theirs, 2 * tol, f"{case.name} {dtype} {layout} vs torch")


# --- SyncBatchNorm with a one-rank process group ----------------------------------------


def check_sync_world1(device: torch.device | str, backend: str) -> None:
    """In-process, one rank: ``bnorm.SyncBatchNorm`` (which is local batch norm for one
    rank) and the moments kernel's collective path forced on — its all_gather of the
    moments and all_reduce of the gradient sums run on ``backend`` — against torch's batch
    norm, outputs, gradients and running statistics."""
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        assert bnorm.distributed.world_size() == 1
        data = make_data(Case("sync", residual=True), torch.float32, seed=3)
        x = data["x"].to(device)  # type: ignore[union-attr]
        dy = data["dy"].to(device)  # type: ignore[union-attr]
        theirs = nn.BatchNorm2d(SHAPE[1]).to(device)
        ours = bnorm.SyncBatchNorm(SHAPE[1]).to(device)
        ours.load_state_dict(theirs.state_dict())
        results = []
        for layer in (theirs, ours):
            xi = x.clone().requires_grad_()
            layer(xi).backward(dy)
            results.append({
                "y": layer(x.clone()).detach(), "dx": xi.grad, "dweight": layer.weight.grad,
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
            })  # fmt: skip
        assert_matches(results[1], results[0], 1e-5, f"SyncBatchNorm on {backend}")
        # The collective path itself (what more than one rank takes).
        w = torch.rand(SHAPE[1], device=device).add_(0.5).requires_grad_()
        b = torch.randn(SHAPE[1], device=device).requires_grad_()
        rm, rv = torch.zeros(SHAPE[1], device=device), torch.ones(SHAPE[1], device=device)
        tracked = torch.zeros((), dtype=torch.long, device=device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = batch_norm_moments_train(
            xa, w, b, EPS, running=(rm, rv, MOMENTUM, tracked, None),
            distributed=True,
        )  # fmt: skip
        y.backward(dy)
        got = {"y": y.detach(), "dx": xa.grad, "dweight": w.grad, "dbias": b.grad,
               "running_mean": rm, "running_var": rv}  # fmt: skip
        w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        rm2, rv2 = torch.zeros_like(rm), torch.ones_like(rv)
        y2 = TF.batch_norm(xb, rm2, rv2, w2, b2, training=True, momentum=MOMENTUM, eps=EPS)
        y2.backward(dy)
        want = {"y": y2.detach(), "dx": xb.grad, "dweight": w2.grad, "dbias": b2.grad,
                "running_mean": rm2, "running_var": rv2}  # fmt: skip
        assert_matches(got, want, 1e-5, f"collective moments path on {backend}")
        assert int(tracked) == 1
    finally:
        dist.destroy_process_group()


# --- recalibrate and fold ---------------------------------------------------------------


def check_fold_and_recalibrate(device: torch.device | str) -> None:
    """recalibrate's running statistics against float64 statistics of the concatenated
    conv outputs; fold's model against the unfolded one, in eval, on ``device``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), bnorm.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 1), bnorm.BatchNormAct2d(5, activation="relu"),
    ).to(device)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, 6, 6, generator=g) * 2 + 1 for n in (5, 3, 4)]
    report = bnorm.recalibrate(model, batches, progress=False)
    assert report is not None
    with torch.no_grad():
        conv = copy.deepcopy(model[0]).to("cpu", torch.float64)
        h = conv(torch.cat(batches).to(torch.float64))
    mean = h.mean((0, 2, 3))
    var = h.var((0, 2, 3), unbiased=True)
    bn = model[1]
    assert bn.running_mean.device.type == torch.device(device).type
    torch.testing.assert_close(bn.running_mean.cpu().double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var.cpu().double(), var, rtol=1e-5, atol=1e-5)
    model.eval()
    x = torch.randn(4, 3, 6, 6, generator=g).to(device)
    with torch.no_grad():
        expected = model(x)
        folded = bnorm.fold(model)
        got = folded(x)
    assert all(p.device.type == torch.device(device).type for p in folded.parameters())
    assert not any(isinstance(m, bnorm.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# --- mixed dtypes -----------------------------------------------------------------------

# Outputs and gradients: TOLERANCE (of the largest reference value, as check_layer). The
# running statistics: float32 sums of the same half-precision values in both runs.
MIXED_STATS_TOLERANCE = 1e-5
MIXED_KINDS = [
    "plain", "momentum_none", "axis_last", "mask", "ghost", "renorm", "renorm_mask", "sync",
    "act", "act_residual", "memory_efficient", "frozen",
]  # fmt: skip


def _mixed_layer(kind: str, device: torch.device | str) -> nn.Module:
    c = SHAPE[1]
    renorm = bnorm.Renorm(R_MAX, D_MAX, 0, 0, 0)  # (r, d) clipped from the first step
    layers = {
        "plain": lambda: bnorm.BatchNorm2d(c),
        "momentum_none": lambda: bnorm.BatchNorm2d(c, momentum=None),
        "axis_last": lambda: bnorm.BatchNorm(c, axis=-1),
        "mask": lambda: bnorm.BatchNorm2d(c),
        "ghost": lambda: bnorm.BatchNorm2d(c, virtual_batch_size=4),
        "renorm": lambda: bnorm.BatchNorm2d(c, renorm=renorm),
        "renorm_mask": lambda: bnorm.BatchNorm2d(c, renorm=renorm),
        "sync": lambda: bnorm.SyncBatchNorm(c),  # (one process: local statistics)
        "act": lambda: bnorm.BatchNormAct2d(c, activation="silu"),
        # (An activation with a continuous derivative: a kink's side can flip with rounding.)
        "act_residual": lambda: bnorm.BatchNormAct2d(c, activation="elu"),
        "memory_efficient": lambda: bnorm.BatchNormAct2d(
            c, activation="elu", memory_efficient=True
        ),
        "frozen": lambda: bnorm.FrozenBatchNorm2d(c),
    }
    layer = layers[kind]()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g))
        if kind == "frozen":
            layer.running_mean.copy_(torch.randn(c, generator=g))
            layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return layer.to(device)


def cast_affine(layer: nn.Module, dtype: torch.dtype) -> None:
    """The affine parameters (buffers, for a frozen layer) in ``dtype``, the running
    statistics left as they are: what FSDP2's MixedPrecisionPolicy does to a layer."""
    for name in ("weight", "bias"):
        t = getattr(layer, name)
        if isinstance(t, nn.Parameter):
            t.data = t.data.to(dtype)
        else:
            setattr(layer, name, t.to(dtype))


def _mixed_steps(
    kind: str, layer: nn.Module, dtype: torch.dtype, train: bool, device: torch.device | str
) -> dict[str, Tensor]:
    """Two steps of ``layer`` on values rounded to ``dtype``, given to the layer in its
    weight's dtype (the float32 reference gets the same values widened)."""
    layer.train(train)
    out: dict[str, Tensor] = {}
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        x, dy, r = (
            (torch.randn(SHAPE, generator=g) * s + m).to(dtype).to(device, layer.weight.dtype)
            for s, m in ((2, 1), (1, 0), (1, 0))
        )
        mask = (torch.rand(SHAPE[0], *SHAPE[2:], generator=g) > 0.3).to(device)
        if kind == "axis_last":
            x, dy, r = (t.movedim(1, -1) for t in (x, dy, r))
        x = x.clone().requires_grad_()
        if kind in ("mask", "renorm_mask"):
            y = layer(x, mask=mask)
        elif kind == "act_residual":
            y = layer(x, r)
        else:
            y = layer(x)
        y.backward(dy)
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), x.grad
        if isinstance(layer.weight, nn.Parameter):
            # Per step: one rounding of each sum (accumulating two steps' gradients in the
            # half-precision dtype would round again, after cancellation).
            out[f"dweight{step}"], out[f"dbias{step}"] = layer.weight.grad, layer.bias.grad
            layer.weight.grad = layer.bias.grad = None
    out["running_mean"], out["running_var"] = layer.running_mean, layer.running_var
    return out


def check_mixed_dtypes(
    kind: str, device: torch.device | str, dtype: torch.dtype, train: bool
) -> None:
    """A layer of ``kind`` whose input, weight and bias are ``dtype`` and whose running
    statistics are float32, against the float32 layer on the same (rounded) values: the
    output and input gradient in the input's dtype, the parameters' gradients in theirs,
    within :data:`TOLERANCE`; the running statistics float32, within float32 accuracy."""
    mixed = _mixed_layer(kind, device)
    cast_affine(mixed, dtype)
    reference = _mixed_layer(kind, device)  # float32, the same rounded parameter values
    cast_affine(reference, dtype)
    cast_affine(reference, torch.float32)
    got = _mixed_steps(kind, mixed, dtype, train, device)
    want = _mixed_steps(kind, reference, dtype, train, device)
    stats = ("running_mean", "running_var")
    for name, value in got.items():
        # y, dx: the input's dtype; dweight, dbias: the parameters' (both ``dtype``);
        # the running statistics: kept in float32.
        assert value.dtype == (torch.float32 if name in stats else dtype), name
    what = f"{kind} with {dtype} parameters and float32 statistics"
    assert_matches(
        {k: v for k, v in got.items() if k not in stats},
        {k: v.to(dtype) for k, v in want.items() if k not in stats},
        TOLERANCE[dtype], what,
    )  # fmt: skip
    assert_matches(
        {k: got[k] for k in stats}, {k: want[k] for k in stats}, MIXED_STATS_TOLERANCE, what
    )
