"""Fused BN + activation (+ residual): bnorm.kernels and bnorm.BatchNormAct*.

Outputs and gradients against unfused torch ops and the float64 reference (with the
activation's derivative written out by hand in NumPy), over activations, memory layouts,
dtypes and the residual; float64 gradcheck; the memory-efficient mode against the normal
one; saved-for-backward bytes; the layers' options and conversions.

Every test runs the eager fallback (``BNORM_NO_COMPILE=1``) except those marked
``compiled``, which compile a few small kernels (seconds each); ``make test`` runs the
cases marked ``compiled_kernels`` a second time with the kernels compiled
(``pytest --compiled-kernels``), the configuration users get.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import bnorm
from bnorm import kernels, reference
from bnorm.kernels import Activation
from bnorm.kernels import compile as kernel_compile
from bnorm.testing import TorchTail, saved_tensor_bytes

SLOPE = 0.1
ALPHA = 0.7

# Tests of the fused kernels themselves, on small tensors: the Function at every size.
pytestmark = pytest.mark.usefixtures("eager_fallback", "fused_at_every_size")


def make_act(name: str) -> Activation:
    return Activation.parse(name, negative_slope=SLOPE, alpha=ALPHA)  # type: ignore[return-value]


# --- independent references ----------------------------------------------------------

_erf = np.vectorize(math.erf)


def np_act(name: str, z: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, SLOPE * z)
    if name == "elu":
        return np.where(z > 0, z, ALPHA * np.expm1(z))
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    return z


def np_act_grad(name: str, z: np.ndarray) -> np.ndarray:
    """act'(z), by hand (the z ≤ 0 side at 0, as PyTorch)."""
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, SLOPE)
    if name == "elu":
        return np.where(z > 0, 1.0, ALPHA * np.exp(z))
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        return cdf + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return np.ones_like(z)


def reference_bn_act(x, gamma, beta, residual, dy, name, eps=1e-5):
    """float64 (y, dx, dγ, dβ, dr) of y = act(BN(x) + r) from bnorm.reference."""
    as64 = lambda t: None if t is None else t.detach().double().numpy()  # noqa: E731
    bn, cache = reference.forward(as64(x), as64(gamma), as64(beta), eps)
    z = bn if residual is None else bn + as64(residual)
    dz = as64(dy) * np_act_grad(name, z)
    dx, dgamma, dbeta = reference.backward(dz, cache)
    return np_act(name, z), dx, dgamma, dbeta, dz, cache


def torch_bn_act(x, weight, bias, residual, name):
    """The same with torch's unfused ops."""
    y = TF.batch_norm(x, None, None, weight, bias, training=True)
    if residual is not None:
        y = y + residual
    return {
        "identity": lambda t: t,
        "relu": torch.relu,
        "leaky_relu": lambda t: TF.leaky_relu(t, SLOPE),
        "elu": lambda t: TF.elu(t, ALPHA),
        "silu": TF.silu,
        "gelu": TF.gelu,
    }[name](y)


def rel_err(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))


def inputs(shape, layout="NCHW", residual=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    dy = torch.randn(shape, generator=g).to(dtype)
    w = torch.empty(c).uniform_(0.5, 1.5, generator=g)
    w[0] = -0.8  # a negative γ
    b = torch.empty(c).uniform_(-0.5, 0.5, generator=g)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.to(memory_format=fmt)
        dy = dy.to(memory_format=fmt)
        r = None if r is None else r.to(memory_format=fmt)
    return x, r, dy, w, b


def run_fused(x, r, dy, w, b, act, memory_efficient=False):
    """(y, dx, dγ, dβ, dr) through bnorm.kernels' autograd Function."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    xl, wl, bl, rl = leaves
    y, mean, invstd = kernels.batch_norm_act_train(xl, wl, bl, rl, 1e-5, act, memory_efficient)
    y.backward(dy)
    return y.detach(), xl.grad, wl.grad, bl.grad, None if rl is None else rl.grad, mean, invstd


# --- activations ----------------------------------------------------------------------


@pytest.mark.parametrize("name", kernels.ACTIVATIONS)
def test_activation_math_matches_hand_derived_numpy(name):
    act = make_act(name)
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    g = torch.linspace(-1, 2, 241, dtype=torch.float64)
    y = act.forward(z)
    np.testing.assert_allclose(y.numpy(), np_act(name, z.numpy()), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        act.grad(g, z).numpy(), g.numpy() * np_act_grad(name, z.numpy()), rtol=1e-12, atol=1e-12
    )
    # torch's and ATen's ops of the same table entry (the unfused paths, the fallback)
    np.testing.assert_allclose(act.eager(z).numpy(), y.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        act.aten_grad(g, z).numpy(), act.grad(g, z).numpy(), rtol=1e-12, atol=1e-12
    )
    if act.invertible:
        np.testing.assert_allclose(act.inverse(y).numpy(), z.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(
            act.grad_from_output(g, y).numpy(), act.grad(g, z).numpy(), rtol=1e-10, atol=1e-12
        )


def test_invertible_activations_are_the_documented_ones():
    assert [n for n in kernels.ACTIVATIONS if make_act(n).invertible] == [
        "identity",
        "leaky_relu",
        "elu",
    ]
    assert not Activation("leaky_relu", 0.0).invertible
    with pytest.raises(ValueError, match="alpha > 0"):
        Activation("elu", 0.0)
    with pytest.raises(ValueError, match="expected an activation in"):
        Activation("tanh")


# --- fused vs unfused torch and the float64 reference (eager fallback) ----------------

FUSED_CASES = [
    (name, layout, residual, me)
    for name, layout, residual, me in itertools.product(
        kernels.ACTIVATIONS, ("NCHW", "channels_last"), (False, True), (False, True)
    )
    if not me or make_act(name).invertible
]
# Run again with the kernels compiled (`make test`): every activation but the identity
# with a residual, and the memory-efficient mode's two invertible ones, once per layout
# (the suite's own compiled tests cover the identity, other layouts and half precision).
COMPILED_CASES = {(name, "NCHW", True, False) for name in kernels.ACTIVATIONS[1:]} | {
    ("leaky_relu", "NCHW", True, True),
    ("elu", "channels_last", False, True),
}


@pytest.mark.parametrize(
    "name,layout,residual,memory_efficient",
    [
        pytest.param(*case, marks=[pytest.mark.compiled_kernels] * (case in COMPILED_CASES))
        for case in FUSED_CASES
    ],
)
def test_fused_matches_unfused_torch_and_reference(name, layout, residual, memory_efficient):
    x, r, dy, w, b = inputs((6, 5, 4, 3), layout, residual)
    y, dx, dw, db, dr, mean, invstd = run_fused(x, r, dy, w, b, make_act(name), memory_efficient)
    assert y.shape == x.shape and y.stride() == x.stride()  # the input's memory layout
    assert mean.dtype == invstd.dtype == torch.float32
    # unfused torch ops
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    yt = torch_bn_act(leaves[0], leaves[1], leaves[2], leaves[3], name)
    yt.backward(dy)
    torch.testing.assert_close(y, yt.detach(), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip((dx, dw, db, dr), (t.grad if t is not None else None for t in leaves)):
        if theirs is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # float64 reference: forward within 1e-5 relative
    y64, dx64, dw64, db64, dr64, cache = reference_bn_act(x, w, b, r, dy, name)
    assert rel_err(y, y64) < 1e-5
    assert rel_err(mean, cache["mean"]) < 1e-6
    assert rel_err(invstd, 1 / np.sqrt(cache["var"] + 1e-5)) < 1e-6
    assert rel_err(dx, dx64) < 1e-4
    assert rel_err(dw, dw64) < 1e-5 and rel_err(db, db64) < 1e-5
    if residual:
        assert rel_err(dr, dr64) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_half_precision_input_float32_statistics(dtype, memory_efficient):
    x, r, dy, w, b = inputs((8, 4, 5, 5), "channels_last", True, dtype=dtype)
    name = "leaky_relu"
    y, dx, dw, db, dr, mean, invstd = run_fused(x, r, dy, w, b, make_act(name), memory_efficient)
    assert y.dtype == dx.dtype == dr.dtype == dtype and dw.dtype == torch.float32
    # The statistics are those of the half-precision values, in float32 precision.
    y64, dx64, dw64, db64, _, cache = reference_bn_act(x, w, b, r, dy, name)
    assert mean.dtype == torch.float32
    assert rel_err(mean, cache["mean"]) < 1e-6
    assert rel_err(invstd, 1 / np.sqrt(cache["var"] + 1e-5)) < 1e-6
    # Outputs and gradients: one rounding to the half dtype (plus, memory-efficient,
    # x̂ recovered from the rounded output).
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(y, y64) < tol
    assert rel_err(dx, dx64) < 4 * tol
    assert rel_err(dw, dw64) < 4 * tol and rel_err(db, db64) < tol


@pytest.mark.parametrize(
    "name,residual,memory_efficient",
    [
        ("silu", True, False),
        ("gelu", False, False),
        ("leaky_relu", True, True),
        ("elu", False, True),
    ],
)
def test_gradcheck_float64(name, residual, memory_efficient):
    x, r, _, w, b = inputs((4, 3, 3, 2), residual=residual, dtype=torch.float64)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    if residual:
        leaves.append(r.double().requires_grad_())
    act = make_act(name)

    def f(*args):
        xx, ww, bb = args[:3]
        rr = args[3] if residual else None
        return kernels.batch_norm_act_train(xx, ww, bb, rr, 1e-5, act, memory_efficient)[0]

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6)


# --- memory-efficient mode --------------------------------------------------------------


@pytest.mark.parametrize("name", ["identity", "leaky_relu", "elu"])
@pytest.mark.parametrize("residual", [False, True])
def test_memory_efficient_gradients_equal_normal_mode(name, residual):
    x, r, dy, w, b = inputs((8, 4, 6, 6), "NCHW", residual)
    w[1] = 2e-3  # small but above the clamp
    normal = run_fused(x, r, dy, w, b, make_act(name), False)
    efficient = run_fused(x, r, dy, w, b, make_act(name), True)
    for a, c in zip(normal, efficient):
        if a is None:
            assert c is None
        else:
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_memory_efficient_clamps_zero_weight_with_straight_through_gradient():
    x, _, dy, w, b = inputs((8, 3, 4, 4))
    w[1] = 0.0
    w[2] = -1e-4
    clamped = w.clone()
    clamped[1] = kernels.MIN_ABS_WEIGHT
    clamped[2] = -kernels.MIN_ABS_WEIGHT
    act = make_act("leaky_relu")
    efficient = run_fused(x, None, dy, w, b, act, True)
    normal_at_clamped = run_fused(x, None, dy, clamped, b, act, False)
    # x̂ = (z − β)/γ' loses digits as |γ'| gets small: z carries γ'x̂ next to β.
    for a, c in zip(normal_at_clamped[:4], efficient[:4]):
        torch.testing.assert_close(c, a, rtol=2e-3, atol=1e-4)


def test_memory_efficient_rejects_non_invertible_activation():
    with pytest.raises(ValueError, match="invertible activation"):
        bnorm.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.0, memory_efficient=True)
    layer = bnorm.BatchNormAct2d(3, activation="leaky_relu", memory_efficient=True)
    with pytest.raises(ValueError, match="invertible activation"):
        layer.activation = "relu"
    assert layer.activation == "leaky_relu" and layer._plan.activation.name == "leaky_relu"


def _block_saved_ratio(norm: nn.Module, residual: bool) -> float:
    torch.manual_seed(0)
    block = nn.ModuleDict({"conv": nn.Conv2d(8, 8, 3, 1, 1, bias=False), "norm": norm})
    x = torch.randn(16, 8, 8, 8, requires_grad=True)
    nbytes, y = saved_tensor_bytes(
        lambda: block["norm"](block["conv"](x), x if residual else None), block
    )
    return nbytes / y.nelement() / y.element_size()


@pytest.mark.parametrize("residual", [False, True])
def test_saved_for_backward_bytes_of_a_conv_bn_act_block(residual):
    # torch's separate layers save the conv input, the BN input and the ReLU output: 3x
    # (plus per-channel vectors: 0.002x at this small size).
    assert _block_saved_ratio(TorchTail(8), residual) == pytest.approx(3.0, abs=0.005)
    me = bnorm.BatchNormAct2d(8, activation="leaky_relu", memory_efficient=True)
    assert _block_saved_ratio(me, residual) <= 2.005
    assert _block_saved_ratio(bnorm.BatchNormAct2d(8), residual) <= 2.005


def test_memory_efficient_saves_the_output_not_the_input():
    layer = bnorm.BatchNormAct2d(4, activation="elu", memory_efficient=True)
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x * 1.0)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


# --- the layers -------------------------------------------------------------------------

RANK_CASES = {
    "1d-2D": (bnorm.BatchNormAct1d, nn.BatchNorm1d, (16, 3)),
    "1d-3D": (bnorm.BatchNormAct1d, nn.BatchNorm1d, (4, 3, 5)),
    "2d": (bnorm.BatchNormAct2d, nn.BatchNorm2d, (4, 3, 4, 5)),
    "3d": (bnorm.BatchNormAct3d, nn.BatchNorm3d, (2, 3, 2, 3, 4)),
}


@pytest.mark.parametrize(
    "rank",
    [pytest.param(r, marks=[pytest.mark.compiled_kernels] * (r == "2d")) for r in RANK_CASES],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_matches_torch_layers_over_steps(rank, momentum):
    ours_cls, torch_cls, shape = RANK_CASES[rank]
    torch.manual_seed(0)
    ours = ours_cls(3, momentum=momentum, activation="relu")
    theirs = torch_cls(3, momentum=momentum)
    for step in range(3):
        x = torch.randn(shape) * (step + 1) + step
        r = torch.randn(shape)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo = ours(xo, r)
        yt = torch.relu(theirs(xt) + r)
        dy = torch.randn(shape)
        yo.backward(dy)
        yt.backward(dy)
        torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), torch.relu(theirs(x)), rtol=1e-5, atol=1e-6)


def _fused_function_ran(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "BatchNormAct" in y.grad_fn.name()


@pytest.mark.size_dispatch
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_inputs_run_torchs_ops_with_torchs_results(threads, channels_last, monkeypatch):
    # Below the size threshold the layer is ATen's batch norm, then the add and the
    # activation: bit for bit what torch's layers give, running statistics included.
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    ours = bnorm.BatchNormAct2d(8, activation="relu")
    theirs = nn.BatchNorm2d(8)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = (torch.randn(4, 8, 5, 5) * (step + 1) + step).to(memory_format=memory_format)
        r = torch.randn(4, 8, 5, 5)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        ro, rt = r.clone().requires_grad_(), r.clone().requires_grad_()
        yo = ours(xo, ro)
        yt = torch.relu(theirs(xt) + rt)
        assert not _fused_function_ran(yo)
        dy = torch.randn(4, 8, 5, 5)
        yo.backward(dy)
        yt.backward(dy)
        for a, b in [(yo, yt), (xo.grad, xt.grad), (ro.grad, rt.grad)]:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=0, atol=0)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.size_dispatch
def test_size_threshold_and_what_always_runs_the_fused_function(monkeypatch):
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    # The native kernels' threshold (relu, float32) counts elements; the compiled ones'
    # (silu) elements per thread, for up to 2 threads.
    for name, native_on in (("NATIVE_MIN_NUMEL", True), ("FUSED_MIN_NUMEL", False)):
        act = "relu" if native_on else "silu"
        other = "FUSED_MIN_NUMEL" if native_on else "NATIVE_MIN_NUMEL"
        at = x.numel() if native_on else x.numel() // 2
        monkeypatch.setattr(kernels.bn_act, other, 1 << 40)
        monkeypatch.setattr(kernels.bn_act, name, at)
        assert _fused_function_ran(bnorm.BatchNormAct2d(8, activation=act)(x))
        monkeypatch.setattr(kernels.bn_act, name, at + 1)
        assert not _fused_function_ran(bnorm.BatchNormAct2d(8, activation=act)(x))
        assert not _fused_function_ran(bnorm.BatchNormAct2d(8, activation="identity")(x, x))
    # The memory-efficient mode and a memory_saving scope need the Function's backward.
    layer = bnorm.BatchNormAct2d(8, activation="leaky_relu", memory_efficient=True)
    assert _fused_function_ran(layer(x))
    with bnorm.memory_saving():
        assert _fused_function_ran(bnorm.BatchNormAct2d(8)(x))


@pytest.mark.size_dispatch
def test_small_input_path_skips_a_non_finite_batch():
    layer = bnorm.BatchNormAct2d(3, activation="relu")
    layer(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("inf")
    layer(x, torch.randn(4, 3, 2, 2))
    after = layer.state_dict()
    torch.testing.assert_close(after["running_mean"], before["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(after["running_var"], before["running_var"], rtol=0, atol=0)
    assert int(after["num_batches_tracked"]) == 1
    assert int(layer.num_batches_skipped) == 1


def test_torch_checkpoint_loads_and_repr_names_the_activation():
    theirs = nn.BatchNorm2d(3)
    theirs.running_mean.fill_(0.3)
    ours = bnorm.BatchNormAct2d(
        3, activation="leaky_relu", negative_slope=0.2, memory_efficient=True
    )
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert "activation='leaky_relu', negative_slope=0.2, memory_efficient=True" in repr(ours)


def test_generic_layer_with_channels_last_axis_matches_nchw():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6)
    r = torch.randn(4, 3, 5, 6)
    nchw = bnorm.BatchNormAct2d(3, activation="gelu")
    nhwc = bnorm.BatchNormAct(3, activation="gelu", axis=-1)
    y = nchw(x, r)
    y_nhwc = nhwc(x.permute(0, 2, 3, 1), r.permute(0, 2, 3, 1))
    torch.testing.assert_close(y_nhwc.permute(0, 3, 1, 2), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nhwc.running_var, nchw.running_var)


def test_renorm_composes_with_the_fused_kernel():
    renorm = bnorm.Renorm(2.0, 1.0, 0, 0, 0)
    act = bnorm.BatchNormAct2d(3, activation="elu", renorm=renorm, memory_efficient=True)
    plain = bnorm.BatchNorm2d(3, renorm=renorm)
    for layer in (act, plain):
        layer.running_mean.fill_(0.5)
        layer.running_var.fill_(3.0)
    x = torch.randn(8, 3, 4, 4) * 0.5
    xa, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = act(xa)
    yp = TF.elu(plain(xp))
    torch.testing.assert_close(ya, yp, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(x)
    ya.backward(dy)
    yp.backward(dy)
    torch.testing.assert_close(xa.grad, xp.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(act.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(act.running_var, plain.running_var)


@pytest.mark.parametrize("option", ["ghost", "mask", "sync-single-process"])
def test_unfused_options_equal_bn_then_add_then_act(option):
    torch.manual_seed(0)
    kwargs = {"virtual_batch_size": 4} if option == "ghost" else {}
    if option == "sync-single-process":
        kwargs["sync"] = True  # torch.distributed not initialized: local statistics
    act = bnorm.BatchNormAct2d(3, activation="silu", **kwargs)
    plain = bnorm.BatchNorm2d(3, virtual_batch_size=kwargs.get("virtual_batch_size"))
    x = torch.randn(8, 3, 4, 4)
    r = torch.randn(8, 3, 4, 4)
    mask = torch.rand(8, 4, 4) > 0.3 if option == "mask" else None
    xa, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = act(xa, r, mask=mask)
    yp = TF.silu(plain(xp, mask) + r)
    torch.testing.assert_close(ya, yp, rtol=1e-5, atol=1e-6)
    ya.sum().backward()
    yp.sum().backward()
    torch.testing.assert_close(xa.grad, xp.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(act.running_mean, plain.running_mean)


def test_memory_efficient_with_mask_is_a_clear_error_and_changes_nothing():
    layer = bnorm.BatchNormAct2d(3, activation="leaky_relu", memory_efficient=True)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="not supported with a mask"):
        layer(x, mask=torch.ones(4, 2, 2, dtype=torch.bool))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"activation": "tanh"}, ValueError, "expected an activation in"),
        ({"activation": None}, TypeError, "expected activation to be a str"),
        (
            {"activation": "leaky_relu", "negative_slope": float("nan")},
            ValueError,
            "negative_slope",
        ),
        ({"activation": "relu", "memory_efficient": True}, ValueError, "invertible"),
        (
            {"activation": "elu", "memory_efficient": True, "virtual_batch_size": 2},
            ValueError,
            "virtual_batch_size",
        ),
        ({"sync": True, "virtual_batch_size": 2}, ValueError, "virtual_batch_size"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        bnorm.BatchNormAct2d(3, **kwargs)


def test_residual_of_another_shape_is_a_clear_error_and_changes_nothing():
    layer = bnorm.BatchNormAct2d(3)
    with pytest.raises(
        ValueError, match=r"BatchNormAct2d: expected a residual of the input's shape"
    ):
        layer(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 1))
    assert int(layer.num_batches_tracked) == 0


def test_fx_trace_records_the_layer_as_one_call_module_with_the_residual():
    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = bnorm.BatchNormAct2d(3)

        def forward(self, x, r):
            return self.bn(x, r)

    traced = torch.fx.symbolic_trace(Tail())
    calls = [(n.op, n.target) for n in traced.graph.nodes if n.op.startswith("call")]
    assert calls == [("call_module", "bn")]
    x, r = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(traced(x, r), Tail()(x, r))


# --- convert ---------------------------------------------------------------------------


def test_convert_among_batchnormact_keeps_activation_and_shares_parameters():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bnorm.BatchNormAct2d(3, activation="elu", alpha=0.5))
    old = model[1]
    converted, report = bnorm.convert(model, bnorm.BatchNormAct, memory_efficient=True)
    new = converted[1]
    assert type(new) is bnorm.BatchNormAct2d and new is not old
    assert (new.activation, new.alpha, new.memory_efficient) == ("elu", 0.5, True)
    assert new.weight is old.weight
    assert report.converted == [("1", "BatchNormAct2d", "BatchNormAct2d")]


def test_convert_reports_activation_layers_that_the_target_cannot_hold():
    model = nn.Sequential(bnorm.BatchNormAct2d(3), nn.BatchNorm2d(3))
    converted, report = bnorm.convert(model, nn.BatchNorm2d)
    assert type(converted[0]) is bnorm.BatchNormAct2d
    assert len(report.skipped) == 1 and "activation" in report.skipped[0][2]
    _, report = bnorm.convert(model, bnorm.SyncBatchNorm)
    assert [row[0] for row in report.skipped] == ["0"]


def test_convert_plain_layers_to_batchnormact_is_lossless_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3))
    x = torch.randn(4, 3, 2, 2)
    expected = model(x)
    converted, _ = bnorm.convert(model, bnorm.BatchNormAct2d)
    assert type(converted[0]) is bnorm.BatchNormAct2d and converted[0].activation == "identity"
    torch.testing.assert_close(converted[0](x), expected)


# --- the compiled kernels ----------------------------------------------------------------


@pytest.mark.usefixtures("forced_eager_fallback")
def test_environment_variable_disables_compilation():
    assert not kernels.compile_enabled()
    before = dict(kernel_compile._COMPILED)
    run_fused(*inputs((4, 3, 2, 2), residual=True)[:5], make_act("relu"))
    assert kernel_compile._COMPILED == before


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.setenv("BNORM_NO_COMPILE", "0")
    monkeypatch.setattr(kernel_compile, "_COMPILED", {})
    monkeypatch.setattr(kernel_compile, "_COMPILE_FAILURE", None)
    monkeypatch.setattr(kernel_compile, "_dynamo_supported", lambda: True)

    def broken_compile(fn, **options):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(kernel_compile.torch, "compile", broken_compile)
    x, r, dy, w, b = inputs((4, 3, 2, 2), residual=True)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        fused = run_fused(x, r, dy, w, b, make_act("gelu"))
    assert not kernels.compile_enabled()
    monkeypatch.setenv("BNORM_NO_COMPILE", "1")
    for a, c in zip(fused, run_fused(x, r, dy, w, b, make_act("gelu"))):
        torch.testing.assert_close(a, c)


@pytest.mark.usefixtures("compiled")
def test_compiled_kernels_match_torch_and_reference_both_layouts():
    for layout in ("NCHW", "channels_last"):
        x, r, dy, w, b = inputs((6, 5, 4, 3), layout, residual=True)
        y, dx, dw, db, dr, mean, _ = run_fused(x, r, dy, w, b, make_act("relu"))
        y64, dx64, dw64, db64, dr64, cache = reference_bn_act(x, w, b, r, dy, "relu")
        assert y.stride() == x.stride()
        assert rel_err(y, y64) < 1e-5
        assert rel_err(mean, cache["mean"]) < 1e-6
        assert rel_err(dx, dx64) < 1e-4 and rel_err(dr, dr64) < 1e-5
        assert rel_err(dw, dw64) < 1e-5 and rel_err(db, db64) < 1e-5
    assert any(key[0] == "fwd" for key in kernel_compile._COMPILED)
    assert any(key[0] == "bwd" for key in kernel_compile._COMPILED)
    assert kernel_compile._COMPILE_FAILURE is None


@pytest.mark.usefixtures("compiled")
def test_compiled_memory_efficient_half_precision_matches_fallback(monkeypatch):
    x, r, dy, w, b = inputs((8, 4, 5, 5), "NCHW", residual=False, dtype=torch.bfloat16)
    act = make_act("leaky_relu")
    fused = run_fused(x, r, dy, w, b, act, True)
    assert any(
        key[0] == "bwd_out" and key[-1] == torch.bfloat16 for key in kernel_compile._COMPILED
    )
    assert kernel_compile._COMPILE_FAILURE is None
    monkeypatch.setenv("BNORM_NO_COMPILE", "1")
    fallback = run_fused(x, r, dy, w, b, act, True)
    for a, c in zip(fused, fallback):
        if a is not None:
            torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2)


def _variants(kind):
    return [
        variant
        for key, compiled in kernel_compile._COMPILED.items()
        if key[0] == kind
        for variant in compiled.variants.values()
    ]


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_parallel_variant_matches_fallback_at_one_and_two_threads(layout, monkeypatch):
    # From PARALLEL_MIN_NUMEL elements on the kernels are compiled with dynamic threads
    # (every loop in a parallel region, OpenMP's thread count at run time); smaller
    # tensors use serial code. Both thread counts run the same compiled kernel.
    shape = (8, 4, 48, 48)
    assert math.prod(shape) >= kernel_compile.PARALLEL_MIN_NUMEL
    x, r, dy, w, b = inputs(shape, layout, residual=True)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run_fused(x, r, dy, w, b, make_act("relu")))
    finally:
        torch.set_num_threads(threads)
    assert any(parallel for key, c in kernel_compile._COMPILED.items() for parallel in c.variants)
    monkeypatch.setenv("BNORM_NO_COMPILE", "1")
    fallback = run_fused(x, r, dy, w, b, make_act("relu"))
    for one, two, ref in zip(*results, fallback):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one, ref, rtol=1e-4, atol=1e-4)
    assert kernel_compile._COMPILE_FAILURE is None


@pytest.mark.usefixtures("compiled")
def test_compiled_kernels_skip_dynamo_after_compiling_and_recompile_on_a_guard_failure(
    monkeypatch,
):
    # After its first call a kernel runs Dynamo's compiled code directly when that code's
    # guards accept the arguments; a size 1 where there was none (a guard failure: Dynamo
    # specializes sizes 0 and 1) goes through Dynamo, which compiles it; either way the
    # results are the reference's. (Kernels of its own: another test may have compiled
    # one for a size 1 already.)
    monkeypatch.setattr(kernel_compile, "_COMPILED", {})
    x, r, dy, w, b = inputs((4, 3, 5, 5), residual=True)
    run_fused(x, r, dy, w, b, make_act("relu"))
    calls = []
    for variant in _variants("fwd") + _variants("bwd"):

        def counted(*args, _compiled=variant.compiled):
            calls.append(1)
            return _compiled(*args)

        monkeypatch.setattr(variant, "compiled", counted)
    again = run_fused(*inputs((6, 3, 4, 7), residual=True)[:5], make_act("relu"))
    assert calls == []
    with torch.compiler.set_stance("force_eager"):  # honoured: through Dynamo, eagerly
        run_fused(*inputs((6, 3, 4, 7), residual=True)[:5], make_act("relu"))
    assert len(calls) == 2
    calls.clear()
    x1, r1, dy1, w1, b1 = inputs((4, 3, 1, 1), residual=True)
    y, dx, dw, db, dr, _, _ = run_fused(x1, r1, dy1, w1, b1, make_act("relu"))
    assert len(calls) == 2  # forward and backward, through Dynamo
    y64, dx64, dw64, db64, dr64, _ = reference_bn_act(x1, w1, b1, r1, dy1, "relu")
    assert rel_err(y, y64) < 1e-5 and rel_err(dx, dx64) < 1e-4 and rel_err(dr, dr64) < 1e-5
    assert rel_err(dw, dw64) < 1e-5 and rel_err(db, db64) < 1e-5
    assert again[0].shape == (6, 3, 4, 7)
    assert kernel_compile._COMPILE_FAILURE is None


def test_bench_memory_part_reports_the_memory_efficient_saving():
    import argparse

    from bnorm.bench.kernels import memory_part

    result = memory_part(argparse.Namespace(quick=True, repeats=1, warmup=0))
    ratio = {(r["what"], r["layers"]): r["saved/activation"] for r in result["rows"]}
    assert ratio[("conv-BN-act block", "torch (relu)")] == pytest.approx(3.0, abs=1e-3)
    assert ratio[("conv-BN-act block", "bnorm memory_efficient (leaky_relu)")] <= 2.0 + 1e-3
    resnet = {k[1]: v for k, v in ratio.items() if k[0].startswith("ResNet-20")}
    assert resnet["bnorm-me (leaky_relu)"] < 0.6 * resnet["torch (relu)"]
    assert resnet["bnorm memory_saving (relu)"] < 0.6 * resnet["torch (relu)"]
    saving = next(r for r in result["rows"] if r["layers"] == "bnorm memory_saving (relu)")
    assert saving["saved/torch_relu"] <= 0.6
    torch_mb = next(r for r in result["rows"] if r["what"].startswith("ResNet-20"))["saved_MB"]
    # The most the scope holds during backward (recomputed outputs included): 0.60x torch
    # at batch 16, 0.56x at batch 128.
    assert saving["saved_MB"] <= saving["peak_in_backward_MB"] < 0.65 * torch_mb
