"""The study's networks: shapes, parameter counts against hand-derived numbers and the
ResNet paper, identical initialization across arms, where BN and the probe sit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import bnorm
from bnorm.study.models import (
    MODELS,
    NORM_LAYERS,
    CifarResNet,
    build_model,
    count_parameters,
    initialize,
)


def resnet_param_count(n: int, classes: int = 10, bn: bool = True) -> int:
    """Hand count for a CIFAR ResNet of depth 6n+2 with option-A shortcuts (no shortcut
    parameters): 3×3 convolutions without bias when followed by BN (γ, β = 2 per channel)."""
    conv = lambda cin, cout: 9 * cin * cout + (0 if bn else cout)  # noqa: E731
    norm = lambda c: 2 * c if bn else 0  # noqa: E731
    total = conv(3, 16) + norm(16)
    cin = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, planes) + norm(planes) + conv(planes, planes) + norm(planes)
            cin = planes
    return total + 64 * classes + classes


def test_resnet20_has_the_papers_0_27m_parameters() -> None:
    model = build_model("resnet20", (3, 32, 32), 10, "bn")
    assert count_parameters(model) == resnet_param_count(3) == 269_722
    assert round(count_parameters(model) / 1e6, 2) == 0.27


# He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters.
PAPER_PARAMS = {
    "resnet20": 0.27,
    "resnet32": 0.46,
    "resnet44": 0.66,
    "resnet56": 0.85,
    "resnet110": 1.7,
}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_resnet_parameter_counts_match_hand_count_and_paper(name: str) -> None:
    depth = int(name[6:])
    n = (depth - 2) // 6
    with_bn = build_model(name, (3, 32, 32), 10, "bn")
    without = build_model(name, (3, 32, 32), 10, "none")
    assert count_parameters(with_bn) == resnet_param_count(n, bn=True)
    assert count_parameters(without) == resnet_param_count(n, bn=False)
    digits = 1 if name == "resnet110" else 2
    assert round(count_parameters(with_bn) / 1e6, digits) == PAPER_PARAMS[name]


def test_paper_mlp_parameter_count() -> None:
    # 784→100→100→100→10 with biases (no BN): the paper's MNIST network.
    model = build_model("mlp", (1, 28, 28), 10, "none")
    assert count_parameters(model) == 784 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10
    # With BN the hidden biases go (β replaces them) and γ, β come in: +100 per layer.
    assert (
        count_parameters(build_model("mlp", (1, 28, 28), 10, "bn"))
        == count_parameters(model) + 3 * 100
    )


# Every model and norm on digits' 8×8 images; the MNIST and CIFAR shapes for one of each
# family (the deeper ResNets only repeat blocks).
CASES = list(itertools.product(MODELS, ["none", "bn"], [(1, 8, 8)])) + list(
    itertools.product(["mlp", "cnn", "resnet20"], ["none", "bn"], [(1, 28, 28), (3, 32, 32)])
)


def test_case_list_covers_every_model_norm_and_input_shape() -> None:
    assert len(CASES) == 8 * 2 + 3 * 2 * 2
    assert {c[0] for c in CASES} == set(MODELS)


@pytest.mark.parametrize(("name", "norm", "shape"), CASES)
def test_output_shape(name: str, norm: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, shape, 7, norm)
    initialize(model, torch.Generator().manual_seed(0), "kaiming")
    out = model(torch.rand(4, *shape))
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_arms_start_from_identical_weights(name: str) -> None:
    models = {}
    for norm in ("none", "bn"):
        models[norm] = build_model(name, (3, 32, 32), 10, norm)
        initialize(models[norm], torch.Generator().manual_seed(5), "kaiming")
    a, b = models["none"].weight_layers, models["bn"].weight_layers
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        assert torch.equal(la.weight, lb.weight)
        if la.bias is not None:
            assert torch.count_nonzero(la.bias) == 0


@pytest.mark.parametrize("name", MODELS)
def test_bn_arm_uses_bnorm_layers_and_bias_free_layers_before_them(name: str) -> None:
    with_bn = build_model(name, (3, 32, 32), 10, "bn")
    bns = [m for m in with_bn.modules() if isinstance(m, (bnorm.BatchNorm1d, bnorm.BatchNorm2d))]
    assert bns, "the BN arm must contain bnorm layers"
    # Only bnorm's layers: no torch batch norm that is not one of bnorm's.
    torch_bns = [m for m in with_bn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(type(m).__module__ == "bnorm.modules" for m in torch_bns) and len(torch_bns) == len(
        bns
    )
    # Every weight layer but the classifier is followed by a normalization: no bias.
    *hidden, head = with_bn.weight_layers
    assert all(layer.bias is None for layer in hidden)
    assert head.bias is not None
    without = build_model(name, (3, 32, 32), 10, "none")
    assert not any(isinstance(m, bnorm.modules._BatchNormBase) for m in without.modules())


def test_probe_sees_the_input_of_the_last_hidden_sigmoid() -> None:
    model = build_model("mlp", (1, 8, 8), 10, "none")
    initialize(model, torch.Generator().manual_seed(0), "normal", 0.5)
    x = torch.rand(5, 1, 8, 8)
    seen = []
    model.probe.register_forward_hook(lambda m, i, o: seen.append(o))
    model(x)
    l1, l2, l3, _ = model.weight_layers
    h = torch.sigmoid(l2(torch.sigmoid(l1(x.flatten(1)))))
    torch.testing.assert_close(seen[0], l3(h))


def test_probe_in_bn_arm_is_after_the_normalization() -> None:
    model = build_model("mlp", (1, 8, 8), 10, "bn")
    x = torch.rand(32, 1, 8, 8)
    seen = []
    model.probe.register_forward_hook(lambda m, i, o: seen.append(o))
    model.weight_layers[2].register_forward_hook(lambda m, i, o: seen.append(o))
    model(x)
    pre, probe = seen  # the last hidden linear output, then the probe
    # In training mode with γ = 1, β = 0: per-unit mean 0 and biased variance v/(v + ε).
    v = pre.var(0, unbiased=False)
    torch.testing.assert_close(probe.mean(0), torch.zeros(100), atol=1e-5, rtol=0)
    torch.testing.assert_close(probe.var(0, unbiased=False), v / (v + 1e-5), atol=1e-4, rtol=0)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    net = CifarResNet(20, 3, 10, None)
    block = net.blocks[3]  # first block of stage 2: 16 → 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(s[:, :8]) == 0 and torch.count_nonzero(s[:, 24:]) == 0
    assert sum(p.numel() for p in block.parameters()) == 9 * 16 * 32 + 32 + 9 * 32 * 32 + 32


@pytest.mark.parametrize(
    ("scheme", "expected_std"),
    [
        ("normal", 0.05),
        ("kaiming", math.sqrt(2 / 400)),
        ("xavier", math.sqrt(2 / 700)),
        ("torch", 1 / math.sqrt(3 * 400)),
    ],
)
def test_initialization_scale(scheme: str, expected_std: float) -> None:
    model = build_model("mlp", (1, 20, 20), 10, "none", hidden=[300], activation="relu")
    initialize(model, torch.Generator().manual_seed(0), scheme, std=0.05)
    w = model.weight_layers[0].weight.detach()  # fan_in 400, fan_out 300
    assert abs(float(w.std()) - expected_std) / expected_std < 0.02
    if scheme == "torch":
        assert float(w.abs().max()) <= 1 / math.sqrt(400)


def test_norm_registry_maps_names_to_factories() -> None:
    assert NORM_LAYERS["none"] is None
    factory = NORM_LAYERS["bn"]
    assert factory is not None
    assert type(factory(4, 0)) is bnorm.BatchNorm1d
    assert type(factory(4, 2)) is bnorm.BatchNorm2d


def test_unknown_model_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"expected a model in mlp, .* \(got 'vgg'\)"):
        build_model("vgg", (3, 32, 32), 10)


def test_unknown_norm_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"expected a norm in none, bn.* \(got 'layer'\)"):
        build_model("mlp", (3, 32, 32), 10, "layer")


def test_bad_resnet_depth_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"expected a ResNet depth 6n \+ 2 with n ≥ 1 \(got 21\)"):
        CifarResNet(21, 3, 10)


def test_unknown_init_scheme_is_a_value_error() -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    with pytest.raises(
        ValueError, match=r"expected init in normal, kaiming, xavier, torch \(got 'orthogonal'\)"
    ):
        initialize(model, torch.Generator(), "orthogonal")
