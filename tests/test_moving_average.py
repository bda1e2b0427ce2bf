"""Moving-average batch normalization (MABN, ``moving_average=``): the NumPy spec
(:func:`bnorm.reference.moving_average_forward`/``_backward``) against independent
computations, then every layer against the spec over consecutive training steps (state
carried), its state rules (save/load, plain checkpoints, mismatched windows), evaluation,
the rules with the other options, errors (sync across gloo processes: test_distributed)."""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bnorm
from bnorm import reference as R

RNG = np.random.default_rng(20200120)
MA = bnorm.MovingAverage(window=3, warmup_steps=2)
STEPS = 6  # warm-up (2), a filling window (3..4), then a full, rolling one


# --- the spec against independent computations -----------------------------------------


def _reduced_bn_torch(x, gamma, beta, eps, axis, valid=None):
    """Reduced batch norm y = γ x/√(χ_B + ε) + β in float64 torch (autograd'ed): the
    method with a window of one batch."""
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    sq = x * x if valid is None else torch.where(valid, x * x, 0.0)
    n = x.numel() / x.shape[axis] if valid is None else valid.expand_as(x).sum(dims).view(shape)
    chi = sq.sum(dims).view(shape) / n
    return gamma.view(shape) * x / torch.sqrt(chi + eps) + beta.view(shape)


@pytest.mark.parametrize(
    ("shape", "axis", "masked"),
    [((5, 3), 1, False), ((3, 2, 4, 5), 1, True), ((2, 4, 3), -1, True)],
)
def test_reference_with_one_batch_window_is_the_gradient_of_reduced_batch_norm(shape, axis, masked):
    channels = shape[axis]
    x = RNG.normal(0.5, 2.0, size=shape)
    gamma, beta = RNG.normal(size=channels), RNG.normal(size=channels)
    dy = RNG.normal(size=shape)
    mask_shape = tuple(s for d, s in enumerate(shape) if d != axis % len(shape))
    mask = RNG.random(mask_shape) > 0.3 if masked else None
    state = R.MovingAverageState()
    y, cache, state = R.moving_average_forward(
        x, gamma, beta, state, window=1, warmup_steps=0, eps=1e-3, axis=axis, mask=mask
    )
    dx, dgamma, dbeta, _ = R.moving_average_backward(dy, cache, state)
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    valid = None if mask is None else torch.tensor(mask).unsqueeze(axis % len(shape))
    yt = _reduced_bn_torch(xt, gt, bt, 1e-3, axis, valid)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-12)


def test_reference_averages_the_last_window_batches_after_warmup():
    """χ̄_t and ψ̄_t by explicit loops: the batch's own for t ≤ warm-up, then the mean of
    the last min(t, window) batches' statistics."""
    window, warmup = 3, 2
    state = R.MovingAverageState()
    chis, psis = [], []
    for t in range(1, 7):
        x = RNG.normal(1.0, 1.5, size=(4, 2))
        dy = RNG.normal(size=(4, 2))
        gamma = np.array([0.7, -1.3])
        _, cache, state = R.moving_average_forward(
            x, gamma, np.zeros(2), state, window=window, warmup_steps=warmup, eps=0.0
        )
        chis.append([sum(v * v for v in x[:, c]) / 4 for c in range(2)])
        k = 1 if t <= warmup else min(t, window)
        chi_bar = np.mean(chis[-k:], axis=0)
        np.testing.assert_allclose(cache["chi_bar"], chi_bar, rtol=1e-13)
        dx, _, _, state = R.moving_average_backward(dy, cache, state)
        xhat = x / np.sqrt(chi_bar)
        psis.append([sum(gamma[c] * dy[i, c] * xhat[i, c] for i in range(4)) / 4 for c in range(2)])
        psi_bar = np.mean(psis[-k:], axis=0)
        np.testing.assert_allclose(dx, (gamma * dy - xhat * psi_bar) / np.sqrt(chi_bar), rtol=1e-12)


def test_reference_running_statistics_are_emas_of_the_normalizer_and_of_zero():
    rm, rv = R.moving_average_running(
        np.array([1.0, -2.0]), np.array([1.0, 4.0]), np.array([3.0, 0.5]), 0.25
    )
    np.testing.assert_allclose(rm, [0.75, -1.5])
    np.testing.assert_allclose(rv, [0.75 * 1.0 + 0.25 * 3.0, 0.75 * 4.0 + 0.25 * 0.5])


# --- layers against the spec ----------------------------------------------------------

# name: (layer factory, input shape, axis, inputs)
LAYERS: dict[str, tuple[Any, tuple[int, ...], int, tuple[str, ...]]] = {
    "BatchNorm1d-2D-batch2": (lambda: bnorm.BatchNorm1d(3, moving_average=MA), (2, 3), 1, ()),
    "BatchNorm1d-3D": (lambda: bnorm.BatchNorm1d(3, moving_average=MA), (2, 3, 4), 1, ()),
    "BatchNorm2d": (lambda: bnorm.BatchNorm2d(3, moving_average=MA), (2, 3, 4, 5), 1, ()),
    "BatchNorm3d": (lambda: bnorm.BatchNorm3d(3, moving_average=MA), (2, 3, 2, 3, 2), 1, ()),
    "axis=-1": (lambda: bnorm.BatchNorm(3, axis=-1, moving_average=MA), (2, 4, 5, 3), -1, ()),
    "mask": (lambda: bnorm.BatchNorm1d(3, moving_average=MA), (3, 3, 6), 1, ("mask",)),
    "momentum=None": (
        lambda: bnorm.BatchNorm2d(3, momentum=None, moving_average=MA), (2, 3, 4, 5), 1, ()
    ),
    "act-relu+residual": (
        lambda: bnorm.BatchNormAct2d(3, activation="relu", moving_average=MA),
        (2, 3, 4, 5), 1, ("residual",),
    ),
    "act-silu+mask": (
        lambda: bnorm.BatchNormAct1d(3, activation="silu", moving_average=MA),
        (3, 3, 6), 1, ("mask",),
    ),
    "sync-local": (lambda: bnorm.SyncBatchNorm(3, moving_average=MA), (2, 3, 4, 5), 1, ()),
    "channels_last": (lambda: bnorm.BatchNorm2d(3, moving_average=MA), (2, 3, 4, 5), 1, ("cl",)),
}  # fmt: skip


def _act(name: str, z: torch.Tensor) -> torch.Tensor:
    return {"relu": torch.relu, "silu": nn.functional.silu}[name](z)


def _check_against_reference(layer: nn.Module, shape, axis, inputs, steps=STEPS, seed=0):
    """Run ``steps`` training steps of ``layer`` and of the spec side by side."""
    g = torch.Generator().manual_seed(seed)
    channels = shape[axis]
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
    state = R.MovingAverageState()
    rm = layer.running_mean.numpy().copy()
    rv = layer.running_var.numpy().copy()
    act = getattr(layer, "activation", None)
    for step in range(steps):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
        if "cl" in inputs:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        mask_shape = tuple(s for d, s in enumerate(shape) if d != axis % len(shape))
        mask = torch.rand(mask_shape, generator=g) > 0.3 if "mask" in inputs else None
        res = torch.randn(shape, generator=g, dtype=torch.float64) if "residual" in inputs else None
        gamma = layer.weight.detach().numpy().copy()
        beta = layer.bias.detach().numpy().copy()
        layer.zero_grad()
        if act is not None:
            y = layer(x, res, mask=mask)
        else:
            y = layer(x, mask=mask) if mask is not None else layer(x)
        y.backward(dy)
        y_bn, cache, state = R.moving_average_forward(
            x.detach().numpy(), gamma, beta, state, window=MA.window,
            warmup_steps=MA.warmup_steps, eps=layer.eps, axis=axis,
            mask=None if mask is None else mask.numpy(),
        )  # fmt: skip
        dy_bn = dy.numpy()
        if act is not None:
            z = torch.tensor(y_bn, requires_grad=True)
            out = _act(act, z + (0 if res is None else res))
            out.backward(dy)
            y_ref, dy_bn = out.detach().numpy(), z.grad.numpy()
        else:
            y_ref = y_bn
        dx, dgamma, dbeta, state = R.moving_average_backward(dy_bn, cache, state)
        alpha = 1.0 / (step + 1) if layer.momentum is None else layer.momentum
        rm, rv = R.moving_average_running(rm, rv, cache["chi_bar"], alpha)
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(layer.weight.grad.numpy(), dgamma, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(layer.bias.grad.numpy(), dbeta, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(layer.running_mean.numpy(), rm, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(layer.running_var.numpy(), rv, rtol=1e-12)
        assert int(layer.moving_steps) == step + 1 == int(layer.num_batches_tracked)
        # The learnable parameters move too: the next step's γ, β differ.
        with torch.no_grad():
            layer.weight.sub_(0.1 * layer.weight.grad)
            layer.bias.sub_(0.1 * layer.bias.grad)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_equals_reference_over_consecutive_steps(name):
    factory, shape, axis, inputs = LAYERS[name]
    _check_against_reference(factory().double(), shape, axis, inputs)


def test_batchnorm1d_true_uses_the_paper_defaults_and_normalizes_a_batch_of_two():
    layer = bnorm.BatchNorm1d(4, moving_average=True)
    assert layer.moving_average == bnorm.MovingAverage(window=16, warmup_steps=100)
    assert layer.moving_chi.shape == (16, 4) and layer.moving_psi.shape == (16, 4)
    x = torch.randn(2, 4) * 3 + 1
    y = layer(x)
    chi = (x * x).mean(0)  # warm-up: the batch's own second moment
    torch.testing.assert_close(y, x / torch.sqrt(chi + layer.eps))


def test_a_single_value_per_channel_trains():
    """Reduced normalization needs one value per channel (plain batch norm needs two)."""
    layer = bnorm.BatchNorm1d(3, moving_average=bnorm.MovingAverage(window=4, warmup_steps=0))
    for _ in range(3):
        x = torch.randn(1, 3, requires_grad=True)
        layer(x).sum().backward()
        assert torch.isfinite(x.grad).all()
    assert int(layer.moving_steps) == 3


def test_small_batch_mlp_learns_with_moving_average():
    """BatchNorm1d(moving_average=True) at batch 2 trains a small classifier: the
    training loss falls well below its start (chance: log 2)."""
    torch.manual_seed(0)
    w = torch.randn(8)
    data = torch.randn(256, 8)
    labels = (data @ w > 0).long()
    model = nn.Sequential(
        nn.Linear(8, 16, bias=False),
        bnorm.BatchNorm1d(16, moving_average=bnorm.MovingAverage(window=8, warmup_steps=10)),
        nn.ReLU(),
        nn.Linear(16, 2),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _epoch in range(3):
        for i in range(0, 256, 2):
            loss = nn.functional.cross_entropy(model(data[i : i + 2]), labels[i : i + 2])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(data).argmax(1) == labels).float().mean().item()
    assert np.mean(losses[-64:]) < 0.5 * np.log(2)
    assert accuracy > 0.9


# --- evaluation ------------------------------------------------------------------------


def test_eval_is_torch_batch_norm_with_the_running_statistics(monkeypatch):
    layer = bnorm.BatchNorm2d(3, moving_average=MA)
    for _ in range(4):
        layer(torch.randn(2, 3, 4, 4) * 2 + 1).sum().backward()
    layer.eval()
    calls = []
    original = torch.nn.functional.batch_norm

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "batch_norm", spy)
    x = torch.randn(2, 3, 4, 4)
    y = layer(x)
    assert len(calls) == 1
    rm, rv = layer.running_mean, layer.running_var
    expected = (x - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + layer.eps)
    expected = expected * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected)
    assert int(layer.moving_steps) == 4  # evaluation records nothing


# --- state -----------------------------------------------------------------------------


def _steps(layer: nn.Module, seeds: range) -> list[torch.Tensor]:
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(2, 3, 4, 4, generator=g) * 2 + 1).requires_grad_()
        y = layer(x)
        (y * torch.randn(y.shape, generator=g)).sum().backward()
        out += [y.detach(), x.grad]
    return out


def test_training_resumes_exactly_after_save_and_load():
    ma = bnorm.MovingAverage(window=3, warmup_steps=1)
    whole = bnorm.BatchNorm2d(3, moving_average=ma)
    expected = _steps(whole, range(7))
    first = bnorm.BatchNorm2d(3, moving_average=ma)
    _steps(first, range(4))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = bnorm.BatchNorm2d(3, moving_average=ma)
    resumed.load_state_dict(torch.load(buffer))
    got = _steps(resumed, range(4, 7))
    for a, b in zip(got, expected[8:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_plain_checkpoint_keeps_running_statistics_and_restarts_the_windows():
    plain = nn.BatchNorm2d(3)
    plain(torch.randn(4, 3, 2, 2) * 3 + 2)
    layer = bnorm.BatchNorm2d(3, moving_average=MA)
    _steps(layer, range(2))
    layer.load_state_dict(plain.state_dict())  # strict: the windows are not required
    torch.testing.assert_close(layer.running_var, plain.running_var)
    torch.testing.assert_close(layer.running_mean, plain.running_mean)
    assert int(layer.moving_steps) == 0
    assert not layer.moving_chi.any() and not layer.moving_psi.any()


@pytest.mark.parametrize(
    "other", [bnorm.MovingAverage(window=4, warmup_steps=2), "channels"], ids=["window", "channels"]
)
def test_checkpoint_with_other_windows_is_refused_before_anything_changes(other):
    source = (
        bnorm.BatchNorm2d(4, moving_average=MA)
        if other == "channels"
        else bnorm.BatchNorm2d(3, moving_average=other)
    )
    _steps(source, range(2)) if other != "channels" else None
    layer = bnorm.BatchNorm2d(3, moving_average=MA)
    _steps(layer, range(2))
    before = copy.deepcopy(layer.state_dict())
    state = source.state_dict()
    if other == "channels":  # only the windows differ: a hand-made checkpoint
        state = {**layer.state_dict(), "moving_chi": state["moving_chi"]}
    with pytest.raises(ValueError, match=r"expected moving_chi of shape \(3, 3\)"):
        layer.load_state_dict(state)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_moving_checkpoint_into_a_plain_layer_reports_the_windows():
    layer = bnorm.BatchNorm2d(3, moving_average=MA)
    with pytest.raises(RuntimeError, match="moving_chi"):
        bnorm.BatchNorm2d(3).load_state_dict(layer.state_dict())


def test_setting_the_option_remakes_the_windows():
    layer = bnorm.BatchNorm2d(3)
    assert "moving_chi" not in layer.state_dict()
    layer.moving_average = True
    assert layer.moving_chi.shape == (16, 3)
    layer.moving_average = bnorm.MovingAverage(window=2)
    assert layer.moving_psi.shape == (2, 3)
    layer.moving_average = None
    assert "moving_chi" not in layer.state_dict() and layer._plan.plain


def test_nonfinite_batch_records_nothing():
    layer = bnorm.BatchNorm2d(3, moving_average=MA)
    _steps(layer, range(3))
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 0, 0] = float("inf")
    x.requires_grad_()
    layer(x).sum().backward()
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)
    assert int(layer.num_batches_skipped) == 1


# --- options and errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, r"expected window to be an int >= 1 \(got 0\)"),
        ({"window": 2.0}, r"expected window to be an int >= 1 \(got 2.0\)"),
        ({"warmup_steps": -1}, r"expected warmup_steps to be an int >= 0 \(got -1\)"),
    ],
)
def test_moving_average_option_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bnorm.MovingAverage(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"virtual_batch_size": 2}, "expected virtual_batch_size off with moving_average"),
        ({"renorm": True}, "expected renorm off with moving_average"),
        ({"track_running_stats": False}, "expected track_running_stats=True with moving_average"),
    ],
)
def test_options_that_replace_the_statistics_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bnorm.BatchNorm2d(3, moving_average=True, **kwargs)


def test_memory_efficient_is_refused():
    with pytest.raises(ValueError, match="expected memory_efficient off with moving_average"):
        bnorm.BatchNormAct2d(
            3, activation="leaky_relu", memory_efficient=True, moving_average=True
        )


def test_option_type_is_checked_and_layer_unchanged_on_error():
    layer = bnorm.BatchNorm2d(3, virtual_batch_size=2)
    with pytest.raises(ValueError, match="virtual_batch_size off"):
        layer.moving_average = True
    assert layer.moving_average is None and "moving_chi" not in layer.state_dict()
    with pytest.raises(TypeError, match=r"expected moving_average to be a bnorm.MovingAverage"):
        bnorm.BatchNorm1d(3, moving_average=16)


def test_functional_needs_the_moving_state():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"expected moving_state="):
        bnorm.functional.batch_norm(x, None, None, training=True, moving_average=True)
    bad = (torch.zeros(4, 3), torch.zeros(16, 3), torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected the chi ring of shape \(16, 3\)"):
        bnorm.functional.batch_norm(
            x, None, None, training=True, moving_average=True, moving_state=bad
        )


def test_functional_equals_the_layer():
    ma = bnorm.MovingAverage(window=2, warmup_steps=0)
    layer = bnorm.BatchNorm1d(3, moving_average=ma)
    state = (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros((), dtype=torch.long))
    rm, rv = torch.zeros(3), torch.ones(3)
    for _ in range(3):
        x = torch.randn(5, 3)
        y = bnorm.functional.batch_norm(
            x, rm, rv, training=True, moving_average=ma, moving_state=state
        )
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    torch.testing.assert_close(rv, layer.running_var, rtol=0, atol=0)
    torch.testing.assert_close(state[0], layer.moving_chi, rtol=0, atol=0)


def test_mask_without_valid_values_is_an_error():
    layer = bnorm.BatchNorm1d(3, moving_average=MA)
    with pytest.raises(ValueError, match="expected at least 1 valid value per channel"):
        layer(torch.randn(2, 3, 4), mask=torch.zeros(2, 4, dtype=torch.bool))
    assert int(layer.moving_steps) == 0


def test_double_backward_is_refused():
    layer = bnorm.BatchNorm1d(3, moving_average=MA)
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="expected no double backward"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


def test_convert_carries_the_option():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    converted, _ = bnorm.convert(model, bnorm.BatchNorm2d, moving_average=MA)
    assert converted[1].moving_average == MA
    act, _ = bnorm.convert(converted, bnorm.BatchNormAct2d)
    assert act[1].moving_average == MA
    torch.testing.assert_close(act[1].moving_chi, converted[1].moving_chi)


# --- weight centralization -------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = bnorm.BatchNorm2d(4, moving_average=MA)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 5), bnorm.BatchNorm1d(5))
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.relu(self.conv2(self.bn1(self.conv1(x))))))


def test_centralize_weights_picks_the_layers_before_batch_norm():
    model = _Block()
    assert bnorm.centralize_weights(model) == ["conv1", "head.1"]
    assert bnorm.centralize_weights(model) == []  # already centralized
    assert bnorm.centralize_weights(model, all_layers=True) == ["conv2", "fc"]


@pytest.mark.parametrize("name", ["conv1", "conv2", "head.1"])
def test_centralized_weights_have_zero_mean_per_output_channel(name):
    model = _Block()
    bnorm.centralize_weights(model, all_layers=True)
    layer = model.get_submodule(name)
    raw = layer.parametrizations.weight.original.detach()
    w = layer.weight.detach()
    dims = tuple(range(1, w.dim()))
    torch.testing.assert_close(w.mean(dims), torch.zeros(w.shape[0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(w, raw - raw.mean(dims, keepdim=True))
    assert raw.mean(dims).abs().max() > 1e-3  # the raw weight itself is not centered


def test_centralized_weight_gradient_is_the_projected_gradient():
    """∂L/∂W_raw = P(∂L/∂W') with P the projection W ↦ W − mean over the fan-in: the
    gradient of the centered conv, computed with a plain conv, projected by hand."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    plain = copy.deepcopy(conv)
    bnorm.centralize_weights(nn.Sequential(conv, nn.BatchNorm2d(4)))
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    dy = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    conv(x).backward(dy)
    plain(x).backward(dy)
    g = plain.weight.grad
    expected = g - g.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(conv.parametrizations.weight.original.grad, expected)


def test_centralization_refuses_a_vector():
    with pytest.raises(ValueError, match=r"expected a weight of at least 2 dimensions"):
        bnorm.CentralizedWeight()(torch.ones(3))


def test_accumulate_refuses_moving_average_layers():
    model = nn.Sequential(nn.Linear(3, 4), bnorm.BatchNorm1d(4, moving_average=MA))
    with pytest.raises(ValueError, match="expected no moving_average layer in an accumulate"):
        bnorm.accumulate(model)


def test_convert_for_inference_drops_the_option_and_keeps_the_outputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnorm.BatchNorm2d(4, moving_average=MA))
    for _ in range(3):
        model(torch.randn(2, 3, 6, 6)).sum().backward()
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    kept, report = bnorm.convert(copy.deepcopy(model), nn.BatchNorm2d)
    assert type(kept[1]) is bnorm.BatchNorm2d and "moving-average" in str(report)
    plain, report = bnorm.convert(model, nn.BatchNorm2d, for_inference=True)
    assert type(plain[1]) is nn.BatchNorm2d
    assert report.dropped == [("1", f"moving_average={MA}")]
    torch.testing.assert_close(plain(x), expected)


def test_reset_running_stats_empties_the_windows():
    layer = bnorm.BatchNorm2d(3, moving_average=MA)
    _steps(layer, range(2))
    layer.reset_running_stats()
    assert int(layer.moving_steps) == 0
    assert not layer.moving_chi.any() and not layer.moving_psi.any()
    torch.testing.assert_close(layer.running_var, torch.ones(3))
