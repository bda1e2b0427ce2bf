"""The moments path's fused Function (bnorm.kernels.moments): ghost batches, masks,
renorm, residual and activation, against explicit per-group / valid-positions-only torch
ops with autograd (float64), eagerly and compiled."""

import pytest
import torch
import torch.nn.functional as TF

import bnorm
from bnorm.kernels import compile as kernel_compile
from bnorm.testing import saved_tensor_bytes

EPS = 1e-5


def explicit(x, w, b, residual, mask, groups, act):
    """act(BN(x) + residual) per group of samples, statistics over the valid positions,
    written out with plain torch ops (autograd differentiates it). NCHW logical shape."""
    outs, means, m2s, counts = [], [], [], []
    for xg, mg in zip(
        x.chunk(groups), (mask.chunk(groups) if mask is not None else [None] * groups)
    ):
        valid = torch.ones_like(xg[:, 0], dtype=torch.bool) if mg is None else mg
        vals = xg.movedim(1, -1)[valid]  # (m, C)
        mean = vals.mean(0)
        var = vals.var(0, unbiased=False)
        view = (1, -1) + (1,) * (x.dim() - 2)
        outs.append(
            (xg - mean.view(view)) / torch.sqrt(var.view(view) + EPS) * w.view(view) + b.view(view)
        )
        means.append(mean)
        m2s.append(var * vals.shape[0])
        counts.append(vals.shape[0])
    y = torch.cat(outs)
    if residual is not None:
        y = y + residual
    y = {"identity": lambda t: t, "silu": TF.silu, "relu": torch.relu}[act](y)
    # The running statistics see the whole batch: pooled moments.
    n = sum(counts)
    mean = sum(c * m for c, m in zip(counts, means)) / n
    m2 = sum(m2 + c * (mu - mean) ** 2 for c, m2, mu in zip(counts, m2s, means))
    return y, mean.detach(), (m2 / (n - 1)).detach()


CASES = [
    ("ghost", 4, False, None, "identity"),
    ("mask", 1, True, None, "identity"),
    ("ghost+mask", 2, True, None, "identity"),
    ("ghost+residual+silu", 4, False, "res", "silu"),
    ("mask+residual+relu", 1, True, "res", "relu"),
]


def run_layer(case, layout, dtype=torch.float64, seed=0, axis_last=False):
    _, groups, masked, res, act = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(8, 3, 4, 5, generator=g) * 2 + 1).to(dtype)
    dy = torch.randn(8, 3, 4, 5, generator=g).to(dtype)
    r = torch.randn(8, 3, 4, 5, generator=g).to(dtype) if res else None
    mask = torch.rand(8, 4, 5, generator=g) > 0.3 if masked else None
    w = torch.empty(3, dtype=dtype).uniform_(0.5, 1.5, generator=g)
    b = torch.empty(3, dtype=dtype).uniform_(-0.5, 0.5, generator=g)
    vbs = 8 // groups if groups > 1 else None
    if axis_last:
        layer = bnorm.BatchNormAct(3, axis=-1, activation=act, virtual_batch_size=vbs).to(dtype)
    else:
        layer = bnorm.BatchNormAct2d(3, activation=act, virtual_batch_size=vbs).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    xin, rin, dyin, min_ = x, r, dy, mask
    if layout == "channels_last":
        xin = x.contiguous(memory_format=torch.channels_last)
        dyin = dy.contiguous(memory_format=torch.channels_last)
        rin = None if r is None else r.contiguous(memory_format=torch.channels_last)
    if axis_last:
        xin, dyin = x.permute(0, 2, 3, 1).contiguous(), dy.permute(0, 2, 3, 1)
        rin = None if r is None else r.permute(0, 2, 3, 1).contiguous()
    xin = xin.clone().requires_grad_()
    rin = None if rin is None else rin.clone().requires_grad_()
    y = layer(xin, rin, mask=min_)
    y.backward(dyin)
    if axis_last:
        y, dx = y.permute(0, 3, 1, 2), xin.grad.permute(0, 3, 1, 2)
        dr = None if rin is None else rin.grad.permute(0, 3, 1, 2)
    else:
        dx, dr = xin.grad, None if rin is None else rin.grad
    # The explicit reference.
    xr = x.clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    rr = None if r is None else r.clone().requires_grad_()
    yr, mean, var = explicit(xr, wr, br, rr, mask, groups, act)
    yr.backward(dy)
    ours = (y, dx, layer.weight.grad, layer.bias.grad, dr, layer.running_mean, layer.running_var)
    ref = (
        yr,
        xr.grad,
        wr.grad,
        br.grad,
        None if rr is None else rr.grad,
        0.1 * mean,
        0.9 + 0.1 * var,
    )
    return ours, ref, y


@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "axis=-1"])
@pytest.mark.parametrize(
    "case",
    # compiled too by `make test` (float64 kernels; the suite's compiled tests run float32)
    [
        pytest.param(c, id=c[0], marks=[pytest.mark.compiled_kernels] * (c == CASES[4]))
        for c in CASES
    ],
)
def test_eager_function_matches_explicit_torch_ops(case, layout):
    ours, ref, y = run_layer(
        case, "NCHW" if layout == "axis=-1" else layout, axis_last=layout == "axis=-1"
    )
    for a, e in zip(ours, ref):
        if e is None:
            assert a is None
            continue
        torch.testing.assert_close(a, e.to(a.dtype), rtol=1e-9, atol=1e-10)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_compiled_function_matches_explicit_torch_ops(layout):
    for case in (CASES[2], CASES[3]):
        ours, ref, _ = run_layer(case, layout, dtype=torch.float32)
        for a, e in zip(ours, ref):
            if e is not None:
                torch.testing.assert_close(a, e.to(a.dtype), rtol=1e-4, atol=1e-5)
    assert {"mfwd", "mbwd"} <= {key[0] for key in kernel_compile._COMPILED}
    assert kernel_compile._COMPILE_FAILURE is None


@pytest.mark.usefixtures("compiled")
def test_compiled_renorm_takes_the_moments_kernel_and_equals_the_eager_native_path(monkeypatch):
    """With compilation on, Batch Renorm without mask/groups runs through the moments
    kernel; it must equal the eager path (ATen's kernel with (r, d) folded in)."""
    torch.manual_seed(0)
    x = torch.randn(16, 4, 6, 6) * 3 + 1
    dy = torch.randn(16, 4, 6, 6)

    def run() -> tuple[torch.Tensor, ...]:
        layer = bnorm.BatchNorm2d(4, renorm=bnorm.Renorm(1.5, 0.5, 0, 0, 0))
        with torch.no_grad():  # running statistics away from the batch's: clipping active
            layer.get_buffer("running_mean").fill_(0.5)
            layer.get_buffer("running_var").fill_(2.0)
        xl = x.clone().requires_grad_()
        y = layer(xl)
        y.backward(dy)
        return (
            y,
            xl.grad,
            layer.weight.grad,
            layer.bias.grad,
            layer.running_mean,
            layer.running_var,
            layer.num_batches_tracked,
        )

    fused = run()
    # key: ("mfwd", activation, parameter, residual?, mask?, renorm?, dtype, running?, skip?)
    assert any(key[0] == "mfwd" and key[5] and not key[4] for key in kernel_compile._COMPILED)
    monkeypatch.setenv("BNORM_NO_COMPILE", "1")
    eager = run()
    for a, e in zip(fused, eager):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_double_backward_through_the_fused_function():
    layer = bnorm.BatchNormAct2d(2, activation="silu", virtual_batch_size=2).double()
    x = torch.randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 3, 2) > 0.3
    mask[:, 0, 0] = True
    mask[:, 1, 1] = True
    assert torch.autograd.gradcheck(lambda t, s: layer(t, s, mask=mask), (x, r))
    assert torch.autograd.gradgradcheck(lambda t, s: layer(t, s, mask=mask), (x, r))


def test_padded_positions_may_hold_nan_and_do_not_touch_the_statistics():
    x = torch.randn(4, 3, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    poisoned = x.clone()
    poisoned[:, :, 4:] = float("nan")
    a, b = bnorm.BatchNorm1d(3), bnorm.BatchNorm1d(3)
    ya = a(x, mask=mask)
    yb = b(poisoned, mask=mask)
    torch.testing.assert_close(ya[:, :, :4], yb[:, :, :4])
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)
    assert int(b.num_batches_tracked) == 1 and int(b.num_batches_skipped) == 0


def test_half_precision_masked_input_gets_float32_statistics():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 10) * 2 + 3
    mask = torch.rand(8, 10) > 0.2
    half, full = bnorm.BatchNorm1d(4), bnorm.BatchNorm1d(4)
    y = half(x.to(torch.bfloat16), mask=mask)
    assert y.dtype == torch.bfloat16 and half.running_mean.dtype == torch.float32
    full(x.to(torch.bfloat16).float(), mask=mask)
    torch.testing.assert_close(half.running_mean, full.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half.running_var, full.running_var, rtol=1e-5, atol=1e-6)


def test_the_function_saves_the_input_not_intermediates():
    """Saved for backward: the input (and the mask as float), plus (G, C) vectors — no
    tensor-sized intermediate (the autograd-op version saved several)."""
    layer = bnorm.BatchNorm2d(8, virtual_batch_size=4)
    x = torch.randn(16, 8, 8, 8, requires_grad=True)
    mask = torch.rand(16, 8, 8) > 0.1
    saved, _ = saved_tensor_bytes(lambda: layer(x, mask=mask))
    input_bytes = x.numel() * x.element_size()
    assert saved <= input_bytes + mask.numel() * 4 + 64 * 1024
    assert saved >= input_bytes


def test_the_kernel_math_is_shared_with_the_eager_formulas():
    """Running statistics from the Function (cumulative average) equal
    update_running_stats on the pooled moments of the groups."""
    torch.manual_seed(0)
    x = torch.randn(12, 3, 5)
    layer = bnorm.BatchNorm1d(3, virtual_batch_size=4, momentum=None)
    layer(x)
    m = bnorm.functional.moments(x, 1, groups=3)
    pooled = bnorm.functional.pool_moments(m)
    rm, rv = torch.zeros(3), torch.ones(3)
    tracked = torch.zeros((), dtype=torch.long)
    bnorm.functional.update_running_stats(
        rm, rv, pooled.mean, pooled.var, pooled.count, None, tracked
    )
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.usefixtures("compiled")
def test_renorm_layer_inside_torch_compile_fullgraph():
    """Inside torch.compile the layer must not call into what Dynamo refuses to trace
    (compile_enabled); it emits differentiable ops instead of the Function."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 5)
    eager = bnorm.BatchNorm2d(3, renorm=bnorm.Renorm(1.5, 0.5, 0, 0, 0))
    traced = bnorm.BatchNorm2d(3, renorm=bnorm.Renorm(1.5, 0.5, 0, 0, 0))
    for layer in (eager, traced):
        with torch.no_grad():
            layer.get_buffer("running_mean").fill_(0.5)
            layer.get_buffer("running_var").fill_(2.0)
    compiled_layer = torch.compile(traced, fullgraph=True)
    torch.testing.assert_close(compiled_layer(x), eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced.running_var, eager.running_var)


def test_ghost_batches_of_a_tensor_whose_size_one_dim_has_the_largest_stride():
    """(8, 3, 1, 5) with strides (15, 5, 120, 1): contiguous() would return it as is."""
    x = torch.randn(1, 8, 3, 5, dtype=torch.float64).permute(1, 2, 0, 3)
    assert x.stride()[2] == max(x.stride())
    y = bnorm.functional.batch_norm(x, None, None, training=True, virtual_batch_size=4)
    expected = torch.cat(
        [TF.batch_norm(part, None, None, training=True) for part in x.contiguous().chunk(2)]
    )
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("masked", [False, True], ids=["ghost-fullgraph", "ghost+mask"])
def test_ghost_layer_inside_torch_compile_equals_eager(masked):
    """Inside torch.compile the moments path emits differentiable ops (not the Function)
    and updates the running statistics from the pooled groups, like the eager layer, in
    one graph with a mask too (its too-few-valid-values check is a device select there)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 5) * 2 + 1
    mask = torch.rand(8, 4, 5) > 0.3 if masked else None
    eager = bnorm.BatchNorm2d(3, virtual_batch_size=4, momentum=None)
    traced = bnorm.BatchNorm2d(3, virtual_batch_size=4, momentum=None)
    compiled_layer = torch.compile(traced, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe, mask=mask), compiled_layer(xc, mask=mask)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    ye.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            traced.get_buffer(name), eager.get_buffer(name), rtol=1e-5, atol=1e-6
        )
