"""Batch Renorm, ghost batches, masks and frozen BN against independent references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import bnorm
from bnorm import reference

# ---------------------------------------------------------------- Batch Renormalization


def _renorm_numpy(xs, gamma, beta, r_max, d_max, momentum=0.1, eps=1e-5):
    """Algorithm 1 of Ioffe (2017), transcribed for NCHW batches, with the running
    variance kept as torch does (unbiased batch variance), so σ = √(running_var + ε)."""
    mu = np.zeros(gamma.shape)
    var = np.ones(gamma.shape)
    outs = []
    for x in xs:
        axes = (0, 2, 3)
        m = x.size // x.shape[1]
        mu_b = x.mean(axis=axes)
        sigma_b = np.sqrt(((x - mu_b[None, :, None, None]) ** 2).mean(axis=axes) + eps)
        sigma = np.sqrt(var + eps)
        r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
        d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
        xhat = (x - mu_b[None, :, None, None]) / sigma_b[None, :, None, None]
        xhat = xhat * r[None, :, None, None] + d[None, :, None, None]
        outs.append(gamma[None, :, None, None] * xhat + beta[None, :, None, None])
        mu = mu + momentum * (mu_b - mu)
        unbiased = (sigma_b**2 - eps) * m / (m - 1)
        var = var + momentum * (unbiased - var)
    return outs, mu, var


@pytest.mark.parametrize(
    "path",
    # compiled: Batch Renorm takes the moments kernel instead of ATen (make test runs both)
    [pytest.param("native", marks=pytest.mark.compiled_kernels), "masked"],
)
def test_renorm_matches_numpy_transcription_of_the_paper(path):
    rng = np.random.default_rng(0)
    # Non-stationary batches so that r and d actually clip.
    xs = [rng.normal(loc=3.0 * i, scale=1.0 + i, size=(6, 3, 4, 4)) for i in range(4)]
    gamma, beta = np.array([1.0, 0.5, 2.0]), np.array([0.0, 0.3, -0.1])
    expected, mu, var = _renorm_numpy(xs, gamma, beta, r_max=1.5, d_max=0.5)
    layer = bnorm.BatchNorm2d(3, renorm=bnorm.Renorm(1.5, 0.5, 0, 0, 0)).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    full = torch.ones(6, 4, 4, dtype=torch.bool)
    for x, want in zip(xs, expected):
        t = torch.from_numpy(x)
        y = layer(t) if path == "native" else layer(t, mask=full)
        np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.running_mean.numpy(), mu, rtol=1e-10)
    np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-10)


def test_renorm_with_unit_limits_equals_plain_batch_norm_in_every_step():
    torch.manual_seed(0)
    renorm = bnorm.BatchNorm2d(3, renorm=bnorm.Renorm(1.0, 0.0, 0, 0, 0))
    plain = torch.nn.BatchNorm2d(3)
    for step in range(3):
        x = torch.randn(8, 3, 5, 5) * (step + 1) + step
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = renorm(a), plain(b)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(renorm.weight.grad, plain.weight.grad)
    torch.testing.assert_close(renorm.bias.grad, plain.bias.grad)
    torch.testing.assert_close(renorm.running_var, plain.running_var)


def test_renorm_r_and_d_are_constants_for_backprop():
    # Treating r, d as constants: dL/dγ = Σ g·(x̂_B r + d), dL/dx is BN's backward with γ·r.
    torch.manual_seed(1)
    layer = bnorm.BatchNorm2d(2, renorm=bnorm.Renorm(2.0, 1.0, 0, 0, 0)).double()
    layer.running_mean.fill_(0.5)
    layer.running_var.fill_(4.0)
    x = (torch.randn(6, 2, 3, 3, dtype=torch.float64) * 0.5).requires_grad_()
    dy = torch.randn_like(x)
    layer(x).backward(dy)
    _, cache = reference.forward(x.detach().numpy(), np.ones(2), np.zeros(2), axis=1)
    mean, var = cache["mean"], cache["var"]
    sigma_b, sigma = np.sqrt(var + 1e-5), np.sqrt(4.0 + 1e-5)
    r = np.clip(sigma_b / sigma, 0.5, 2.0)
    d = np.clip((mean - 0.5) / sigma, -1.0, 1.0)
    assert not np.allclose(r, 1.0)  # the correction is active
    dx, dgamma_hat, dbeta = reference.backward(dy.numpy(), {**cache, "gamma": r})
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad.numpy(), dgamma_hat * r + d * dbeta, rtol=1e-9)
    np.testing.assert_allclose(layer.bias.grad.numpy(), dbeta, rtol=1e-9)


@pytest.mark.parametrize(
    ("step", "r_max", "d_max"),
    [
        (0, 1.0, 0.0),
        (4999, 1.0, 0.0),
        (5000, 1.0, 0.0),
        (22500, 2.0, 4.375),
        (25000, 1 + 2 * 20 / 35, 5.0),
        (40000, 3.0, 5.0),
        (10**6, 3.0, 5.0),
    ],
)
def test_renorm_schedule_follows_the_paper(step, r_max, d_max):
    # Paper: r_max = 1, d_max = 0 for 5k steps, then r_max → 3 at 40k, d_max → 5 at 25k.
    r, d = bnorm.Renorm().limits(torch.tensor(step))
    assert r.item() == pytest.approx(r_max)
    assert d.item() == pytest.approx(d_max)


def test_renorm_schedule_survives_a_checkpoint_round_trip():
    a = bnorm.BatchNorm2d(3, renorm=bnorm.Renorm(3.0, 5.0, 2, 4, 4))
    for _ in range(5):
        a(torch.randn(4, 3, 2, 2) * 3 + 2)
    b = bnorm.BatchNorm2d(3, renorm=bnorm.Renorm(3.0, 5.0, 2, 4, 4))
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 2, 2) * 0.2 + 7  # far from the running statistics: clipping active
    torch.testing.assert_close(a(x), b(x))
    fresh = bnorm.BatchNorm2d(3, renorm=bnorm.Renorm(3.0, 5.0, 2, 4, 4))
    fresh.running_mean.copy_(a.running_mean)
    fresh.running_var.copy_(a.running_var)
    assert not torch.allclose(fresh(x), b(x))  # step 0 = warm-up: plain BN, different output


def test_renorm_rejects_layer_without_running_statistics():
    with pytest.raises(ValueError, match="renorm needs running statistics"):
        bnorm.BatchNorm2d(3, renorm=True, track_running_stats=False)


@pytest.mark.parametrize(
    "kwargs",
    [{"r_max": 0.5}, {"d_max": -1.0}, {"warmup_steps": -1}, {"r_ramp_steps": 1.5}],
)
def test_renorm_rejects_bad_schedule(kwargs):
    with pytest.raises(ValueError, match="expected"):
        bnorm.Renorm(**kwargs)


# ---------------------------------------------------------------- ghost batch norm

GHOST_CASES = list(itertools.product([(2, 4), (4, 2), (8, 1)], ["channels_first", "channels_last"]))


@pytest.mark.parametrize(("split", "layout"), GHOST_CASES)
def test_ghost_equals_explicit_per_group_batch_norm(split, layout):
    k, groups = split
    torch.manual_seed(2)
    x = torch.randn(k * groups, 3, 4, 4, dtype=torch.float64) * 3 + 1
    axis = 1
    if layout == "channels_last":
        x, axis = x.permute(0, 2, 3, 1).contiguous(), -1
    layer = bnorm.BatchNorm(3, axis=axis, virtual_batch_size=k).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, 0.5]))
    xa = x.clone().requires_grad_()
    y = layer(xa)
    dy = torch.randn_like(y)
    y.backward(dy)
    # Reference: NumPy spec per group, and hand-derived backward per group.
    dgamma = np.zeros(3)
    for gi in range(groups):
        sl = slice(gi * k, (gi + 1) * k)
        y_ref, cache = reference.forward(
            x[sl].numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy(), axis=axis
        )
        np.testing.assert_allclose(y[sl].detach().numpy(), y_ref, rtol=1e-10, atol=1e-12)
        dx, dg, _ = reference.backward(dy[sl].numpy(), cache)
        np.testing.assert_allclose(xa.grad[sl].numpy(), dx, rtol=1e-8, atol=1e-10)
        dgamma += dg
    np.testing.assert_allclose(layer.weight.grad.numpy(), dgamma, rtol=1e-9)
    # Running statistics: from the merged moments, as if from the whole batch.
    whole_mean, whole_var = reference.population_statistics([x.numpy()], axis=axis)
    expected_mean, expected_var = reference.update_running(
        np.zeros(3),
        np.ones(3),
        whole_mean,
        whole_var * (x.numel() // 3 - 1) / (x.numel() // 3),
        x.numel() // 3,
        0.1,
    )
    np.testing.assert_allclose(layer.running_mean.numpy(), expected_mean, rtol=1e-10)
    np.testing.assert_allclose(layer.running_var.numpy(), expected_var, rtol=1e-10)


def test_ghost_gradcheck_float64():
    layer = bnorm.BatchNorm1d(2, virtual_batch_size=3).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: layer(t), (x,))


def test_ghost_rejects_batch_not_divisible_and_leaves_state_unchanged():
    layer = bnorm.BatchNorm2d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"divisible by virtual_batch_size=4 \(got 6\)"):
        layer(torch.randn(6, 3, 2, 2))
    assert layer.num_batches_tracked.item() == 0
    torch.testing.assert_close(layer.running_mean, torch.zeros(3))


@pytest.mark.parametrize("batch", [2, 4])
def test_ghost_batch_no_larger_than_k_is_one_group(batch):
    torch.manual_seed(4)
    x = torch.randn(batch, 3, 5, 5)
    ghost, plain = bnorm.BatchNorm2d(3, virtual_batch_size=4), torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(ghost(x), plain(x))
    torch.testing.assert_close(ghost.running_var, plain.running_var)


def test_ghost_group_of_one_value_per_channel_raises():
    layer = bnorm.BatchNorm1d(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        layer(torch.randn(4, 3))
    assert layer.num_batches_tracked.item() == 0


def test_ghost_eval_uses_running_statistics():
    layer = bnorm.BatchNorm2d(3, virtual_batch_size=2)
    layer(torch.randn(8, 3, 2, 2))
    layer.eval()
    x = torch.randn(3, 3, 2, 2)  # any batch size in eval
    plain = torch.nn.BatchNorm2d(3).eval()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), plain(x))


# ---------------------------------------------------------------- masks

MASK_CASES = list(itertools.product([1, -1], [True, False]))


@pytest.mark.parametrize(("axis", "affine"), MASK_CASES)
def test_masked_equals_batch_norm_of_valid_positions_only(axis, affine):
    torch.manual_seed(3)
    n, c, length = 5, 4, 7
    x = torch.randn(n, c, length, dtype=torch.float64) * 2 + 3
    mask = torch.rand(n, length) > 0.4
    x[:, :, :][~mask.unsqueeze(1).expand(n, c, length)] = float("nan")  # padding may be garbage
    xin = x if axis == 1 else x.permute(0, 2, 1).contiguous()
    layer = bnorm.BatchNorm(c, axis=axis, affine=affine).double()
    y = layer(xin, mask=mask)
    y_cl = y if axis == -1 else y.permute(0, 2, 1)
    valid = x.permute(0, 2, 1)[mask]  # (V, C)
    plain = torch.nn.BatchNorm1d(c, affine=affine).double()
    torch.testing.assert_close(y_cl[mask], plain(valid), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_mean, plain.running_mean)
    torch.testing.assert_close(layer.running_var, plain.running_var)


def test_masked_padded_positions_use_the_same_statistics():
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 4:] = False
    layer = bnorm.BatchNorm1d(2, affine=False).double()
    y = layer(x, mask=mask)
    valid = x.permute(0, 2, 1)[mask]
    mean, var = valid.mean(0), valid.var(0, unbiased=False)
    expected = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + 1e-5)
    torch.testing.assert_close(y, expected)


def test_masked_gradcheck_float64():
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    layer = bnorm.BatchNorm1d(3).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = layer.weight
    assert torch.autograd.gradcheck(
        lambda t, w: bnorm.functional.batch_norm(t, None, None, w, None, True, mask=mask), (x, w)
    )
    assert torch.autograd.gradgradcheck(lambda t: layer(t, mask=mask), (x,))


def test_masked_with_ghost_batches_composes():
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    mask = torch.rand(4, 5) > 0.3
    mask[:, 0] = True
    layer = bnorm.BatchNorm1d(2, affine=False, virtual_batch_size=2).double()
    y = layer(x, mask=mask)
    for g in range(2):
        sl = slice(2 * g, 2 * g + 2)
        valid = x[sl].permute(0, 2, 1)[mask[sl]]
        mean, var = valid.mean(0), valid.var(0, unbiased=False)
        expected = (x[sl] - mean[None, :, None]) / torch.sqrt(var[None, :, None] + 1e-5)
        torch.testing.assert_close(y[sl], expected)


def test_mask_with_one_valid_value_raises_and_leaves_state_unchanged():
    layer = bnorm.BatchNorm1d(2)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 2] = True
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        layer(torch.randn(3, 2, 4), mask=mask)
    assert layer.num_batches_tracked.item() == 0
    torch.testing.assert_close(layer.running_var, torch.ones(2))


def test_mask_of_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"expected a mask of shape \(3, 4\)"):
        bnorm.BatchNorm1d(2)(torch.randn(3, 2, 4), mask=torch.ones(3, 5, dtype=torch.bool))


def test_mask_of_wrong_dtype_raises():
    with pytest.raises(TypeError, match="expected a bool mask"):
        bnorm.BatchNorm1d(2)(torch.randn(3, 2, 4), mask=torch.ones(3, 4))


# ---------------------------------------------------------------- frozen BN


def test_frozen_is_the_eval_transform_and_only_the_input_gets_gradients():
    bn = torch.nn.BatchNorm2d(3)
    bn(torch.randn(8, 3, 4, 4) * 2 + 1)
    bn.eval()
    frozen = bnorm.FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is ignored
    frozen.train()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = frozen(x)
    torch.testing.assert_close(y, bn(x))
    y.sum().backward()
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(x.grad, scale.detach().view(1, 3, 1, 1).expand_as(x))
    assert list(frozen.parameters()) == []
    before = frozen.running_mean.clone()
    frozen(torch.randn(4, 3, 4, 4) + 5)
    torch.testing.assert_close(frozen.running_mean, before)


def test_frozen_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bnorm.FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))


@pytest.mark.parametrize("eps", [-1.0, float("nan")])
def test_frozen_eps_is_checked_when_set_with_the_rule_of_the_other_layers(eps):
    # The trainable layers refuse such an ε at the call, with torch's words (a frozen layer
    # only normalizes with its fixed statistics: the eval-mode rule).
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError) as trainable:
        bnorm.BatchNorm2d(3, eps=eps).eval()(x)
    with pytest.raises(ValueError) as constructed:
        bnorm.FrozenBatchNorm2d(3, eps=eps)
    frozen = bnorm.FrozenBatchNorm2d(3, eps=0.0)
    with pytest.raises(ValueError) as assigned:
        frozen.eps = eps
    message = str(trainable.value).removeprefix("BatchNorm2d: ")
    assert str(constructed.value) == str(assigned.value) == message
    assert message == f"batch_norm eps must be non-negative, but got {eps}"
    assert frozen.eps == 0.0  # unchanged, and the layer still works with it
    frozen.running_var.fill_(4.0)
    torch.testing.assert_close(frozen(x), x / 2)
