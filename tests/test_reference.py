"""bnorm.reference (the NumPy spec) against independent computations: explicit per-channel
loops, an autograd'ed float64 torch implementation, finite differences, and the formulas
its docstrings state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnorm import reference

RNG = np.random.default_rng(20150211)

# (shape, axis) pairs covering ranks 2..5 and channel axes first, middle and last.
SHAPES_AXES = [
    ((6, 3), 1),
    ((6, 3), -1),
    ((3, 6), 0),
    ((4, 3, 5), 1),
    ((4, 5, 3), -1),
    ((3, 2, 4, 5), 1),
    ((2, 4, 5, 3), -1),
    ((3, 2, 4, 5), 0),
    ((2, 3, 2, 3, 2), 1),
]


def _loop_forward(x, gamma, beta, eps, axis):
    """Per channel, one loop iteration at a time: the paper's four equations."""
    xc = np.moveaxis(x, axis, 0)
    y = np.empty_like(xc)
    means, variances = [], []
    for c in range(xc.shape[0]):
        values = xc[c].ravel()
        mu = sum(values) / len(values)
        var = sum((v - mu) ** 2 for v in values) / len(values)
        y[c] = gamma[c] * (xc[c] - mu) / np.sqrt(var + eps) + beta[c]
        means.append(mu)
        variances.append(var)
    return np.moveaxis(y, 0, axis), np.array(means), np.array(variances)


def _torch_forward(x, gamma, beta, eps, axis):
    """An independent float64 torch implementation, differentiated by autograd."""
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
    return gamma.view(shape) * (x - mu) / torch.sqrt(var + eps) + beta.view(shape)


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
def test_forward_matches_per_channel_loop(shape, axis):
    channels = shape[axis]
    x = RNG.normal(2.0, 3.0, size=shape)
    gamma, beta = RNG.normal(size=channels), RNG.normal(size=channels)
    y, cache = reference.forward(x, gamma, beta, eps=1e-3, axis=axis)
    y_loop, mean, var = _loop_forward(x, gamma, beta, 1e-3, axis)
    np.testing.assert_allclose(y, y_loop, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(cache["var"], var, rtol=1e-12)
    assert cache["count"] == x.size // channels


def test_forward_output_has_zero_mean_unit_biased_variance_per_channel():
    x = RNG.normal(-5.0, 0.1, size=(7, 4, 3))
    y, _ = reference.forward(x, np.ones(4), np.zeros(4), eps=0.0)
    np.testing.assert_allclose(y.mean(axis=(0, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2)), 1.0, rtol=1e-12)


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
def test_backward_matches_autograd_of_independent_torch_implementation(shape, axis):
    channels = shape[axis]
    x = RNG.normal(size=shape)
    gamma, beta = RNG.normal(size=channels), RNG.normal(size=channels)
    dy = RNG.normal(size=shape)
    _, cache = reference.forward(x, gamma, beta, eps=1e-5, axis=axis)
    dx, dgamma, dbeta = reference.backward(dy, cache)

    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    _torch_forward(xt, gt, bt, 1e-5, axis).backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_backward_matches_central_finite_differences():
    shape, axis = (3, 2, 4), 1
    x = RNG.normal(size=shape)
    gamma, beta = RNG.normal(size=2), RNG.normal(size=2)
    dy = RNG.normal(size=shape)
    eps, h = 1e-5, 1e-6

    def loss(x_, g_, b_):
        return float((reference.forward(x_, g_, b_, eps=eps, axis=axis)[0] * dy).sum())

    _, cache = reference.forward(x, gamma, beta, eps=eps, axis=axis)
    dx, dgamma, dbeta = reference.backward(dy, cache)
    for arr, grad, which in ((x, dx, 0), (gamma, dgamma, 1), (beta, dbeta, 2)):
        numeric = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            args_plus = [x.copy(), gamma.copy(), beta.copy()]
            args_minus = [x.copy(), gamma.copy(), beta.copy()]
            args_plus[which][idx] += h
            args_minus[which][idx] -= h
            numeric[idx] = (loss(*args_plus) - loss(*args_minus)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_backward_docstring_formula_dx_written_out():
    # dx_i = γ/(m√(σ²+ε)) · (m g_i − Σg − x̂_i Σ g x̂), evaluated element by element.
    x = RNG.normal(size=(5, 2))
    gamma, beta, dy = np.array([1.5, -0.5]), np.array([0.1, 0.2]), RNG.normal(size=(5, 2))
    _, cache = reference.forward(x, gamma, beta, eps=1e-4, axis=1)
    dx, _, _ = reference.backward(dy, cache)
    m = 5
    for c in range(2):
        mu, var = x[:, c].mean(), x[:, c].var()
        xhat = (x[:, c] - mu) / np.sqrt(var + 1e-4)
        sum_g, sum_gx = dy[:, c].sum(), (dy[:, c] * xhat).sum()
        for i in range(m):
            expected = (
                gamma[c] / (m * np.sqrt(var + 1e-4)) * (m * dy[i, c] - sum_g - xhat[i] * sum_gx)
            )
            assert dx[i, c] == pytest.approx(expected, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(("shape", "axis"), [((1,), 0), ((4,), 0), ((3, 2), 2), ((3, 2), -3)])
def test_forward_rejects_bad_rank_or_axis(shape, axis):
    with pytest.raises(ValueError, match=r"expected .* \(got"):
        reference.forward(np.zeros(shape), np.ones(2), np.zeros(2), axis=axis)


# --- update_running -------------------------------------------------------------------


def test_update_running_is_the_documented_momentum_formula():
    rm, rv = RNG.normal(size=3), RNG.uniform(0.5, 2.0, size=3)
    bm, bv = RNG.normal(size=3), RNG.uniform(0.5, 2.0, size=3)
    new_m, new_v = reference.update_running(rm, rv, bm, bv, count=8, momentum=0.25)
    np.testing.assert_allclose(new_m, 0.75 * rm + 0.25 * bm, rtol=1e-15)
    np.testing.assert_allclose(new_v, 0.75 * rv + 0.25 * bv * 8 / 7, rtol=1e-15)
    # The inputs are not modified.
    assert new_m is not rm and new_v is not rv


def test_update_running_matches_torch_batchnorm_running_statistics():
    bn = torch.nn.BatchNorm1d(3, momentum=0.3).double()
    rm, rv = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = RNG.normal(1.0, 2.0, size=(6, 3))
        bn(torch.tensor(x))
        rm, rv = reference.update_running(rm, rv, x.mean(0), x.var(0), 6, 0.3)
    np.testing.assert_allclose(rm, bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, bn.running_var.numpy(), rtol=1e-12)


def test_update_running_momentum_none_is_the_cumulative_average():
    rm, rv = np.full(2, 7.0), np.full(2, 9.0)  # replaced by the first batch
    batches = [RNG.normal(size=(m, 2)) for m in (4, 6, 5, 9)]
    for t, x in enumerate(batches, start=1):
        rm, rv = reference.update_running(
            rm, rv, x.mean(0), x.var(0), len(x), None, num_batches_tracked=t
        )
        np.testing.assert_allclose(rm, np.mean([b.mean(0) for b in batches[:t]], axis=0))
        np.testing.assert_allclose(rv, np.mean([b.var(0, ddof=1) for b in batches[:t]], axis=0))


def test_update_running_momentum_none_matches_torch():
    bn = torch.nn.BatchNorm1d(2, momentum=None).double()
    rm, rv = np.zeros(2), np.ones(2)
    for t in range(1, 4):
        x = RNG.normal(size=(5, 2))
        bn(torch.tensor(x))
        rm, rv = reference.update_running(rm, rv, x.mean(0), x.var(0), 5, None, t)
    np.testing.assert_allclose(rm, bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, bn.running_var.numpy(), rtol=1e-12)


def test_update_running_rejects_one_value_per_channel():
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel \(got count=1\)"):
        reference.update_running(np.zeros(2), np.ones(2), np.zeros(2), np.zeros(2), 1, 0.1)


@pytest.mark.parametrize("tracked", [None, 0])
def test_update_running_momentum_none_needs_the_step_count(tracked):
    with pytest.raises(ValueError, match=r"needs num_batches_tracked >= 1.*\(got"):
        reference.update_running(np.zeros(2), np.ones(2), np.zeros(2), np.ones(2), 4, None, tracked)


# --- population_statistics ------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, -1])
def test_population_statistics_equal_statistics_of_concatenated_uneven_batches(axis):
    sizes = (1, 7, 3, 12, 2)
    batches = [RNG.normal(loc=i, scale=1 + i, size=(m, 3, 4)) for i, m in enumerate(sizes)]
    if axis == -1:
        batches = [np.moveaxis(b, 1, -1) for b in batches]
    mean, var = reference.population_statistics(iter(batches), axis=axis)  # any iterable
    pooled = np.moveaxis(np.concatenate(batches, axis=0), axis, 0).reshape(3, -1)
    np.testing.assert_allclose(mean, pooled.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(var, pooled.var(axis=1, ddof=1), rtol=1e-12)


def test_population_statistics_formula_of_the_docstring():
    # E[x] = Σ m_b μ_b / n ; Var[x] = Σ m_b (σ²_b + (μ_b − E[x])²) / (n − 1)
    batches = [RNG.normal(loc=2 * i, size=(m, 2)) for i, m in enumerate((3, 8, 5))]
    sizes = np.array([len(b) for b in batches])
    mus = np.array([b.mean(0) for b in batches])
    sig2 = np.array([b.var(0) for b in batches])
    n = sizes.sum()
    mean_formula = (sizes[:, None] * mus).sum(0) / n
    var_formula = (sizes[:, None] * (sig2 + (mus - mean_formula) ** 2)).sum(0) / (n - 1)
    mean, var = reference.population_statistics(batches)
    np.testing.assert_allclose(mean, mean_formula, rtol=1e-12)
    np.testing.assert_allclose(var, var_formula, rtol=1e-12)


def test_population_statistics_ignore_empty_batches():
    batches = [RNG.normal(size=(4, 2)), np.zeros((0, 2)), RNG.normal(size=(3, 2))]
    mean, var = reference.population_statistics(batches)
    both = np.concatenate(batches)
    np.testing.assert_allclose(mean, both.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, both.var(0, ddof=1), rtol=1e-12)


def _paper_form(batches):
    m = batches[0].shape[0]
    return (np.mean([b.mean(0) for b in batches], axis=0),
            m / (m - 1) * np.mean([b.var(0) for b in batches], axis=0))


def test_paper_form_agrees_on_the_mean_for_equal_batch_sizes_only():
    equal = [RNG.normal(loc=i, size=(6, 3)) for i in range(4)]
    np.testing.assert_allclose(_paper_form(equal)[0], reference.population_statistics(equal)[0])
    uneven = [RNG.normal(loc=i, size=(m, 3)) for i, m in enumerate((2, 9, 4))]
    unweighted = np.mean([b.mean(0) for b in uneven], axis=0)
    assert not np.allclose(unweighted, reference.population_statistics(uneven)[0])


def test_paper_form_variance_differs_by_the_between_batch_spread():
    m, k = 6, 5
    batches = [RNG.normal(loc=i, size=(m, 3)) for i in range(k)]
    n = m * k
    mean, var = reference.population_statistics(batches)
    _, paper_var = _paper_form(batches)
    spread = sum(m * (b.mean(0) - mean) ** 2 for b in batches)
    # (n − 1)·Var = Σ m σ²_b + spread, and the paper's E_B[σ²_B] = Σ σ²_b / k.
    np.testing.assert_allclose((n - 1) * var - spread, k * (m - 1) * paper_var, rtol=1e-12)
    assert np.all(var > paper_var * (m - 1) * n / (m * (n - 1)))


def test_paper_form_agrees_when_every_batch_has_the_same_mean_up_to_the_stated_factor():
    m, k = 5, 4
    n = m * k
    raw = [RNG.normal(size=(m, 3)) for _ in range(k)]
    batches = [b - b.mean(0) + np.array([1.0, -2.0, 3.0]) for b in raw]  # identical means
    mean, var = reference.population_statistics(batches)
    paper_mean, paper_var = _paper_form(batches)
    np.testing.assert_allclose(paper_mean, mean, rtol=1e-12)
    # Docstring: they match up to the factor m(n−1)/((m−1)n), which → 1 as m grows.
    np.testing.assert_allclose(paper_var, var * m * (n - 1) / ((m - 1) * n), rtol=1e-12)
    assert not np.allclose(paper_var, var, rtol=1e-3)


def test_population_statistics_reject_mismatched_channels():
    with pytest.raises(ValueError, match=r"expected 3 channels in every batch \(got 2\)"):
        reference.population_statistics([np.zeros((4, 3)), np.zeros((4, 2))])


@pytest.mark.parametrize("batches", [[], [np.zeros((1, 2))], [np.zeros((0, 2))]])
def test_population_statistics_need_two_values(batches):
    with pytest.raises(ValueError, match=r"expected at least 2 values per channel in total \(got"):
        reference.population_statistics(batches)


def test_reference_imports_neither_torch_nor_the_package():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(reference))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        "." if node.level else (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert imported <= {"__future__", "collections", "typing", "numpy"}, imported
