"""bnorm.diagnose on models with deliberately stale, dead, non-finite and unreached
statistics; the drift score against torch.distributions' KL; StatisticsRecorder against
numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

import bnorm
from bnorm.tools.diagnose import percentiles
from tool_models import conv_bn_model


def data(seed: int = 0, sizes: tuple[int, ...] = (8, 5, 11)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g) * 1.5 + 0.5 for n in sizes]


def calibrated_model() -> nn.Sequential:
    """conv → BN → ReLU → conv → BN, with exact statistics for eval-mode inference: the
    first layer's from the data, then the second's with the first already in eval mode."""
    model = conv_bn_model(4).eval()
    with torch.no_grad():
        for index in (1, 4):
            inputs = torch.cat([model[:index](x) for x in data()]).double()
            model[index].running_mean.copy_(inputs.mean(dim=(0, 2, 3)))
            model[index].running_var.copy_(inputs.var(dim=(0, 2, 3)))
    return model


def test_diagnose_passes_a_model_whose_statistics_match() -> None:
    report = bnorm.diagnose(calibrated_model(), data(), progress=False)
    assert report.ok and report.verdict.startswith("OK")
    assert all(layer.drift < 1e-6 for layer in report.layers)


def test_diagnose_names_the_stale_layer_and_its_scores_match_the_definition() -> None:
    model = calibrated_model()
    bn = model[4]
    with torch.no_grad():
        bn.running_mean[2] += 1.5 * bn.running_var[2].sqrt()  # stale mean: shift of ~1.5σ
        bn.running_var[0] *= 4.0  # stale variance
    report = bnorm.diagnose(model, data(), progress=False)
    first, second = report.layers
    assert not first.flags and second.flags == ["drift"]
    assert "1 of 2 layers drift" in report.verdict and "worst 4 (" in report.verdict
    # Independent computation: the inputs of the second batch norm in eval mode.
    with torch.no_grad():
        inputs = torch.cat([model[:4](x) for x in data()]).double()
    mu_d, var_d = inputs.mean(dim=(0, 2, 3)), inputs.var(dim=(0, 2, 3))
    mu_r, var_r = bn.running_mean.double(), bn.running_var.double()
    kl = kl_divergence(Normal(mu_d, (var_d + bn.eps).sqrt()), Normal(mu_r, (var_r + bn.eps).sqrt()))
    z = (mu_d - mu_r) / (var_r + bn.eps).sqrt()
    assert second.drift == pytest.approx(float(kl.max()), rel=1e-4)
    assert second.worst_channel == int(kl.argmax())
    assert second.mean_shift == pytest.approx(float(z.abs().max()), rel=1e-4)
    assert second.var_ratio_min == pytest.approx(
        float(((var_d + bn.eps) / (var_r + bn.eps)).min()), rel=1e-4
    )
    assert second.count == sum(len(x) for x in data()) * 16


def test_diagnose_fixed_by_recalibrate_in_train_mode() -> None:
    model = calibrated_model()
    with torch.no_grad():
        model[1].running_mean.add_(1.0)
    assert not bnorm.diagnose(model, data(), mode="train", progress=False).ok
    bnorm.recalibrate(model, data(), progress=False)
    report = bnorm.diagnose(model, data(), mode="train", progress=False)
    assert report.ok, report.verdict


def test_diagnose_flags_dead_nonfinite_and_unreached_layers() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.bad = bnorm.BatchNorm2d(4)
            self.never = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bad(self.bn(self.conv(x)))

    model = Model().eval()
    with torch.no_grad():
        model.conv.weight[1].zero_()  # channel 1 is the constant bias: dead
        model.bad.running_var[3] = float("nan")
    report = bnorm.diagnose(model, data(), progress=False)
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["bn"].dead_channels == [1]
    assert (
        by_name["bad"].nonfinite_running == 1 and "non-finite running stats" in by_name["bad"].flags
    )
    assert by_name["never"].flags == ["unreached"] and by_name["never"].count == 0
    assert "never reached: 1 layer (never)" in report.verdict
    assert "dead channels in 2 layers (bn, bad)" in report.verdict  # bad sees bn's dead channel


def test_diagnose_report_prints_a_table_and_round_trips_through_json() -> None:
    model = calibrated_model()
    with torch.no_grad():
        model[1].running_var.mul_(3.0)
    report = bnorm.diagnose(model, data(), progress=False)
    text = str(report)
    assert text.splitlines()[0].split()[:4] == ["layer", "type", "values/ch", "drift"]
    assert text.splitlines()[-1] == report.verdict and "BatchNorm2d" in text
    parsed = json.loads(report.to_json())
    assert parsed["verdict"] == report.verdict
    assert [layer["name"] for layer in parsed["layers"]] == ["1", "4"]
    assert parsed["layers"][0]["status"] == "drift"


def test_diagnose_leaves_the_model_as_it_was() -> None:
    model = calibrated_model().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bnorm.diagnose(model, data(), mode="train", progress=False)
    assert all(m.training for m in model.modules())
    assert model[1].momentum == 0.1 and not model[1]._forward_pre_hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_diagnose_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode 'eval' or 'train'"):
        bnorm.diagnose(calibrated_model(), data(), mode="inference")


# --------------------------------------------------------------------------------------
# StatisticsRecorder


def test_percentiles_match_numpy() -> None:
    x = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(0))
    got = percentiles(x, (0, 15, 50, 85, 100), axis=1)
    expected = np.percentile(
        x.permute(1, 0, 2).reshape(3, -1).numpy(), [0, 15, 50, 85, 100], axis=1
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_recorder_logs_every_k_steps_inputs_and_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Sigmoid())
    inputs = [torch.randn(16, 4) for _ in range(5)]
    recorder = bnorm.StatisticsRecorder(model, every=2)
    sigmoid_in = bnorm.StatisticsRecorder(model, layers=["2"], target="input", quantiles=(50,))
    with recorder, sigmoid_in:
        for x in inputs:
            model(x)
            model(x + 100)  # a second call in the same step is not recorded
            recorder.step()
            sigmoid_in.step()
    steps, means = recorder.series("1", "mean")
    assert steps == [0, 2, 4] and means.shape == (3, 3)
    assert not model[1]._forward_pre_hooks  # detached on exit
    with torch.no_grad():
        at_step_2 = model[0](inputs[2])  # BN input (Linear is not trained here)
        torch.testing.assert_close(means[1], at_step_2.mean(0))
        torch.testing.assert_close(
            recorder.series("1", "var")[1][1], at_step_2.var(0, unbiased=False)
        )
        _, p = recorder.series("1", "percentiles", index=2)
        expected = np.percentile(at_step_2.numpy(), 85, axis=0)
        np.testing.assert_allclose(p[1].numpy(), expected, rtol=1e-5, atol=1e-6)
    steps_all, medians = sigmoid_in.series("2", "percentiles", index=0)
    assert steps_all == [0, 1, 2, 3, 4] and medians.shape == (5, 3)
    record = sigmoid_in.to_dict()["records"][0]
    assert record["layer"] == "2" and record["count"] == 16 and len(record["mean"]) == 3
    json.dumps(sigmoid_in.to_dict())
    assert math.isfinite(float(F.sigmoid(medians).sum()))


def test_recorder_rejects_an_unknown_layer_name() -> None:
    with pytest.raises(ValueError, match="unknown"):
        bnorm.StatisticsRecorder(nn.Sequential(nn.BatchNorm1d(2)), layers=["nope"])
