"""Mixed dtypes in every layer: half-precision input, weight and bias with float32 running
statistics (what FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` makes of a
batch-norm layer), across every option.

The reference is the float32 computation on the same values (the half-precision input and
parameters, widened), cast to the half-precision dtype at the end. The statistics are
computed in float32 from the same values, so the running statistics agree to float32
accuracy; the output and the gradients are rounded once to the half-precision dtype, so
they agree to that dtype's tolerance (``TOL``).
"""

from __future__ import annotations

import pytest
import torch

import bnorm
import bnorm.functional as F

# Output and gradients: one rounding to the dtype (8 significant bits for bfloat16, 11 for
# float16) of values of order 1-10, plus the float32 sums' differences.
TOL = {
    torch.bfloat16: {"atol": 3e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 4e-3, "rtol": 2e-3},
}
# The running statistics: float32 sums of the same half-precision values in both runs.
STATS_TOL = {"atol": 1e-5, "rtol": 1e-5}
HALF = [torch.bfloat16, torch.float16]
C = 3


def _layer(kind: str) -> torch.nn.Module:
    renorm = bnorm.Renorm(1.5, 0.5, 0, 0, 0)  # (r, d) clipped from the first step
    layers = {
        "plain": lambda: bnorm.BatchNorm2d(C),
        "momentum_none": lambda: bnorm.BatchNorm2d(C, momentum=None),
        "axis_last": lambda: bnorm.BatchNorm(C, axis=-1),
        "mask": lambda: bnorm.BatchNorm2d(C),
        "ghost": lambda: bnorm.BatchNorm2d(C, virtual_batch_size=4),
        "renorm": lambda: bnorm.BatchNorm2d(C, renorm=renorm),
        "renorm_mask": lambda: bnorm.BatchNorm2d(C, renorm=renorm),
        "sync": lambda: bnorm.SyncBatchNorm(C),
        "act": lambda: bnorm.BatchNormAct2d(C, activation="silu"),
        "act_residual": lambda: bnorm.BatchNormAct2d(C, activation="relu"),
        "memory_efficient": lambda: bnorm.BatchNormAct2d(
            C, activation="leaky_relu", memory_efficient=True
        ),
        "frozen": lambda: bnorm.FrozenBatchNorm2d(C),
    }
    layer = layers[kind]()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=g))
        if kind == "frozen":
            layer.running_mean.copy_(torch.randn(C, generator=g))
            layer.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return layer


def _cast_affine(layer: torch.nn.Module, dtype: torch.dtype) -> None:
    """The affine parameters (buffers, for a frozen layer) in ``dtype``, the running
    statistics left in float32: what FSDP2's MixedPrecisionPolicy does to a layer."""
    for name in ("weight", "bias"):
        t = getattr(layer, name)
        if isinstance(t, torch.nn.Parameter):
            t.data = t.data.to(dtype)
        else:
            setattr(layer, name, t.to(dtype))


def _run(kind: str, layer: torch.nn.Module, dtype: torch.dtype, train: bool) -> dict:
    """Two steps of ``layer`` on data in ``dtype`` (the float32 run gets the same values
    widened: ``dtype`` names the values, ``layer``'s parameters decide the computation)."""
    layer.train(train)
    out: dict[str, torch.Tensor] = {}
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        x = (torch.randn(8, C, 4, 5, generator=g) * 2 + 1).to(dtype)
        dy = torch.randn(8, C, 4, 5, generator=g).to(dtype)
        r = torch.randn(8, C, 4, 5, generator=g).to(dtype)
        mask = torch.rand(8, 4, 5, generator=g) > 0.3
        if layer.weight.dtype == torch.float32:  # the reference: the values widened
            x, dy, r = x.float(), dy.float(), r.float()
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
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), x.grad.detach()
    if isinstance(layer.weight, torch.nn.Parameter):
        out["dweight"], out["dbias"] = layer.weight.grad, layer.bias.grad
    out["running_mean"], out["running_var"] = layer.running_mean, layer.running_var
    return out


KINDS = [
    "plain", "momentum_none", "axis_last", "mask", "ghost", "renorm", "renorm_mask", "sync",
    "act", "act_residual", "memory_efficient", "frozen",
]  # fmt: skip


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_half_parameters_with_float32_statistics_match_float32(kind, train, dtype):
    mixed = _layer(kind)
    _cast_affine(mixed, dtype)
    reference = _layer(kind)  # float32, with the same (rounded) parameter values
    _cast_affine(reference, dtype)
    _cast_affine(reference, torch.float32)
    got = _run(kind, mixed, dtype, train)
    want = _run(kind, reference, dtype, train)
    for name, value in got.items():
        if name.startswith(("y", "dx")):
            assert value.dtype == dtype, name  # the input's dtype
            torch.testing.assert_close(value, want[name].to(dtype), **TOL[dtype], msg=name)
        elif name.startswith("d"):
            assert value.dtype == dtype, name  # the parameters' dtype
            torch.testing.assert_close(value, want[name].to(dtype), **TOL[dtype], msg=name)
        else:
            assert value.dtype == torch.float32, name  # kept in float32
            torch.testing.assert_close(value, want[name], **STATS_TOL, msg=name)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_input_with_half_parameters_computes_in_float32(dtype):
    # A float32 input (FSDP2 with cast_forward_inputs=False) keeps its dtype; the
    # half-precision parameters are widened, their gradients come back in their dtype.
    mixed, reference = bnorm.BatchNorm2d(C), bnorm.BatchNorm2d(C)
    _cast_affine(mixed, dtype)
    x = torch.randn(8, C, 4, 4) * 2 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = mixed(x1), reference(x2)
    assert y1.dtype == torch.float32
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    (y1 * x).sum().backward()
    (y2 * x).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
    assert mixed.weight.grad.dtype == dtype
    torch.testing.assert_close(mixed.weight.grad, reference.weight.grad.to(dtype))
    torch.testing.assert_close(mixed.running_var, reference.running_var, atol=0, rtol=0)


def test_torch_layer_refuses_half_parameters_with_float32_statistics():
    # The failure the rule fixes, measured on torch's own layer (docs/variants.md's table).
    layer = torch.nn.BatchNorm2d(C)
    _cast_affine(layer, torch.bfloat16)
    with pytest.raises(RuntimeError, match="expected scalar type BFloat16 but found Float"):
        layer(torch.randn(4, C, 2, 2, dtype=torch.bfloat16))


def test_autocast_conv_bn_keeps_float32_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3), bnorm.BatchNorm2d(C))
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert model[1].running_mean.dtype == torch.float32
    assert model[1].weight.grad.dtype == torch.float32
    # The batch statistics of the bf16 convolution output, computed in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = model[0](x)
    assert conv.dtype == torch.bfloat16
    mean = conv.float().mean((0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, 0.1 * mean, atol=1e-6, rtol=1e-5)


# --- refused mixes ------------------------------------------------------------------------


def _state(layer: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in layer.buffers()]


def test_float64_input_with_bfloat16_weight_is_refused_before_any_update():
    layer = bnorm.BatchNorm2d(C, dtype=torch.float64)
    _cast_affine(layer, torch.bfloat16)
    before = _state(layer)
    with pytest.raises(TypeError, match=r"float64 does not mix.*weight torch\.bfloat16"):
        layer(torch.randn(4, C, 2, 2, dtype=torch.float64))
    for a, b in zip(before, layer.buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_float32_input_with_float64_statistics_is_refused():
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 does not mix"):
        F.batch_norm(torch.randn(4, C), rm, rv, training=True)
    torch.testing.assert_close(rm, torch.zeros(C, dtype=torch.float64), atol=0, rtol=0)


def test_running_statistics_of_two_dtypes_are_refused():
    rm, rv = torch.zeros(C), torch.ones(C, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="running_mean and running_var of one dtype"):
        F.batch_norm(torch.randn(4, C), rm, rv, training=True)
    assert rm.abs().sum() == 0


def test_integer_weight_is_refused():
    with pytest.raises(TypeError, match="expected a floating-point weight"):
        F.batch_norm(torch.randn(4, C), None, None, torch.ones(C, dtype=torch.long))
