"""bnorm.fold: a zoo of models folded and compared output by output with the original;
the pure weight functions against float64 conv + batch norm; ONNX round trip."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnorm
from bnorm.testing import ResNet20, randomize_statistics
from bnorm.tools.fold import Folded, fold_bn_conv_weights, fold_conv_bn, fold_conv_bn_weights


def assert_same_outputs(original: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = original(x), folded(x)
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(scale))


# --------------------------------------------------------------------------------------
# The zoo: (model factory, input shape, batch norms expected folded, expected kept with
# a reason fragment)


class SharedOutput(nn.Module):
    """conv's output feeds the batch norm AND a residual: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """One conv module called twice, each call followed by its own batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: torch.fx cannot trace it. Its Sequential
    child still folds; the pair directly in it cannot be proven safe."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if y.sum() > 0:
            return self.bn(self.conv(y))
        return self.bn(self.conv(-y))


class DefaultArgumentPath(nn.Module):
    """With ``skip`` symbolic, fx traces the first branch (conv output used once); the
    call with the default ``skip=None`` uses it twice: must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        if skip is not None:
            return self.bn(y) + skip
        return self.bn(y) + y


class ModuleLists(nn.Module):
    """Pairs held in ModuleLists (no forward of their own): the owner's graph proves them."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, bias=False)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(4), bnorm.BatchNorm2d(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        return x


class MaskedCall(nn.Module):
    """A bnorm layer called with a mask (ignored in eval): folds, and the stand-in
    accepts the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3, padding=1)
        self.bn = bnorm.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(x[:, 0], dtype=torch.bool)
        return self.bn(self.conv(x), mask=mask)


class ReturnsIntermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return torch.cat([self.bn(y), y], dim=1)


class StoresIntermediate(nn.Module):
    """Keeps the conv output on the module (a side channel the graph does not show)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.last = y
        return self.bn(y)


def seq(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers)


ZOO = {
    "conv2d_bn": (
        lambda: seq(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU()),
        (2, 3, 7, 7),
        {"1"},
        {},
    ),
    "conv_bias_bnorm_bn": (
        lambda: seq(nn.Conv2d(3, 6, 3, stride=2), bnorm.BatchNorm2d(6)),
        (2, 3, 9, 9),
        {"1"},
        {},
    ),
    "depthwise_and_grouped": (
        lambda: seq(
            nn.Conv2d(4, 8, 3, padding=1, groups=4),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False),
            nn.BatchNorm2d(6, affine=False),
        ),
        (2, 4, 6, 6),
        {"1", "3"},
        {},
    ),
    "conv_transpose_grouped": (
        lambda: seq(
            nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), bnorm.BatchNorm2d(6)
        ),
        (2, 4, 5, 5),
        {"1"},
        {},
    ),
    "conv_transpose1d_and_conv3d": (
        lambda: seq(
            nn.Conv3d(2, 4, 2),
            nn.BatchNorm3d(4),
            nn.Flatten(2),
            nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm1d(3),
        ),
        (2, 2, 4, 4, 4),
        {"1", "4"},
        {},
    ),
    "linear_bn_and_bn_linear": (
        lambda: seq(
            nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3)
        ),
        (4, 5),
        {"1", "3"},
        {},
    ),
    "bn_before_conv": (
        lambda: seq(
            nn.ReLU(),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 6, 1, groups=2),  # 1×1: exact
            nn.ReLU(),
            bnorm.BatchNorm2d(6, affine=False),
            nn.Conv2d(6, 3, 3, padding=1, padding_mode="reflect"),  # copies, not zeros
            nn.ReLU(),
            nn.BatchNorm2d(3),
            nn.Conv2d(3, 2, 3, padding=1),  # zero padding: not exact
        ),
        (2, 4, 6, 6),
        {"1", "4"},
        {"7": "zero-pads"},
    ),
    "bn_after_flatten_before_linear": (
        lambda: seq(
            nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(18), nn.Linear(18, 4)
        ),
        (3, 3, 5, 5),
        {"3"},
        {},
    ),
    "shared_output": (SharedOutput, (2, 4, 5, 5), set(), {"bn": "other consumers"}),
    "shared_conv": (
        SharedConv,
        (2, 4, 5, 5),
        set(),
        {"bn_a": "more than once", "bn_b": "more than once"},
    ),
    "untraceable": (
        Untraceable,
        (2, 3, 6, 6),
        {"features.1"},
        {"bn": "does not trace"},
    ),
    "masked_call": (MaskedCall, (2, 3, 7), {"bn"}, {}),
    "module_lists": (ModuleLists, (2, 3, 5, 5), {"bns.0", "bns.1"}, {}),
    "default_argument_path": (DefaultArgumentPath, (2, 3, 4, 4), set(), {"bn": "other consumers"}),
    "returns_intermediate": (ReturnsIntermediate, (3, 6), set(), {"bn": "other consumers"}),
    "stores_intermediate": (StoresIntermediate, (2, 3, 4, 4), set(), {"bn": "stores intermediate"}),
    "batch_statistics_in_eval": (
        lambda: seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
        (3, 3, 4, 4),
        set(),
        {"1": "track_running_stats=False"},
    ),
    "frozen": (
        lambda: seq(nn.Conv2d(3, 4, 3), bnorm.FrozenBatchNorm2d(4), nn.Linear(2, 3)),
        (2, 3, 4, 4),
        {"1"},
        {},
    ),
    "sync_batch_norms_in_eval": (
        lambda: seq(
            nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.Conv2d(4, 2, 1), bnorm.SyncBatchNorm(2)
        ),
        (2, 3, 4, 4),
        {"1", "3"},
        {},
    ),
    "shared_module_registered_twice": (
        lambda: (lambda c, b: seq(c, b, nn.ReLU(), c, b))(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)),
        (2, 3, 4, 4),
        set(),
        {"1": "more than one place"},
    ),
}


@pytest.mark.parametrize("example", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("case", sorted(ZOO))
def test_fold_keeps_outputs_and_reports_what_folded(case: str, example: bool) -> None:
    """Without an example input (torch.fx and nn.Sequential order) and with one (the
    torch.export graph first): the same pairs fold, the same unsafe ones are kept."""
    factory, shape, expect_folded, expect_kept = ZOO[case]
    torch.manual_seed(0)
    model = randomize_statistics(factory())
    before = copy.deepcopy(model.state_dict())
    inputs = (torch.randn(*shape),) if example else None
    folded, report = bnorm.fold(model, example_inputs=inputs, return_report=True)
    assert {f.batch_norm for f in report.folded} == expect_folded
    kept = {n.batch_norm: n.reason for n in report.not_folded}
    for name, fragment in expect_kept.items():
        assert fragment in kept[name], (name, kept[name])
    for name in expect_folded:
        assert isinstance(folded.get_submodule(name), Folded)
    x = torch.randn(*shape)
    assert_same_outputs(model, folded, x)
    # inplace=False: the original is untouched
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert not any(isinstance(m, Folded) for m in model.modules())


@pytest.mark.parametrize("norm", ["torch", "bnorm"])
def test_fold_resnet20_folds_every_batch_norm(norm: str) -> None:
    torch.manual_seed(0)
    model = randomize_statistics(ResNet20(norm))
    folded, report = bnorm.fold(model, return_report=True)
    assert len(report.folded) == 19 and not report.not_folded
    assert not bnorm.tools.batch_norm_layers(folded)
    assert_same_outputs(model, folded, torch.randn(3, 3, 32, 32))


def test_fold_in_training_mode_raises_before_changing_anything() -> None:
    model = seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        bnorm.fold(model, inplace=True)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is not None


def test_fold_inplace_changes_and_returns_the_module() -> None:
    model = randomize_statistics(seq(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)))
    reference = copy.deepcopy(model)
    out = bnorm.fold(model, inplace=True)
    assert out is model and isinstance(model[1], Folded) and model[0].bias is not None
    assert_same_outputs(reference, model, torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fold_keeps_dtype_and_requires_grad(dtype: torch.dtype) -> None:
    model = randomize_statistics(seq(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).to(dtype)
    folded = bnorm.fold(model)
    conv = folded[0]
    assert conv.weight.dtype == dtype and conv.bias.dtype == dtype
    assert conv.weight.device == model[0].weight.device
    assert conv.weight.requires_grad and conv.bias.requires_grad
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    with torch.no_grad():
        expected, got = model(x).double(), folded(x).double()
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_fold_report_prints_and_serializes() -> None:
    model = randomize_statistics(SharedOutput())
    _, report = bnorm.fold(model, return_report=True)
    text = str(report)
    assert "folded 0 of 1" in text and "bn: " in text
    assert report.to_dict() == {
        "folded": [],
        "not_folded": [{"batch_norm": "bn", "reason": report.not_folded[0].reason}],
    }


# --------------------------------------------------------------------------------------
# The torch.export graph: through data moves, and what it must not fold


class LinearFlattenBatchNorm(nn.Module):
    """LeViT's MLP layer: Linear over (B, N, C), batch norm over (B·N, C), reshaped back."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features, bias=False)
        self.batch_norm = nn.BatchNorm1d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.batch_norm(y.flatten(0, 1)).reshape_as(y)


class SamePadding(nn.Module):
    """TF-style "same" padding computed with int() of the input's size (fx cannot trace
    it), around conv → batch norm pairs, then a head: batch norm → average pool → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.head_bn = nn.BatchNorm2d(4)
        self.classifier = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = max(3 - int(x.shape[-1]) % 2 - 1, 0)
        y = F.relu(self.bn(self.conv(F.pad(x, (pad // 2, pad - pad // 2) * 2))))
        pooled = F.adaptive_avg_pool2d(self.head_bn(y), 1).flatten(1)
        return self.classifier(pooled)


class TransposedBeforeLinear(nn.Module):
    """Batch norm over channels of (N, C, H, W), then transpose(2, 3): the Linear reads the
    last axis, H — as many values as channels, but not the batch norm's channels. With
    permute(0, 2, 3, 1) instead, it reads the channels: that folds."""

    def __init__(self, permute: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, 3)
        self.permute = permute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return self.linear(y.permute(0, 2, 3, 1) if self.permute else y.transpose(2, 3))


def test_fold_sees_through_flatten_and_reshape_with_an_example_input() -> None:
    model = randomize_statistics(LinearFlattenBatchNorm())
    x = torch.randn(2, 5, 4)
    _, without = bnorm.fold(model, return_report=True)
    assert not without.folded and "example_inputs" in without.not_folded[0].reason
    folded, report = bnorm.fold(model, example_inputs=x, return_report=True)
    assert [(f.batch_norm, f.into, f.position, f.proof) for f in report.folded] == [
        ("batch_norm", "linear", "after", "torch.export")
    ]
    assert_same_outputs(model, folded, x)


def test_fold_does_not_fold_when_the_flatten_moves_the_channel_axis() -> None:
    """On 4D input (A, B, N, C) with N = C, flatten(0, 1) gives (A·B, N, C): BatchNorm1d
    then normalizes N, not the Linear's features C, although the counts match."""
    model = randomize_statistics(LinearFlattenBatchNorm())
    x = torch.randn(2, 3, 4, 4)
    folded, report = bnorm.fold(model, example_inputs=x, return_report=True)
    assert not report.folded
    assert "channel axis" in report.not_folded[0].reason
    assert_same_outputs(model, folded, x)


def test_fold_with_an_example_folds_what_fx_cannot_trace_and_the_head_through_a_pool() -> None:
    model = randomize_statistics(SamePadding())
    x = torch.randn(2, 3, 9, 9)
    _, without = bnorm.fold(model, return_report=True)
    assert not without.folded and "does not trace" in without.not_folded[0].reason
    folded, report = bnorm.fold(model, example_inputs=(x,), return_report=True)
    assert {(f.batch_norm, f.into, f.position) for f in report.folded} == {
        ("bn", "conv", "after"),
        ("head_bn", "classifier", "before"),
    }
    assert_same_outputs(model, folded, x)
    assert_same_outputs(model, folded, torch.randn(3, 3, 9, 9))


@pytest.mark.parametrize("permute", [False, True])
def test_fold_follows_the_channel_axis_through_permute_and_transpose(permute: bool) -> None:
    model = randomize_statistics(TransposedBeforeLinear(permute))
    x = torch.randn(2, 4, 4, 3)  # H = C = 4: only the layout tells them apart
    folded, report = bnorm.fold(model, example_inputs=x, return_report=True)
    assert [f.into for f in report.folded] == (["linear"] if permute else [])
    if not permute:
        assert "channel axis" in report.not_folded[0].reason
    assert_same_outputs(model, folded, torch.randn(3, 4, 4, 3))


class WeightReadByAnUntraceableParent(nn.Module):
    """The Sequential's conv + batch norm trace alone, but the root (not traceable by fx)
    also convolves with the conv's weight: only the export graph shows that second use."""

    def __init__(self) -> None:
        super().__init__()
        self.block = seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = int(x.shape[-1]) / 4
        return self.block(x) + scale * F.conv2d(x, self.block[0].weight)


def test_the_export_graph_keeps_a_pair_whose_weight_is_read_elsewhere() -> None:
    model = randomize_statistics(WeightReadByAnUntraceableParent())
    x = torch.randn(2, 3, 4, 4)
    folded, report = bnorm.fold(model, example_inputs=x, return_report=True)
    assert not report.folded
    assert "read elsewhere" in report.not_folded[0].reason
    assert_same_outputs(model, folded, x)


@pytest.mark.parametrize("inplace", [False, True])
def test_fold_rejects_an_example_the_model_does_not_accept_and_changes_nothing(
    inplace: bool,
) -> None:
    model = randomize_statistics(ModuleLists())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="expected example_inputs that the model accepts"):
        bnorm.fold(model, example_inputs=torch.randn(2, 5, 5, 5), inplace=inplace)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(isinstance(m, Folded) for m in model.modules())


def test_fold_rejects_example_inputs_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="expected example_inputs"):
        bnorm.fold(seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval(), example_inputs="x")


def test_a_failure_while_folding_inplace_leaves_the_model_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bnorm.tools.fold import api

    model = randomize_statistics(ResNet20("torch"))
    before = copy.deepcopy(model.state_dict())
    calls = []
    real = api.folded_weights

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "folded_weights", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        bnorm.fold(model, inplace=True)
    assert len(calls) == 5
    assert model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(isinstance(m, Folded) for m in model.modules())


# --------------------------------------------------------------------------------------
# ExportedProgram


@pytest.mark.parametrize("decomposed", [False, True], ids=["torch-ir", "core-aten"])
def test_fold_exported_program_removes_batch_norm_and_keeps_outputs(decomposed: bool) -> None:
    """The program as exported (aten.batch_norm, conv2d, linear) and decomposed to core
    ATen (_native_batch_norm_legit_no_training, convolution; a Linear becomes addmm of
    the transposed weight, which is not taken for a layer: the head's pair is kept)."""
    model = randomize_statistics(SamePadding())
    x = torch.randn(2, 3, 9, 9)
    program = torch.export.export(model, (x,), strict=False)
    if decomposed:
        program = program.run_decompositions()
    folded, report = bnorm.fold(program, return_report=True)
    assert isinstance(folded, torch.export.ExportedProgram)
    expected = {("bn", "conv", "after")} | (
        set() if decomposed else {("head_bn", "classifier", "before")}
    )
    assert {(f.batch_norm, f.into, f.position) for f in report.folded} == expected
    batch_norms = [n for n in folded.graph.nodes if "batch_norm" in str(n.target)]
    assert len(batch_norms) == (1 if decomposed else 0)
    assert_same_outputs(model, folded.module(), x)


def test_fold_exported_program_keeps_what_it_cannot_prove() -> None:
    model = randomize_statistics(SharedOutput())
    x = torch.randn(2, 4, 5, 5)
    folded, report = bnorm.fold(torch.export.export(model, (x,)), return_report=True)
    assert not report.folded and "other consumers" in report.not_folded[0].reason
    assert_same_outputs(model, folded.module(), x)


def test_fold_exported_program_rejects_training_mode_and_inplace() -> None:
    model = seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="eval mode"):
        bnorm.fold(torch.export.export(model.train(), (x,)))
    with pytest.raises(ValueError, match="inplace=False"):
        bnorm.fold(torch.export.export(model.eval(), (x,)), inplace=True)


# --------------------------------------------------------------------------------------
# Pure functions against float64 conv + batch norm


def random_bn_state(
    channels: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 running mean, running variance (> 0.1), γ and β of a batch norm."""
    f64 = torch.float64
    mean = torch.randn(channels, generator=g, dtype=f64)
    var = torch.rand(channels, generator=g, dtype=f64) + 0.1
    gamma = torch.randn(channels, generator=g, dtype=f64)
    beta = torch.randn(channels, generator=g, dtype=f64)
    return mean, var, gamma, beta


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_fold_conv_bn_weights_transposed_grouped_matches_convtranspose_then_batch_norm(
    groups: int,
) -> None:
    g = torch.Generator().manual_seed(groups)
    cin, cout = 4, 8
    w = torch.randn(cin, cout // groups, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    mean, var, gamma, beta = random_bn_state(cout, g)
    x = torch.randn(2, cin, 5, 5, generator=g, dtype=torch.float64)
    expected = F.batch_norm(
        F.conv_transpose2d(x, w, b, stride=2, groups=groups),
        mean,
        var,
        gamma,
        beta,
        False,
        0.0,
        1e-3,
    )
    w2, b2 = fold_conv_bn_weights(
        w, b, mean, var, gamma, beta, 1e-3, transposed=True, groups=groups
    )
    torch.testing.assert_close(F.conv_transpose2d(x, w2, b2, stride=2, groups=groups), expected)


@pytest.mark.parametrize("groups", [1, 3])
def test_fold_bn_conv_weights_grouped_matches_batch_norm_then_conv(groups: int) -> None:
    g = torch.Generator().manual_seed(groups)
    cin, cout = 6, 9
    w = torch.randn(cout, cin // groups, 3, 3, generator=g, dtype=torch.float64)
    mean, var, gamma, beta = random_bn_state(cin, g)
    x = torch.randn(2, cin, 5, 5, generator=g, dtype=torch.float64)
    expected = F.conv2d(
        F.batch_norm(x, mean, var, gamma, beta, False, 0.0, 1e-5), w, None, groups=groups
    )
    w2, b2 = fold_bn_conv_weights(w, None, mean, var, gamma, beta, 1e-5, groups=groups)
    torch.testing.assert_close(F.conv2d(x, w2, b2, groups=groups), expected)


def test_fold_conv_bn_rejects_a_layer_that_does_not_normalize_the_channels() -> None:
    with pytest.raises(ValueError, match="channel axis"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), bnorm.BatchNorm(4, axis=-1).eval())


def test_fold_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        bnorm.fold(lambda x: x)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# ONNX


def _onnx_ops(model: nn.Module, x: torch.Tensor) -> tuple[list[str], bytes]:
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer)
    data = buffer.getvalue()
    return [node.op_type for node in onnx.load_from_string(data).graph.node], data


def test_folded_model_exports_to_onnx_without_batch_normalization_and_runs_the_same() -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    # Pairs the exporter's own optimizer leaves alone: BN after ConvTranspose, BN before
    # a Linear (Gemm); plus a conv + bnorm BN pair.
    model = randomize_statistics(
        seq(
            nn.Conv2d(3, 4, 3, padding=1),
            bnorm.BatchNorm2d(4),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 2, 2, stride=2),
            nn.BatchNorm2d(2),
            nn.Flatten(),
            nn.BatchNorm1d(2 * 8 * 8),
            nn.Linear(2 * 8 * 8, 5),
        )
    )
    x = torch.randn(2, 3, 4, 4)
    original_ops, _ = _onnx_ops(model, x)
    assert "BatchNormalization" in original_ops  # the test can fail
    folded = bnorm.fold(model)
    ops, data = _onnx_ops(folded, x)
    assert "BatchNormalization" not in ops
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(
        torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
    )
