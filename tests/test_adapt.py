"""bnorm.adapt: test-time adaptation ("bn", "prior", "tent"), each formula of its docstring
checked against an independent computation (NumPy float64, torch's functional batch norm,
autograd on a copy), state restored on errors, bad input rejected before any change."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnorm
from bnorm.tools import batch_norm_layers
from bnorm.tools.adapt import entropy
from tool_models import conv_bn_model, reference_inputs

MEAN_ATOL = 1e-6
VAR_RTOL = 1e-5


def shifted_batches(
    seed: int, sizes: tuple[int, ...], shape: tuple[int, ...]
) -> list[torch.Tensor]:
    """Test batches of different sizes, shifted and scaled away from N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, *shape, generator=g) * (1.5 + 0.2 * i) + 0.7 for i, n in enumerate(sizes)
    ]


def conv_model() -> nn.Sequential:
    """bnorm's BatchNorm2d then torch's, with non-trivial source statistics and affine."""
    model = nn.Sequential(*conv_bn_model(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 6, 6))  # materialize the lazy layer
    return with_source_statistics(model)


def mlp(norm: type[nn.Module] = bnorm.BatchNorm1d) -> nn.Sequential:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), norm(7), nn.Tanh(), nn.Linear(7, 4), norm(4))
    return with_source_statistics(model)


def with_source_statistics(model: nn.Sequential) -> nn.Sequential:
    """``model`` in eval mode, its batch norms (modules 1 and 4) given non-trivial source
    statistics and affine parameters (from the global generator)."""
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "momentum": [getattr(m, "momentum", None) for m in model.modules()],
        "hooks": [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()],
    }


def assert_same(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for key in ("training", "requires_grad", "momentum", "hooks"):
        assert after[key] == before[key], key
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)


def np_stats(values: list[np.ndarray], axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and unbiased variance per channel of the concatenated values."""
    flat = np.concatenate([np.moveaxis(v, 1, -1).reshape(-1, v.shape[1]) for v in values])
    return flat.mean(axis=0), flat.var(axis=0, ddof=1)


# --------------------------------------------------------------------------------------
# "bn" pooled: the exact statistics of the concatenated test inputs of each layer


def test_bn_sets_running_statistics_to_those_of_the_concatenated_test_inputs() -> None:
    model = conv_model()
    batches = shifted_batches(0, (7, 3, 12), (3, 6, 6))
    first, second = reference_inputs(model, batches)  # torch's functional only
    source = [model[1].running_var.clone(), model[4].running_var.clone()]
    report = bnorm.adapt(model, batches, "bn", progress=False)
    pairs = (("1", first, source[0]), ("4", second, source[1]))
    for name, seen, src in pairs:
        bn = model.get_submodule(name)
        mean, var = np_stats(seen, (0, 2, 3))
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=0, atol=MEAN_ATOL)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=VAR_RTOL)
        layer = next(entry for entry in report.layers if entry.name == name)
        np.testing.assert_allclose(
            [layer.var_ratio_min, layer.var_ratio_max],
            [(var / src.double().numpy()).min(), (var / src.double().numpy()).max()],
            rtol=1e-5,
        )
    assert report.num_samples == 22 and report.num_batches == 3 and report.outputs is None
    assert [entry.count for entry in report.layers] == [22 * 16, 22 * 16]
    assert report.test_weight == 1.0
    assert not model.training and not model[1].training  # modes as found


def test_bn_online_normalizes_each_batch_with_its_own_statistics_and_keeps_the_model() -> None:
    model = conv_model()
    batches = shifted_batches(1, (5, 9), (3, 6, 6))
    before = snapshot(model)
    report = bnorm.adapt(model, batches, "bn", online=True, progress=False)
    assert_same(model, before)
    assert report.outputs is not None and len(report.outputs) == 2
    with torch.no_grad():
        for x, out in zip(batches, report.outputs):
            a = model[0](x)
            h = F.batch_norm(a, None, None, model[1].weight, model[1].bias, True, 0.0, model[1].eps)
            b = model[3](F.relu(h))
            bn = model[4]
            expected = model[6](
                F.batch_norm(b, None, None, bn.weight, bn.bias, True, 0.0, bn.eps).flatten(1)
            )
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# "prior": the paper's mix, from hand-computed statistics


def one_layer(source_mean: np.ndarray, source_var: np.ndarray) -> nn.Sequential:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), bnorm.BatchNorm1d(4))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.from_numpy(source_mean))
        model[1].running_var.copy_(torch.from_numpy(source_var))
        model[1].weight.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))
        model[1].bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    return model.eval()


SOURCE_MEAN = np.array([0.5, -1.0, 0.0, 2.0])
SOURCE_VAR = np.array([1.0, 0.25, 4.0, 0.5])


def linear_outputs(model: nn.Sequential, batches: list[torch.Tensor]) -> list[np.ndarray]:
    w = model[0].weight.detach().double().numpy()
    b = model[0].bias.detach().double().numpy()
    return [x.double().numpy() @ w.T + b for x in batches]


@pytest.mark.parametrize("strength", [0.0, 10.0, 40.0])
def test_prior_pooled_mixes_source_and_test_statistics_by_sample_counts(strength: float) -> None:
    model = one_layer(SOURCE_MEAN, SOURCE_VAR)
    batches = shifted_batches(3, (6, 10, 4), (3,))
    z = np.concatenate(linear_outputs(model, batches))
    mu_t, var_t, n = z.mean(axis=0), z.var(axis=0, ddof=1), z.shape[0]
    report = bnorm.adapt(model, batches, "prior", prior_strength=strength, progress=False)
    expected_mean = (strength * SOURCE_MEAN + n * mu_t) / (strength + n)
    expected_var = (strength * SOURCE_VAR + n * var_t) / (strength + n)
    bn = model[1]
    np.testing.assert_allclose(bn.running_mean.double().numpy(), expected_mean, atol=MEAN_ATOL)
    np.testing.assert_allclose(bn.running_var.double().numpy(), expected_var, rtol=VAR_RTOL)
    assert report.test_weight == pytest.approx(n / (strength + n))
    assert report.prior_strength == strength


def test_prior_with_no_strength_is_full_adaptation_and_with_a_huge_one_the_source() -> None:
    batches = shifted_batches(4, (8, 8), (3,))
    full, zero, huge = (one_layer(SOURCE_MEAN, SOURCE_VAR) for _ in range(3))
    bnorm.adapt(full, batches, "bn", progress=False)
    bnorm.adapt(zero, batches, "prior", prior_strength=0, progress=False)
    bnorm.adapt(huge, batches, "prior", prior_strength=1e9, progress=False)
    assert torch.equal(zero[1].running_mean, full[1].running_mean)
    assert torch.equal(zero[1].running_var, full[1].running_var)
    np.testing.assert_allclose(huge[1].running_mean.double().numpy(), SOURCE_MEAN, atol=1e-6)
    np.testing.assert_allclose(huge[1].running_var.double().numpy(), SOURCE_VAR, rtol=1e-6)
    assert not torch.allclose(
        full[1].running_mean.double(), torch.from_numpy(SOURCE_MEAN), atol=0.1
    )


def test_prior_online_normalizes_each_batch_with_the_mix_of_source_and_batch_statistics() -> None:
    model = one_layer(SOURCE_MEAN, SOURCE_VAR)
    batches = shifted_batches(5, (6, 11), (3,))
    before = snapshot(model)
    strength = 8.0
    report = bnorm.adapt(
        model, batches, "prior", online=True, prior_strength=strength, progress=False
    )
    assert_same(model, before)  # running statistics untouched
    gamma = model[1].weight.detach().double().numpy()
    beta = model[1].bias.detach().double().numpy()
    assert report.outputs is not None
    for z, out in zip(linear_outputs(model, batches), report.outputs):
        n = z.shape[0]
        mu = (strength * SOURCE_MEAN + n * z.mean(axis=0)) / (strength + n)
        var = (strength * SOURCE_VAR + n * z.var(axis=0)) / (strength + n)  # biased batch var
        expected = gamma * (z - mu) / np.sqrt(var + model[1].eps) + beta
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    zero = bnorm.adapt(model, batches, "prior", online=True, prior_strength=0, progress=False)
    full = bnorm.adapt(model, batches, "bn", online=True, progress=False)
    assert zero.outputs is not None and full.outputs is not None
    for a, b in zip(zero.outputs, full.outputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# "tent": entropy gradient with respect to γ, β only


def reference_entropy_grads(
    model: nn.Module, x: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """∂/∂(γ, β) of the mean of −Σ_c p_c log p_c, on a copy in training mode (batch
    statistics), by autograd; also the logits."""
    clone = copy.deepcopy(model).train()
    logits = clone(x)
    p = torch.exp(logits - logits.logsumexp(dim=1, keepdim=True))
    h = -(p * torch.log(p)).sum(dim=1).mean()
    affine = [p for i in (1, 4) for p in (clone[i].weight, clone[i].bias)]
    return list(torch.autograd.grad(h, affine)), logits.detach()


def affine_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in batch_norm_layers(model) for p in (m.weight, m.bias)]


def reference_sgd_step(model: nn.Module, x: torch.Tensor, lr: float) -> torch.Tensor:
    """One plain SGD step on γ, β of ``model`` against the entropy of its output on ``x``
    (gradients from :func:`reference_entropy_grads`); returns the logits before it."""
    grads, logits = reference_entropy_grads(model, x)
    with torch.no_grad():
        for p, g in zip(affine_params(model), grads):
            p -= lr * g
    return logits


@pytest.mark.parametrize("make", [mlp, lambda: mlp(nn.BatchNorm1d), conv_model])
def test_tent_takes_one_sgd_step_on_the_entropy_gradient_of_gamma_and_beta(make: Any) -> None:
    model = make()
    shape = (3, 6, 6) if isinstance(model[0], nn.Conv2d) else (5,)
    x = shifted_batches(6, (16,), shape)[0]
    grads, logits = reference_entropy_grads(model, x)
    before = [p.detach().clone() for p in affine_params(model)]
    others = {k: v.clone() for k, v in model.named_parameters() if not k.startswith(("1.", "4."))}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    flags = [p.requires_grad for p in model.parameters()]
    lr = 0.05
    report = bnorm.adapt(model, [x], "tent", lr=lr, momentum=0.0, progress=False)
    for p, p0, g in zip(affine_params(model), before, grads):
        torch.testing.assert_close(p.detach(), p0 - lr * g, rtol=1e-5, atol=1e-7)
        assert not torch.equal(p.detach(), p0)
    for k, v in model.named_parameters():
        if k in others:
            assert torch.equal(v, others[k]), k
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k  # running statistics neither used nor updated
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert report.outputs is not None
    torch.testing.assert_close(report.outputs[0], logits, rtol=1e-5, atol=1e-6)
    changes = [max(e.weight_change, e.bias_change) for e in report.layers]
    expected = [
        max(float((lr * grads[2 * i]).abs().max()), float((lr * grads[2 * i + 1]).abs().max()))
        for i in range(len(changes))
    ]
    np.testing.assert_allclose(changes, expected, rtol=1e-4)


def test_tent_adapts_across_batches_and_predicts_each_with_the_parameters_so_far() -> None:
    model = mlp()
    a, b = shifted_batches(7, (12, 12), (5,))
    lr = 0.1
    ref = copy.deepcopy(model)
    reference_sgd_step(ref, a, lr)
    logits_b = reference_sgd_step(ref, b, lr)
    report = bnorm.adapt(model, [a, b], "tent", lr=lr, momentum=0.0, progress=False)
    assert report.outputs is not None
    torch.testing.assert_close(report.outputs[1], logits_b, rtol=1e-5, atol=1e-6)
    for p, q in zip(affine_params(model), affine_params(ref)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)


def test_tent_adam_first_step_moves_each_parameter_by_lr_against_its_gradient_sign() -> None:
    model = mlp()
    x = shifted_batches(8, (16,), (5,))[0]
    grads, _ = reference_entropy_grads(model, x)
    before = [p.detach().clone() for p in affine_params(model)]
    lr = 0.01
    bnorm.adapt(model, [x], "tent", optimizer="adam", lr=lr, progress=False)
    for p, p0, g in zip(affine_params(model), before, grads):
        # Adam's first step: m̂ = g, v̂ = g², update lr·g/(|g| + 1e-8).
        torch.testing.assert_close(p.detach(), p0 - lr * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-7)


def test_tent_episodic_resets_gamma_beta_and_the_optimizer_after_each_batch() -> None:
    model = mlp()
    a, b = shifted_batches(9, (12, 12), (5,))
    before = snapshot(model)
    lr = 0.1
    report = bnorm.adapt(
        model, [a, b], "tent", lr=lr, momentum=0.9, steps=2, episodic=True, progress=False
    )
    assert_same(model, before)
    assert report.outputs is not None
    for x, out in zip((a, b), report.outputs):
        # Each batch from the source model: one SGD step (momentum buffer fresh), then
        # the second forward's output.
        ref = copy.deepcopy(model)
        reference_sgd_step(ref, x, lr)
        _, logits = reference_entropy_grads(ref, x)
        torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-6)
    assert all(e.weight_change == 0 and e.bias_change == 0 for e in report.layers)


def test_tent_with_forward_and_dict_batches() -> None:
    model = mlp()
    x = shifted_batches(10, (8,), (5,))[0]
    grads, _ = reference_entropy_grads(model, x)
    before = [p.detach().clone() for p in affine_params(model)]
    bnorm.adapt(
        model,
        [{"x": x}],
        "tent",
        lr=0.1,
        momentum=0.0,
        forward=lambda m, b: m(b["x"]),
        progress=False,
    )
    for p, p0, g in zip(affine_params(model), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-5, atol=1e-7)


def test_entropy_is_the_mean_of_minus_sum_p_log_p() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0]], dtype=torch.float64)
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(axis=1, keepdims=True)
    expected = float(np.mean(-(p * np.log(p)).sum(axis=1)))
    assert float(entropy(logits)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((math.log(2) + float(-(p[1] * np.log(p[1])).sum())) / 2)


# --------------------------------------------------------------------------------------
# State restored after an exception; bad input rejected before any change


def failing(batches: list[torch.Tensor], after: int) -> Iterator[torch.Tensor]:
    for i, x in enumerate(batches):
        if i == after:
            raise RuntimeError("data source failed")
        yield x


@pytest.mark.parametrize(
    "method, options",
    [
        ("bn", {}),
        ("prior", {}),
        ("bn", {"online": True}),
        ("prior", {"online": True}),
        ("tent", {"lr": 0.5}),
        ("tent", {"lr": 0.5, "episodic": True}),
    ],
)
def test_an_exception_midway_leaves_the_model_as_found(
    method: str, options: dict[str, Any]
) -> None:
    model = conv_model()
    model[6].weight.grad = torch.ones_like(model[6].weight)
    before = snapshot(model)
    batches = shifted_batches(11, (4, 4, 4), (3, 6, 6))
    with pytest.raises(RuntimeError, match="data source failed"):
        bnorm.adapt(model, failing(batches, 2), method, progress=False, **options)
    assert_same(model, before)


class LabelsOut(nn.Module):
    """Returns only integer predictions: nothing Tent can take the entropy of."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"labels": self.net(x).argmax(1)}


def test_a_model_output_without_logits_raises_and_restores() -> None:
    model = LabelsOut()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"expected the model \(or forward\) to return logits"):
        bnorm.adapt(model, [torch.randn(4, 5)], "tent", progress=False)
    assert_same(model, before)


class Wrapped(nn.Module):
    """The mlp's logits returned inside a container, as real models do."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = mlp()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.net(x)
        labels = logits.argmax(1)  # an integer tensor first: must be passed over
        if self.kind == "dict":
            return {"loss": None, "logits": logits, "hidden": logits * 2}
        if self.kind == "tuple":
            return (labels, [logits], logits * 2)
        return SimpleNamespace(hidden=logits * 2, logits=logits)


@pytest.mark.parametrize("kind", ["dict", "tuple", "attribute"])
def test_tent_finds_the_logits_in_what_the_model_returns(kind: str) -> None:
    model = Wrapped(kind)
    reference = copy.deepcopy(model.net)
    x = shifted_batches(6, (16,), (5,))[0]
    bnorm.adapt(reference, [x], "tent", lr=0.05, momentum=0.0, progress=False)
    report = bnorm.adapt(model, [x], "tent", lr=0.05, momentum=0.0, progress=False)
    for p, q in zip(affine_params(model.net), affine_params(reference)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    assert report.outputs is not None and type(report.outputs[0]) is type(model(x))


def test_find_logits_order_of_preference() -> None:
    from bnorm.tools._outputs import find_logits

    a, b = torch.randn(2, 3), torch.randn(2, 3)
    labels = torch.tensor([1, 2])
    assert find_logits(a) is a
    assert find_logits({"hidden": a, "logits": b}) is b
    assert find_logits(SimpleNamespace(hidden=a, logits=b)) is b
    assert find_logits((labels, {"x": [a, b]})) is a
    with pytest.raises(TypeError, match=r"expected the model \(or forward\) to return logits"):
        find_logits((labels, "text"))


BAD: list[tuple[str, Any, dict[str, Any], type[Exception], str]] = [
    ("empty list", "mlp", {"data": []}, ValueError, "at least one batch"),
    ("empty iterator", "mlp", {"data": iter([])}, ValueError, "at least one batch"),
    (
        "empty iterator online",
        "mlp",
        {"data": iter([]), "online": True},
        ValueError,
        "at least one batch",
    ),
    ("single tensor", "mlp", {"data": torch.randn(4, 5)}, TypeError, "iterable of batches"),
    ("not a module", "none", {}, TypeError, "torch.nn.Module"),
    ("no batch norm", "linear", {}, ValueError, "at least one batch-norm layer"),
    ("unknown method", "mlp", {"method": "adabn"}, ValueError, "method to be one of"),
    ("negative prior", "mlp", {"method": "prior", "prior_strength": -1.0}, ValueError, ">= 0"),
    ("nan prior", "mlp", {"method": "prior", "prior_strength": math.nan}, ValueError, "finite"),
    ("string prior", "mlp", {"method": "prior", "prior_strength": "16"}, TypeError, "number"),
    ("tent pooled", "mlp", {"method": "tent", "online": False}, ValueError, "online=True"),
    ("zero lr", "mlp", {"method": "tent", "lr": 0.0}, ValueError, "lr > 0"),
    ("zero steps", "mlp", {"method": "tent", "steps": 0}, ValueError, "steps >= 1"),
    (
        "bad optimizer",
        "mlp",
        {"method": "tent", "optimizer": "rmsprop"},
        ValueError,
        "'sgd' or 'adam'",
    ),
    ("online not bool", "mlp", {"online": "yes"}, TypeError, "True or False"),
    ("no affine", "no-affine", {"method": "tent"}, ValueError, "affine parameters"),
    ("bad num_batches", "mlp", {"num_batches": 0}, ValueError, "num_batches >= 1"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_rejected_before_anything_changes(case: Any) -> None:
    _, kind, options, error, message = case
    models = {
        "mlp": mlp,
        "linear": lambda: nn.Sequential(nn.Linear(5, 3)),
        "none": lambda: None,
        "no-affine": lambda: nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3, affine=False)),
    }
    model = models[kind]()
    before = snapshot(model) if model is not None else None
    options = dict(options)
    data = options.pop("data", [torch.randn(4, 5)])
    method = options.pop("method", "bn")
    with pytest.raises(error, match=message):
        bnorm.adapt(model, data, method, progress=False, **options)
    if before is not None:
        assert_same(model, before)


def test_report_lists_every_layer_and_serializes() -> None:
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.BatchNorm1d(6),
        bnorm.FrozenBatchNorm1d(6),
        nn.Linear(6, 3),
        nn.BatchNorm1d(3),
    ).eval()
    report = bnorm.adapt(model, [torch.randn(8, 5)], "tent", progress=False)
    assert [(e.name, e.status) for e in report.layers] == [
        ("1", "adapted"),
        ("2", "skipped: frozen"),
        ("4", "adapted"),
    ]
    text = str(report)
    assert "adapt 'tent'" in text and "max |Δγ|" in text and "skipped: frozen" in text
    data = report.to_dict()
    assert json.loads(json.dumps(data))["layers"][0]["name"] == "1"
    assert data["num_samples"] == 8 and "outputs" not in data
    assert isinstance(report, bnorm.AdaptationReport)
