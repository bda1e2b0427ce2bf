"""bnorm.memory_saving: fused layers' outputs recomputed in backward instead of saved.

Outputs and gradients against the same model without the scope and against torch's
layers (float64, eager fallback; one compiled test), the recomputed value against the
forward's bit for bit, the saved bytes against the amount computed from the shapes, the
storages actually released, channels_last, in-place checks, misuse and exceptions.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

import bnorm
from bnorm.kernels.memory import current_scope
from bnorm.testing import saved_tensor_bytes

# Tests of the fused kernels themselves, on small tensors: the Function at every size.
pytestmark = pytest.mark.usefixtures("eager_fallback", "fused_at_every_size")


class Net(nn.Module):
    """stem conv → BN → ReLU, one basic block (conv → BN → ReLU → conv → BN → +x → ReLU),
    global mean, linear; ``norm``: "bnorm" (BatchNormAct2d) or "torch" (separate layers)."""

    def __init__(self, norm: str, c: int = 4) -> None:
        super().__init__()
        self.norm = norm
        self.stem = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        make = (lambda: bnorm.BatchNormAct2d(c)) if norm == "bnorm" else (lambda: nn.BatchNorm2d(c))
        self.bn0, self.bn1, self.bn2 = make(), make(), make()
        self.fc = nn.Linear(c, 3)
        self.probe: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.norm == "bnorm":
            y0 = self.bn0(self.stem(x))
            y1 = self.bn1(self.conv1(y0))
            y2 = self.bn2(self.conv2(y1), y0)
        else:
            y0 = torch.relu(self.bn0(self.stem(x)))
            y1 = torch.relu(self.bn1(self.conv1(y0)))
            y2 = torch.relu(self.bn2(self.conv2(y1)) + y0)
        self.probe = [y0, y1]
        return self.fc(y2.mean((2, 3)))


def make_pair(dtype: torch.dtype = torch.float64) -> tuple[Net, Net, Net]:
    torch.manual_seed(0)
    ours = Net("bnorm").to(dtype)
    with torch.no_grad():
        for bn in (ours.bn0, ours.bn1, ours.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    plain = Net("bnorm").to(dtype)
    theirs = Net("torch").to(dtype)
    plain.load_state_dict(ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    return ours, plain, theirs


def step(model: Net, x: Tensor, scope: bool) -> tuple[Tensor, list[Tensor]]:
    x = x.detach().clone().requires_grad_()
    if scope:
        with bnorm.memory_saving():
            out = model(x)
    else:
        out = model(x)
    model.probe = []
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    assert x.grad is not None
    return out.detach(), [x.grad, *(p.grad for p in model.parameters() if p.grad is not None)]


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_outputs_and_gradients_equal_plain_bnorm_and_torch_float64(layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours, plain, theirs = make_pair()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64).to(memory_format=fmt)
    results = [step(ours, x, True), step(plain, x, False), step(theirs, x, False)]
    out, grads = results[0]
    assert len(grads) == 1 + len(list(ours.parameters()))
    for other_out, other_grads in results[1:]:
        torch.testing.assert_close(out, other_out, rtol=0, atol=1e-10)
        for g, h in zip(grads, other_grads, strict=True):
            torch.testing.assert_close(g, h, rtol=0, atol=1e-10)
    for a, b in ((ours, plain), (ours, theirs)):
        for name in ("bn0", "bn1", "bn2"):
            torch.testing.assert_close(getattr(a, name).running_mean, getattr(b, name).running_mean)
            torch.testing.assert_close(getattr(a, name).running_var, getattr(b, name).running_var)


def test_saved_bytes_drop_by_the_outputs_and_their_storages_are_freed():
    ours, plain, theirs = make_pair()
    n, c, side = 6, 4, 8
    x = torch.randn(n, 3, side, side, dtype=torch.float64)
    with bnorm.memory_saving() as scope:
        out = ours(x)
    refs = [StorageWeakRef(t.untyped_storage()) for t in ours.probe]
    ours.probe = []
    ours_bytes = scope.stored_bytes(exclude=ours)
    plain_bytes, _ = saved_tensor_bytes(lambda: plain(x), exclude=plain)
    torch_bytes, _ = saved_tensor_bytes(lambda: theirs(x), exclude=theirs)
    act = n * c * side * side * 8  # one activation, float64
    # Plain bnorm stores y0 (conv1's input and bn2's residual) and y1 (conv2's input);
    # torch's layers also the block's ReLU output. The scope stores neither y0 nor y1, but
    # keeps their layers' scale and shift (C each) to recompute them (y2's are released:
    # nothing saved y2).
    coefficients = 2 * 2 * c * 8
    assert plain_bytes - ours_bytes == 2 * act - coefficients
    assert torch_bytes - ours_bytes == 3 * act - coefficients
    assert all(r.expired() for r in refs)  # y0 and y1 are really released
    out.sum().backward()
    assert all(p.grad is not None for p in ours.parameters())


class Probe(torch.autograd.Function):
    """Saves its input; in backward records whether the unpacked saved tensor equals (bit
    for bit, same strides) a copy taken in the forward."""

    equal: ClassVar[list[bool]] = []

    @staticmethod
    def forward(ctx, t):  # type: ignore[override]
        ctx.save_for_backward(t)
        ctx.copy = t.detach().clone()
        ctx.stride = t.stride()
        return t * 2

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        Probe.equal.append(torch.equal(saved, ctx.copy) and saved.stride() == ctx.stride)
        return g * 2


def recomputed_equals_forward(dtype: torch.dtype) -> list[bool]:
    torch.manual_seed(0)
    layer = bnorm.BatchNormAct2d(5)  # float32 parameters, statistics in float32
    x = torch.randn(4, 5, 6, 6, dtype=dtype).to(memory_format=torch.channels_last)
    r = torch.randn(4, 5, 6, 6, dtype=dtype).to(memory_format=torch.channels_last)
    Probe.equal = []
    with bnorm.memory_saving() as scope:
        y = layer(x.requires_grad_(), r)
        out = Probe.apply(y)
        view = Probe.apply(y[:, 1:3, ::2])  # a view of a registered output
    ref = StorageWeakRef(y.untyped_storage())
    del y
    assert ref.expired()  # y is released
    # Stored: x and r (the layer's backward needs them); μ, 1/σ, scale, shift (C each, float32).
    item = x.element_size()
    assert scope.stored_bytes(exclude=layer) == 2 * x.numel() * item + 4 * 5 * 4
    (out.sum() + view.sum()).backward()
    return Probe.equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_output_is_the_forward_output_bit_for_bit(dtype):
    assert recomputed_equals_forward(dtype) == [True, True]


@pytest.mark.usefixtures("compiled")
def test_compiled_kernels_gradients_and_bit_exact_recompute():
    ours, plain, _ = make_pair(torch.float32)
    x = torch.randn(6, 3, 8, 8)
    out, grads = step(ours, x, True)
    ref_out, ref_grads = step(plain, x, False)
    torch.testing.assert_close(out, ref_out)
    for g, h in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)
    for name in ("bn0", "bn1", "bn2"):  # the compiled statistics kernel's running update
        ours_var, plain_var = getattr(ours, name).running_var, getattr(plain, name).running_var
        torch.testing.assert_close(ours_var, plain_var)
    assert recomputed_equals_forward(torch.float32) == [True, True]


def test_in_place_change_after_saving_is_detected():
    # (A BatchNormAct output cannot be modified in place at all: autograd forbids it for a
    # custom Function's view outputs. A stored tensor keeps autograd's version check.)
    layer = bnorm.BatchNormAct2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    with bnorm.memory_saving():
        h = x * 1.0
        y = layer(h)
    with torch.no_grad():
        h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_nested_scope_is_an_error_and_an_exception_leaves_nothing_behind():
    with bnorm.memory_saving():
        with pytest.raises(ValueError, match=r"expected no enclosing bnorm\.memory_saving"):
            with bnorm.memory_saving():
                pass
    assert current_scope() is None
    with pytest.raises(ZeroDivisionError):
        with bnorm.memory_saving():
            bnorm.BatchNormAct2d(3)(torch.randn(4, 3, 2, 2, requires_grad=True))
            raise ZeroDivisionError
    assert current_scope() is None
    # No saved-tensor hooks are left: a plain forward saves its tensors as autograd does.
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    ours, plain, _ = make_pair()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    a, b = step(ours, x, False), step(plain, x, False)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    scope = bnorm.memory_saving()
    with scope:
        pass
    with scope:  # reusable after it has been left
        pass


def test_memory_efficient_and_no_grad_layers_do_not_register():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    me = bnorm.BatchNormAct2d(3, activation="leaky_relu", memory_efficient=True)
    with bnorm.memory_saving() as scope:
        me(x)
        with torch.no_grad():
            bnorm.BatchNormAct2d(3)(x)
        assert not scope._entries
