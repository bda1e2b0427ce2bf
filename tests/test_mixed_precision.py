"""Mixed dtypes in every layer: half-precision input, weight and bias with float32 running
statistics (what FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` makes of a
batch-norm layer), across every option.

The reference is the float32 computation on the same values (the half-precision input and
parameters, widened), cast to the half-precision dtype at the end. The statistics are
computed in float32 from the same values, so the running statistics agree to float32
accuracy; the output and the gradients are rounded once to the half-precision dtype, so
they agree to that dtype's tolerance (``device_checks.TOLERANCE``; the same check
runs on the GPU in tests/test_cuda.py).
"""

from __future__ import annotations

import pytest
import torch

import bnorm
import bnorm.functional as F
from device_checks import MIXED_KINDS, cast_affine, check_mixed_dtypes

HALF = [torch.bfloat16, torch.float16]
C = 3


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", MIXED_KINDS)
def test_half_parameters_with_float32_statistics_match_float32(kind, train, dtype):
    check_mixed_dtypes(kind, "cpu", dtype, train)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_input_with_half_parameters_computes_in_float32(dtype):
    # A float32 input (FSDP2 with cast_forward_inputs=False) keeps its dtype; the
    # half-precision parameters are widened, their gradients come back in their dtype.
    mixed, reference = bnorm.BatchNorm2d(C), bnorm.BatchNorm2d(C)
    cast_affine(mixed, dtype)
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
    cast_affine(layer, torch.bfloat16)
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
    cast_affine(layer, torch.bfloat16)
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
