"""bnorm.convert: swap batch-norm families keeping parameters, buffers, device, dtype, mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnorm


def _trained_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Identity(),
        nn.Flatten(2),
        nn.BatchNorm1d(4, momentum=None),
        nn.Flatten(),
        nn.Linear(4 * 16, 5),
        nn.BatchNorm1d(5, affine=False),
    ).to(dtype)
    for _ in range(3):
        model(torch.randn(6, 3, 4, 4, dtype=dtype) * 2 + 1)
    return model


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x.clone())


@pytest.mark.parametrize("target", [bnorm.BatchNorm, bnorm.BatchNorm2d, bnorm.SyncBatchNorm])
def test_convert_to_bnorm_keeps_state_and_outputs(target):
    model = _trained_model()
    reference = _trained_model()
    x = torch.randn(6, 3, 4, 4)
    converted, report = bnorm.convert(model, target)
    assert len(report.converted) == 3 and report.skipped == []
    layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == 3 and all(type(m).__module__ == "bnorm.modules" for m in layers)
    assert converted.state_dict().keys() == reference.state_dict().keys()
    for (k, a), b in zip(converted.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    # Same training step (outputs and running statistics) as the torch model.
    torch.testing.assert_close(converted(x), reference(x))
    for (k, a), b in zip(converted.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    converted.eval()
    reference.eval()
    torch.testing.assert_close(converted(x), reference(x))


def test_convert_picks_the_class_of_each_layers_rank():
    model = _trained_model()
    converted, _ = bnorm.convert(model, bnorm.BatchNorm)
    assert type(converted[1]) is bnorm.BatchNorm2d
    assert type(converted[5]) is bnorm.BatchNorm1d
    assert converted[5].momentum is None
    assert converted[8].weight is None and converted[8].affine is False


def test_convert_shares_parameters_so_optimizers_keep_working():
    model = _trained_model()
    weight = model[1].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    converted, _ = bnorm.convert(model, bnorm.BatchNorm)
    assert converted[1].weight is weight
    out = converted(torch.randn(6, 3, 4, 4))
    (out * torch.randn_like(out)).sum().backward()
    before = weight.detach().clone()
    opt.step()
    assert not torch.equal(weight.detach(), before)


def test_convert_round_trip_bnorm_frozen_torch():
    model = _trained_model().eval()
    x = torch.randn(4, 3, 4, 4)
    expected = model(x)
    frozen, rep1 = bnorm.convert(model, bnorm.FrozenBatchNorm)
    assert [row[2] for row in rep1.converted] == [
        "FrozenBatchNorm2d",
        "FrozenBatchNorm1d",
        "FrozenBatchNorm1d",
    ]
    torch.testing.assert_close(frozen(x), expected)
    frozen.train()  # frozen layers ignore the mode
    torch.testing.assert_close(frozen(x), expected)
    frozen.eval()
    back, rep2 = bnorm.convert(frozen, bnorm.BatchNorm)
    assert len(rep2.converted) == 3
    back.eval()
    torch.testing.assert_close(back(x), expected)
    to_torch, rep3 = bnorm.convert(back, nn.BatchNorm2d)
    assert [row[2] for row in rep3.converted] == ["BatchNorm2d", "BatchNorm1d", "BatchNorm1d"]
    assert all(type(m).__module__.startswith("torch.nn") for m in to_torch.modules())
    torch.testing.assert_close(to_torch(x), expected)


def test_convert_keeps_train_eval_mode_dtype_and_device():
    model = _trained_model(torch.float64)
    model[1].eval()
    converted, _ = bnorm.convert(model, bnorm.BatchNorm)
    assert converted[1].training is False and converted[5].training is True
    assert converted[1].running_mean.dtype == torch.float64
    assert converted[1].weight.device == torch.device("cpu")


def test_convert_passes_options_to_new_layers():
    model = _trained_model()
    converted, _ = bnorm.convert(model, bnorm.BatchNorm, renorm=True, virtual_batch_size=2)
    assert converted[1].renorm == bnorm.Renorm()
    assert converted[1].virtual_batch_size == 2


def test_convert_root_layer_returns_new_object():
    bn = nn.BatchNorm2d(3)
    new, report = bnorm.convert(bn, bnorm.BatchNorm)
    assert type(new) is bnorm.BatchNorm2d and report.converted == [
        ("", "BatchNorm2d", "BatchNorm2d")
    ]


class _BatchNormReLU(nn.BatchNorm2d):
    """A subclass that adds behaviour: must not be converted silently."""

    def forward(self, input):
        return torch.relu(super().forward(input))


class _RenamedBatchNorm(nn.BatchNorm2d):
    """A subclass that keeps torch's forward: converts losslessly."""


def test_convert_reports_subclasses_that_override_forward():
    model = nn.Sequential(_BatchNormReLU(3), _RenamedBatchNorm(3))
    converted, report = bnorm.convert(model, bnorm.BatchNorm)
    assert type(converted[0]) is _BatchNormReLU
    assert report.skipped == [
        ("0", "_BatchNormReLU", "a subclass that overrides forward (behaviour would be lost)")
    ]
    assert type(converted[1]) is bnorm.BatchNorm2d
    assert "left unchanged" in str(report)


def test_convert_to_torch_reports_bnorm_only_options():
    model = nn.Sequential(
        bnorm.BatchNorm(3, axis=-1),
        bnorm.BatchNorm2d(3, renorm=True),
        bnorm.BatchNorm2d(3, virtual_batch_size=2),
        bnorm.BatchNorm2d(3),
    )
    converted, report = bnorm.convert(model, nn.BatchNorm2d)
    reasons = [why for _, _, why in report.skipped]
    assert len(reasons) == 3
    assert "axis=-1" in reasons[0] and "Renormalization" in reasons[1] and "ghost" in reasons[2]
    assert type(converted[3]) is nn.BatchNorm2d


def test_convert_to_frozen_reports_layers_without_running_stats():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    converted, report = bnorm.convert(model, bnorm.FrozenBatchNorm)
    assert type(converted[0]) is nn.BatchNorm2d
    assert "track_running_stats=False" in report.skipped[0][2]


def test_convert_sync_batchnorm_classmethod_matches_torch_api():
    model = _trained_model()
    converted = bnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, bnorm.SyncBatchNorm) for m in converted.modules()) == 3


def test_convert_rejects_a_target_that_is_not_a_batch_norm_class():
    with pytest.raises(TypeError, match="expected target to be a batch-norm layer class"):
        bnorm.convert(nn.Sequential(nn.BatchNorm2d(3)), nn.Conv2d)


def test_convert_rejects_options_for_torch_targets():
    with pytest.raises(ValueError, match="expected no options for torch's layers"):
        bnorm.convert(nn.Sequential(bnorm.BatchNorm2d(3)), nn.BatchNorm2d, renorm=True)


def test_convert_to_sync_refuses_ghost_batches_instead_of_dropping_them():
    model = nn.Sequential(bnorm.BatchNorm2d(4, virtual_batch_size=8), bnorm.BatchNorm2d(4))
    converted, report = bnorm.convert(model, bnorm.SyncBatchNorm)
    assert type(converted[0]) is bnorm.BatchNorm2d and converted[0].virtual_batch_size == 8
    assert type(converted[1]) is bnorm.SyncBatchNorm
    assert report.skipped == [
        ("0", "BatchNorm2d", "bnorm.SyncBatchNorm has no ghost batches (virtual_batch_size)")
    ]
