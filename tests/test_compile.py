"""The compile contract: ``torch.compile(layer, fullgraph=True, dynamic=True)`` of every
bnorm layer and training option traces one graph — no graph break, no recompile when the
batch size changes — and gives the eager layer's outputs, gradients (input, weight, bias,
residual) and running statistics (``num_batches_tracked``/``num_batches_skipped``
included), step after step.

What is asserted, per configuration: Dynamo's ``graph_break`` counter stays empty;
``unique_graphs`` is 1; the backend is not called again after the first step (the first
step may call it twice: Dynamo restarts its analysis once to specialize a float
attribute such as ``eps``; that is not a recompile). Most configurations use
``backend="aot_eager"`` (Dynamo and AOTAutograd with eager kernels: graph breaks,
recompiles and the traced backward are all exercised, in about a second each); two use
Inductor. Inside an enclosing torch.compile the layers never call bnorm's own compiled
kernels (``torch.compiler.is_compiling()`` is checked first), so ``BNORM_NO_COMPILE``
(set by conftest) does not change what is traced here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import bnorm

# Batch sizes distinct from every other dimension below: Dynamo's duck sizing would
# otherwise tie two equal sizes into one symbol and recompile when they part.
BATCHES = (10, 14, 18)
RENORM = bnorm.Renorm(r_max=1.5, d_max=0.5, warmup_steps=0, r_ramp_steps=0, d_ramp_steps=0)
# (r_max, d_max) = (1, 0), (1.125, 0.125), (1.25, 0.25) at steps 0, 1, 2: the step matters.
RAMP = bnorm.Renorm(r_max=2.0, d_max=1.0, warmup_steps=0, r_ramp_steps=8, d_ramp_steps=8)
# Step 1 warm-up, steps 2 and 3 averaged over a window of 2: the step matters.
MOVING = bnorm.MovingAverage(window=2, warmup_steps=1)

# name: (layer factory, per-sample shape, inputs: "mask" and/or "residual")
CONFIGS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[str, ...]]] = {
    "BatchNorm1d-2D": (lambda: bnorm.BatchNorm1d(3), (3,), ()),
    "BatchNorm1d-3D": (lambda: bnorm.BatchNorm1d(3), (3, 5), ()),
    "BatchNorm2d": (lambda: bnorm.BatchNorm2d(3), (3, 4, 5), ()),
    "BatchNorm3d": (lambda: bnorm.BatchNorm3d(3), (3, 2, 3, 4), ()),
    "axis=-1": (lambda: bnorm.BatchNorm(3, axis=-1), (4, 5, 3), ()),
    "mask": (lambda: bnorm.BatchNorm1d(3), (3, 6), ("mask",)),
    "momentum=None": (lambda: bnorm.BatchNorm2d(3, momentum=None), (3, 4, 5), ()),
    "ghost": (lambda: bnorm.BatchNorm2d(3, virtual_batch_size=2), (3, 4, 5), ()),
    "ghost+mask": (lambda: bnorm.BatchNorm1d(3, virtual_batch_size=2), (3, 6), ("mask",)),
    "renorm": (lambda: bnorm.BatchNorm2d(3, renorm=RENORM), (3, 4, 5), ()),
    "renorm-ramp+mask": (lambda: bnorm.BatchNorm1d(3, renorm=RAMP), (3, 6), ("mask",)),
    "renorm-ramp+momentum=None": (
        lambda: bnorm.BatchNorm2d(3, renorm=RAMP, momentum=None), (3, 4, 5), ()
    ),
    "act-relu+residual": (
        lambda: bnorm.BatchNormAct2d(3, activation="relu"), (3, 4, 5), ("residual",)
    ),
    "act-leaky_relu": (
        lambda: bnorm.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.2),
        (3, 4, 5),
        (),
    ),
    "act-elu+residual": (
        lambda: bnorm.BatchNormAct1d(3, activation="elu", alpha=0.7), (3, 6), ("residual",)
    ),
    "act-silu": (lambda: bnorm.BatchNormAct2d(3, activation="silu"), (3, 4, 5), ()),
    "act-gelu+residual+mask": (
        lambda: bnorm.BatchNormAct1d(3, activation="gelu"), (3, 6), ("residual", "mask")
    ),
    "act-silu+ghost": (
        lambda: bnorm.BatchNormAct2d(3, activation="silu", virtual_batch_size=2), (3, 4, 5), ()
    ),
    "memory_efficient-leaky_relu+residual": (
        lambda: bnorm.BatchNormAct2d(
            3, activation="leaky_relu", negative_slope=0.1, memory_efficient=True
        ),
        (3, 4, 5),
        ("residual",),
    ),
    "memory_efficient-elu": (
        lambda: bnorm.BatchNormAct2d(3, activation="elu", memory_efficient=True), (3, 4, 5), ()
    ),
    "memory_efficient+renorm": (
        lambda: bnorm.BatchNormAct2d(3, activation="identity", memory_efficient=True, renorm=RAMP),
        (3, 4, 5),
        (),
    ),
    "SyncBatchNorm-world1": (lambda: bnorm.SyncBatchNorm(3), (3, 4, 5), ()),
    "SyncBatchNorm-world1+mask": (lambda: bnorm.SyncBatchNorm(3), (3, 6), ("mask",)),
    "moving_average": (lambda: bnorm.BatchNorm2d(3, moving_average=MOVING), (3, 4, 5), ()),
    "moving_average+mask": (
        lambda: bnorm.BatchNorm1d(3, moving_average=MOVING), (3, 6), ("mask",)
    ),
    "moving_average-act-relu+residual": (
        lambda: bnorm.BatchNormAct2d(3, activation="relu", moving_average=MOVING),
        (3, 4, 5),
        ("residual",),
    ),
}

INDUCTOR = ("act-relu+residual", "act-gelu+residual+mask", "moving_average")

BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "num_batches_skipped")
MOVING_BUFFERS = ("moving_chi", "moving_psi", "moving_steps")


def _prepare(layer: nn.Module, seed: int) -> nn.Module:
    """Non-trivial γ, β and running statistics (renorm's correction is then active)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(3, generator=g) + 0.5)  # type: ignore[operator]
        layer.bias.copy_(torch.randn(3, generator=g))  # type: ignore[operator]
        layer.get_buffer("running_mean").copy_(torch.randn(3, generator=g))
        layer.get_buffer("running_var").copy_(torch.rand(3, generator=g) + 0.5)
    return layer


def _inputs(shape: tuple[int, ...], uses: tuple[str, ...], axis: int, g: torch.Generator):
    x = torch.randn(shape, generator=g) * 2 + 1
    kwargs: dict[str, Any] = {}
    if "residual" in uses:
        kwargs["residual"] = torch.randn(shape, generator=g)
    if "mask" in uses:
        mask_shape = tuple(s for d, s in enumerate(shape) if d != axis % len(shape))
        kwargs["mask"] = torch.rand(mask_shape, generator=g) > 0.3
    return x, kwargs


def _step(layer: nn.Module, x: Tensor, kwargs: dict[str, Any], dy: Tensor) -> dict[str, Any]:
    """One training step: the output and the gradients of x, the residual, γ and β."""
    x = x.clone().requires_grad_()
    kw = dict(kwargs)
    if "residual" in kw:
        kw["residual"] = kw["residual"].clone().requires_grad_()
    y = layer(x, **kw)
    (y * dy).sum().backward()
    out = {"y": y.detach(), "dx": x.grad, "dweight": layer.weight.grad, "dbias": layer.bias.grad}
    if "residual" in kw:
        out["dresidual"] = kw["residual"].grad
    layer.zero_grad(set_to_none=True)
    return out



def _where(key: str, n: int) -> Callable[[str], str]:
    return lambda text: f"{key} at batch size {n}: {text}"


@pytest.mark.parametrize(
    ("name", "backend"),
    [(name, "aot_eager") for name in CONFIGS] + [(name, "inductor") for name in INDUCTOR],
)
def test_fullgraph_compile_equals_eager_without_recompiles(name, backend):
    make, sample_shape, uses = CONFIGS[name]
    torch._dynamo.reset()
    counters.clear()
    layer = _prepare(make(), seed=1)
    eager = copy.deepcopy(layer)
    count = CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, backend=count, fullgraph=True, dynamic=True)
    tol = {"rtol": 1e-5, "atol": 1e-6} if backend == "aot_eager" else {"rtol": 1e-4, "atol": 1e-5}
    g = torch.Generator().manual_seed(2)
    after_first = None
    for n in BATCHES:
        x, kwargs = _inputs((n, *sample_shape), uses, layer.axis, g)  # type: ignore[arg-type]
        dy = torch.randn(x.shape, generator=g)
        got, want = _step(compiled, x, kwargs, dy), _step(eager, x, kwargs, dy)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], **tol, msg=_where(key, n))
        moving = MOVING_BUFFERS if hasattr(layer, "moving_chi") else ()
        for key in BUFFERS + moving:
            torch.testing.assert_close(
                layer.get_buffer(key), eager.get_buffer(key), **tol, msg=_where(key, n)
            )
        if after_first is None:
            after_first = count.frame_count
    assert int(layer.get_buffer("num_batches_tracked")) == len(BATCHES)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert count.frame_count == after_first  # no recompile for the 2nd and 3rd batch size


def test_mask_with_too_few_valid_values_under_compile_skips_the_update_instead_of_raising():
    """Eager: the documented ValueError, nothing changed. Compiled (the count of valid
    values is data, so no host check): the output is what the formula gives — a channel
    with 1 valid value has μ = that value and σ² = 0 — and the batch leaves the running
    statistics unchanged, counted in num_batches_skipped instead of num_batches_tracked."""
    torch._dynamo.reset()
    counters.clear()
    layer = _prepare(bnorm.BatchNorm1d(3), seed=3).double()
    before = {k: layer.get_buffer(k).clone() for k in BUFFERS}
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[2, 3] = True
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training"):
        layer(x, mask=mask)
    for key, value in before.items():
        assert torch.equal(layer.get_buffer(key), value)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x, mask=mask)
    assert dict(counters["graph_break"]) == {}
    mean = x[2, :, 3]
    w, b = layer.weight.detach(), layer.bias.detach()
    expected = (x - mean[None, :, None]) / layer.eps**0.5 * w[:, None] + b[:, None]
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer.running_mean, before["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var, before["running_var"], rtol=0, atol=0)
    assert int(layer.num_batches_tracked) == 0
    assert int(layer.num_batches_skipped) == 1  # type: ignore[arg-type]
    # A batch with enough valid values updates as usual.
    mask[1, :2] = True
    compiled(x, mask=mask)
    assert int(layer.num_batches_tracked) == 1
