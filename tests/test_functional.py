"""bnorm.functional against torch.nn.functional.batch_norm, bnorm.reference, float64
gradcheck/gradgradcheck and hand-computed statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnorm import functional as F
from bnorm import reference

SHAPES = {2: (6, 3), 3: (4, 3, 5), 4: (3, 3, 4, 5), 5: (2, 3, 2, 3, 4)}


def _params(channels, affine, dtype=torch.float64, gen=None):
    if affine == "none":
        return None, None
    weight = torch.rand(channels, dtype=dtype, generator=gen) + 0.5
    bias = torch.randn(channels, dtype=dtype, generator=gen) if affine == "weight+bias" else None
    return weight, bias


# --- batch_norm vs torch.nn.functional.batch_norm (axis=1) ----------------------------

TORCH_CASES = list(
    itertools.product(
        (2, 3, 4, 5),  # rank
        (True, False),  # training
        ("none", "weight", "weight+bias"),  # affine
        (True, False),  # running statistics given
    )
)


@pytest.mark.parametrize(("rank", "training", "affine", "running"), TORCH_CASES)
def test_batch_norm_matches_torch_functional(rank, training, affine, running):
    gen = torch.Generator().manual_seed(rank)
    shape = SHAPES[rank]
    x = (torch.randn(shape, generator=gen) * 2 + 1).requires_grad_()
    weight, bias = _params(3, affine, torch.float32, gen)
    params = [p.requires_grad_() for p in (weight, bias) if p is not None]
    rm0 = torch.randn(3, generator=gen) if running else None
    rv0 = torch.rand(3, generator=gen) + 0.5 if running else None
    dy = torch.randn(shape, generator=gen)
    results = []
    for fn in (F.batch_norm, torch.nn.functional.batch_norm):
        rm = None if rm0 is None else rm0.clone()
        rv = None if rv0 is None else rv0.clone()
        # Without running statistics bnorm normalizes with the batch's in evaluation too;
        # torch raises there ("running_mean must be defined in evaluation mode").
        mode = training or (fn is torch.nn.functional.batch_norm and not running)
        out = fn(x, rm, rv, weight, bias, mode, 0.3, 1e-4)
        grads = torch.autograd.grad(out, [x, *params], dy)
        results.append((out, rm, rv, grads))
    (o1, rm1, rv1, g1), (o2, rm2, rv2, g2) = results
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(o1, o2, **tol)
    torch.testing.assert_close(rm1, rm2, **tol)
    torch.testing.assert_close(rv1, rv2, **tol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol)


def test_batch_norm_eval_without_running_statistics_uses_batch_statistics():
    x = torch.randn(6, 3, dtype=torch.float64)
    out = F.batch_norm(x, None, None, training=False, eps=1e-5)
    y_ref, _ = reference.forward(x.numpy(), np.ones(3), np.zeros(3), 1e-5)
    np.testing.assert_allclose(out.numpy(), y_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        torch.nn.functional.batch_norm(x, None, None, training=False)


def test_batch_norm_eval_with_running_statistics_is_the_affine_map():
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    rm, rv = (
        torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64),
        torch.tensor([0.25, 4.0, 1.0], dtype=torch.float64),
    )
    w, b = (
        torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64),
    )
    out = F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)
    scale = (w / torch.sqrt(rv + 1e-3)).view(1, 3, 1)
    torch.testing.assert_close(out, (x - rm.view(1, 3, 1)) * scale + b.view(1, 3, 1))
    # Evaluation leaves the running statistics alone.
    assert rm.tolist() == [0.5, -1.0, 2.0] and rv.tolist() == [0.25, 4.0, 1.0]


# --- batch_norm vs the reference for any channel axis ---------------------------------

AXIS_CASES = [((6, 3), -1), ((3, 6), 0), ((4, 5, 3), -1), ((4, 3, 5), 1), ((3, 4, 5), 0),
              ((2, 4, 5, 3), -1), ((2, 4, 3, 5), 2), ((2, 3, 2, 2, 3), -1)]


@pytest.mark.parametrize(("shape", "axis"), AXIS_CASES)
def test_batch_norm_any_axis_matches_reference_forward_backward_and_running(shape, axis):
    gen = torch.Generator().manual_seed(1)
    c = shape[axis]
    x = (torch.randn(shape, dtype=torch.float64, generator=gen) * 3 - 2).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, generator=gen).requires_grad_()
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-5, axis=axis)
    dy = torch.randn(shape, dtype=torch.float64, generator=gen)
    dx, dw, db = torch.autograd.grad(out, [x, w, b], dy)

    y_ref, cache = reference.forward(
        x.detach().numpy(), w.detach().numpy(), b.detach().numpy(), 1e-5, axis
    )
    dx_ref, dw_ref, db_ref = reference.backward(dy.numpy(), cache)
    rm_ref, rv_ref = reference.update_running(
        np.zeros(c), np.ones(c), cache["mean"], cache["var"], cache["count"], 0.2
    )
    np.testing.assert_allclose(out.detach().numpy(), y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dw.numpy(), dw_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(db.numpy(), db_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(rm.numpy(), rm_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rv.numpy(), rv_ref, rtol=1e-10)
    assert out.shape == x.shape


def test_batch_norm_channel_last_equals_channel_first_after_permutation():
    x = torch.randn(4, 3, 5, 6)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    rm1, rv1, rm2, rv2 = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    a = F.batch_norm(x, rm1, rv1, training=True)
    b = F.batch_norm(nhwc, rm2, rv2, training=True, axis=-1)
    torch.testing.assert_close(b, a.permute(0, 2, 3, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)
    assert b.is_contiguous()


def test_batch_norm_momentum_none_is_cumulative_average_over_steps():
    rm, rv, tracked = (
        torch.zeros(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        torch.tensor(0),
    )
    batches = [torch.randn(m, 2, dtype=torch.float64) * (1 + m) for m in (3, 7, 4)]
    for t, x in enumerate(batches, start=1):
        F.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=tracked)
        assert int(tracked) == t
        torch.testing.assert_close(rm, torch.stack([b.mean(0) for b in batches[:t]]).mean(0))
        torch.testing.assert_close(rv, torch.stack([b.var(0) for b in batches[:t]]).mean(0))


# --- moments, merge_moments, masks ----------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), AXIS_CASES)
def test_moments_match_direct_computation(shape, axis):
    x = torch.randn(shape, dtype=torch.float64) * 5 + 3
    mom = F.moments(x, axis)
    flat = x.movedim(axis, 0).reshape(shape[axis], -1)
    torch.testing.assert_close(
        mom.count, torch.full((shape[axis],), float(flat.shape[1]), dtype=torch.float64)
    )
    torch.testing.assert_close(mom.mean, flat.mean(1))
    torch.testing.assert_close(mom.m2, ((flat - flat.mean(1, keepdim=True)) ** 2).sum(1))
    torch.testing.assert_close(mom.var, flat.var(1, unbiased=False))


def test_merge_moments_equals_moments_of_concatenation():
    a, b = (
        torch.randn(5, 3, 2, dtype=torch.float64) + 4,
        torch.randn(9, 3, 2, dtype=torch.float64) * 3,
    )
    merged = F.merge_moments(F.moments(a), F.moments(b))
    whole = F.moments(torch.cat([a, b]))
    for got, want in zip(merged, whole):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("empty_side", ["left", "right"])
@pytest.mark.parametrize("empty_kind", ["zero-size", "all-masked"])
def test_merge_moments_with_an_empty_side_returns_the_other(empty_side, empty_kind):
    x = torch.randn(6, 3, dtype=torch.float64) + 2
    if empty_kind == "zero-size":
        empty = F.moments(torch.empty(0, 3, dtype=torch.float64))
    else:
        empty = F.moments(
            torch.full((4, 3), float("nan"), dtype=torch.float64),
            mask=torch.zeros(4, dtype=torch.bool),
        )
    assert empty.count.tolist() == [0.0, 0.0, 0.0]
    full = F.moments(x)
    merged = F.merge_moments(empty, full) if empty_side == "left" else F.merge_moments(full, empty)
    for got, want in zip(merged, full):
        torch.testing.assert_close(got, want)


def test_merge_moments_formula_of_the_docstring():
    # m = m_a + m_b, δ = μ_b − μ_a, μ = μ_a + δ m_b/m, M2 = M2_a + M2_b + δ² m_a m_b/m
    a = F.Moments(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0]))
    b = F.Moments(torch.tensor([5.0]), torch.tensor([3.0]), torch.tensor([4.0]))
    merged = F.merge_moments(a, b)
    assert merged.count.item() == 8.0
    assert merged.mean.item() == pytest.approx(1.0 + 2.0 * 5 / 8)
    assert merged.m2.item() == pytest.approx(2.0 + 4.0 + 4.0 * 3 * 5 / 8)


@pytest.mark.parametrize(("shape", "axis"), [((6, 3, 4), 1), ((6, 4, 3), -1), ((3, 6), 0)])
def test_masked_moments_are_moments_of_the_valid_values_only(shape, axis):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    mask_shape = tuple(s for d, s in enumerate(shape) if d != axis % len(shape))
    mask = torch.rand(mask_shape, generator=gen) < 0.6
    x_poisoned = x.clone()
    x_poisoned.movedim(axis, -1)[~mask] = float("nan")  # invalid positions may hold NaN
    mom = F.moments(x_poisoned, axis, mask)
    selected = x.movedim(axis, -1)[mask]  # (valid positions, C)
    torch.testing.assert_close(
        mom.count, torch.full((shape[axis],), float(mask.sum()), dtype=torch.float64)
    )
    torch.testing.assert_close(mom.mean, selected.mean(0))
    torch.testing.assert_close(mom.m2, ((selected - selected.mean(0)) ** 2).sum(0))


def test_all_true_mask_gives_the_unmasked_result():
    x = torch.randn(5, 3, 4)
    rm1, rv1, rm2, rv2 = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    a = F.batch_norm(x, rm1, rv1, training=True)
    b = F.batch_norm(x, rm2, rv2, training=True, mask=torch.ones(5, 4, dtype=torch.bool))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)


def test_masked_batch_norm_normalizes_every_position_with_valid_statistics():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, 5, dtype=torch.float64, generator=gen) * 2 + 1
    mask = torch.rand(6, 5, generator=gen) < 0.5
    w, b = (
        torch.tensor([1.5, 0.5], dtype=torch.float64),
        torch.tensor([0.1, -0.2], dtype=torch.float64),
    )
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.5, eps=1e-5, mask=mask)
    valid = x.permute(0, 2, 1)[mask].numpy()  # (m, C)
    _, cache = reference.forward(valid, w.numpy(), b.numpy(), 1e-5, axis=1)
    expected = (x - torch.tensor(cache["mean"]).view(1, 2, 1)) / torch.sqrt(
        torch.tensor(cache["var"]) + 1e-5
    ).view(1, 2, 1)
    expected = expected * w.view(1, 2, 1) + b.view(1, 2, 1)
    torch.testing.assert_close(out, expected)
    rm_ref, rv_ref = reference.update_running(
        np.zeros(2), np.ones(2), cache["mean"], cache["var"], cache["count"], 0.5
    )
    np.testing.assert_allclose(rm.numpy(), rm_ref, rtol=1e-12)
    np.testing.assert_allclose(rv.numpy(), rv_ref, rtol=1e-12)


# --- gradcheck / gradgradcheck (float64) ----------------------------------------------

GRAD_CASES = ["native-axis1", "native-axis-1", "eval", "masked", "masked-axis-1"]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck_and_gradgradcheck(case):
    gen = torch.Generator().manual_seed(5)
    axis = -1 if case.endswith("axis-1") else 1
    shape = (3, 4, 2) if axis == -1 else (3, 2, 4)
    x = torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=gen).requires_grad_()
    mask = None
    if case.startswith("masked"):
        mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
        if axis == -1:
            mask = mask.view(3, 4)
    if case == "eval":
        rm, rv = (
            torch.tensor([0.3, -0.2], dtype=torch.float64),
            torch.tensor([1.5, 0.7], dtype=torch.float64),
        )

        def fn(x_, w_, b_):
            return F.batch_norm(x_, rm, rv, w_, b_, training=False, eps=1e-3)
    else:

        def fn(x_, w_, b_):
            return F.batch_norm(
                x_, None, None, w_, b_, training=True, eps=1e-3, axis=axis, mask=mask
            )

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_masked_gradient_matches_reference_on_the_valid_values():
    # With a mask, the gradient w.r.t. valid inputs through the statistics is the
    # reference backward restricted to them; masked-out inputs only see their own x̂.
    x = torch.randn(8, 2, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    dy = torch.randn(8, 2, dtype=torch.float64)
    dy[~mask] = 0.0  # only the valid outputs enter the loss
    out = F.batch_norm(x, None, None, training=True, eps=1e-5, mask=mask)
    (dx,) = torch.autograd.grad(out, [x], dy)
    _, cache = reference.forward(x.detach()[mask].numpy(), np.ones(2), np.zeros(2), 1e-5)
    dx_ref, _, _ = reference.backward(dy[mask].numpy(), cache)
    np.testing.assert_allclose(dx[mask].numpy(), dx_ref, rtol=1e-9, atol=1e-12)
    assert dx[~mask].abs().max() == 0.0


# --- hypothesis: shapes and axes ------------------------------------------------------


@st.composite
def shape_and_axis(draw):
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    return shape, axis


@settings(max_examples=40, deadline=None)
@given(shape_and_axis(), st.integers(0, 2**31 - 1))
def test_property_training_matches_reference_for_any_shape_and_axis(shape_axis, seed):
    shape, axis = shape_axis
    c = shape[axis]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=gen) * 2 + 1
    w, b = (
        torch.rand(c, dtype=torch.float64, generator=gen) + 0.5,
        torch.randn(c, dtype=torch.float64, generator=gen),
    )
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    count = x.numel() // c
    if count < 2:
        with pytest.raises(ValueError, match="expected more than 1 value per channel"):
            F.batch_norm(x, rm, rv, w, b, training=True, axis=axis)
        assert rm.tolist() == [0.0] * c and rv.tolist() == [1.0] * c
        return
    out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5, axis=axis)
    y_ref, cache = reference.forward(x.numpy(), w.numpy(), b.numpy(), 1e-5, axis)
    rm_ref, rv_ref = reference.update_running(
        np.zeros(c), np.ones(c), cache["mean"], cache["var"], count, 0.1
    )
    np.testing.assert_allclose(out.numpy(), y_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(rm.numpy(), rm_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rv.numpy(), rv_ref, rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(shape_and_axis(), st.integers(0, 2**31 - 1))
def test_property_masked_moments_equal_moments_of_selection(shape_axis, seed):
    shape, axis = shape_axis
    ax = axis % len(shape)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    mask = torch.rand(tuple(s for d, s in enumerate(shape) if d != ax), generator=gen) < 0.5
    mom = F.moments(x, axis, mask)
    selected = x.movedim(ax, -1)[mask]
    assert mom.count.tolist() == [float(mask.sum())] * shape[ax]
    if mask.sum() > 0:
        torch.testing.assert_close(mom.mean, selected.mean(0))
        torch.testing.assert_close(mom.m2, ((selected - selected.mean(0)) ** 2).sum(0))


# --- numerics -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["native", "masked"])
def test_float32_with_large_mean_normalizes_to_unit_variance(path):
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(64, 4, 8, 8, dtype=torch.float64, generator=gen) + 1e4).float()
    rm, rv = torch.zeros(4), torch.ones(4)
    mask = torch.ones(64, 8, 8, dtype=torch.bool) if path == "masked" else None
    out = F.batch_norm(x, rm, rv, training=True, momentum=1.0, mask=mask)
    per_channel = out.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(
        per_channel.var(1, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-3, rtol=0
    )
    # The float32 mean itself is only representable to ±5e-4 at 1e4; the masked path's
    # float32 sum is corrected by one two-pass step, so both paths meet the same bound.
    torch.testing.assert_close(
        per_channel.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-3, rtol=0
    )
    exact = x.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(rv.double(), exact.var(1), atol=0, rtol=1e-3)
    mom = F.moments(x, 1)
    torch.testing.assert_close(mom.var.double(), exact.var(1, unbiased=False), atol=0, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_half_precision_keeps_dtype_with_float32_statistics(dtype, affine, masked):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(16, 3, 6, 6, generator=gen) * 3 + 5).to(dtype)
    w, b = (torch.ones(3), torch.zeros(3)) if affine else (None, None)
    rm, rv = torch.zeros(3), torch.ones(3)
    mask = torch.ones(16, 6, 6, dtype=torch.bool) if masked else None
    out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=1.0, mask=mask)
    assert out.dtype == dtype
    exact = x.double().transpose(0, 1).reshape(3, -1)
    # Statistics of the half-precision values, computed in float32: float32 accuracy.
    torch.testing.assert_close(rm.double(), exact.mean(1), atol=0, rtol=1e-5)
    torch.testing.assert_close(rv.double(), exact.var(1), atol=0, rtol=1e-5)
    expected = (x.double() - exact.mean(1).view(1, 3, 1, 1)) / torch.sqrt(
        exact.var(1, unbiased=False) + 1e-5
    ).view(1, 3, 1, 1)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), expected, atol=tol * 4, rtol=tol)
    assert F.moments(x).mean.dtype == torch.float32
    ev = F.batch_norm(x, rm, rv, w, b, training=False)
    assert ev.dtype == dtype


# --- update_running_stats -------------------------------------------------------------


def test_update_running_stats_is_the_documented_formula():
    rm, rv = (
        torch.tensor([1.0, 2.0], dtype=torch.float64),
        torch.tensor([3.0, 4.0], dtype=torch.float64),
    )
    mean, var = (
        torch.tensor([5.0, -1.0], dtype=torch.float64),
        torch.tensor([2.0, 0.5], dtype=torch.float64),
    )
    F.update_running_stats(rm, rv, mean, var, 10, 0.2)
    torch.testing.assert_close(
        rm, torch.tensor([0.8 * 1 + 0.2 * 5, 0.8 * 2 - 0.2], dtype=torch.float64)
    )
    torch.testing.assert_close(
        rv,
        torch.tensor(
            [0.8 * 3 + 0.2 * 2 * 10 / 9, 0.8 * 4 + 0.2 * 0.5 * 10 / 9], dtype=torch.float64
        ),
    )


def test_update_running_stats_per_channel_tensor_counts():
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    F.update_running_stats(
        rm,
        rv,
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        torch.tensor([3.0, 3.0], dtype=torch.float64),
        torch.tensor([4.0, 7.0], dtype=torch.float64),
        1.0,
    )
    torch.testing.assert_close(rv, torch.tensor([3.0 * 4 / 3, 3.0 * 7 / 6], dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_update_running_stats_skips_nonfinite_batches(bad):
    rm, rv = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    tracked, skipped = torch.tensor(5), torch.tensor(0)
    F.update_running_stats(
        rm, rv, torch.tensor([0.0, bad]), torch.tensor([1.0, 1.0]), 4, 0.1, tracked, skipped
    )
    assert rm.tolist() == [1.0, 2.0] and rv.tolist() == [3.0, 4.0]
    assert (int(tracked), int(skipped)) == (5, 1)
    F.update_running_stats(
        rm, rv, torch.tensor([0.0, 0.0]), torch.tensor([1.0, bad]), 4, 0.1, tracked, skipped
    )
    assert rm.tolist() == [1.0, 2.0] and (int(tracked), int(skipped)) == (5, 2)
    F.update_running_stats(
        rm,
        rv,
        torch.tensor([0.0, 0.0]),
        torch.tensor([1.0, bad]),
        4,
        0.1,
        tracked,
        skipped,
        skip_nonfinite=False,
    )
    assert not torch.isfinite(rv).all() and (int(tracked), int(skipped)) == (6, 2)


def test_update_running_stats_makes_no_data_dependent_host_decision():
    # Traced with fake tensors, any `if tensor:` (a host synchronization) would raise.
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(rm, rv, mean, var, tracked, skipped):
        rm, rv, tracked, skipped = rm.clone(), rv.clone(), tracked.clone(), skipped.clone()
        F.update_running_stats(rm, rv, mean, var, 8, None, tracked, skipped)
        return rm, rv, tracked, skipped

    args = (
        torch.zeros(3),
        torch.ones(3),
        torch.randn(3),
        torch.rand(3),
        torch.tensor(2),
        torch.tensor(0),
    )
    graph = make_fx(step, tracing_mode="fake")(*args)
    for got, want in zip(graph(*args), step(*args)):
        torch.testing.assert_close(got, want)


# --- functional argument errors -------------------------------------------------------


def test_batch_norm_rejects_running_mean_without_running_var():
    with pytest.raises(
        ValueError, match="expected running_mean and running_var both given or both None"
    ):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)


def test_batch_norm_momentum_none_needs_num_batches_tracked():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"momentum=None .* needs num_batches_tracked"):
        F.batch_norm(torch.randn(4, 3), rm, rv, training=True, momentum=None)
    assert rm.tolist() == [0.0] * 3 and rv.tolist() == [1.0] * 3


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_batch_norm_rejects_vectors_of_the_wrong_length(name):
    kwargs = {
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
        "weight": torch.ones(3),
        "bias": torch.zeros(3),
    }
    kwargs[name] = torch.ones(4)
    with pytest.raises(
        ValueError, match=rf"expected {name} of shape \(3,\) .* \(got shape \(4,\)\)"
    ):
        F.batch_norm(torch.randn(5, 3), training=True, **kwargs)


def test_batch_norm_rejects_an_axis_out_of_range():
    with pytest.raises(
        ValueError, match=r"expected a channel axis in \[-3, 2\] for a 3D input \(got axis=3\)"
    ):
        F.batch_norm(torch.randn(2, 3, 4), None, None, training=True, axis=3)


def test_batch_norm_rejects_a_non_tensor_input():
    with pytest.raises(TypeError, match=r"expected input to be a Tensor \(got list\)"):
        F.batch_norm([[1.0, 2.0]], None, None, training=True)


def test_host_views_of_dead_buffers_are_dropped_without_weakref_callbacks():
    # The non-finite guard's NumPy views are cached per buffer; entries of dead buffers
    # go when the cache grows, not in a weakref callback (where a Ctrl-C is swallowed).
    from bnorm import functional

    for _ in range(3 * functional._HOST_VIEWS_PURGE_AT):
        functional._host_view(torch.zeros(3))
    assert len(functional._HOST_VIEWS) <= functional._HOST_VIEWS_PURGE_AT + 1
    assert all(e[0].__callback__ is None for e in functional._HOST_VIEWS.values())
    live = torch.zeros(3)
    view = functional._host_view(live)
    live.fill_(2.0)
    assert view.tolist() == [2.0, 2.0, 2.0] and functional._host_view(live) is view
