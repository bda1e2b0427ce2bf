"""The study's `shift` experiment: each corruption as defined (against NumPy/SciPy),
deterministic per seed; the measurements against independent recomputation; the
experiment end to end (metrics, table, figure, summary row)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

import bnorm
from bnorm.cli import main as bnorm_main
from bnorm.study.corruptions import CORRUPTIONS, corrupt
from bnorm.study.data import Dataset, load_digits, make_synthetic
from bnorm.study.loop import epoch_batches, evaluate, train_one_epoch
from bnorm.study.models import build_model, initialize
from bnorm.study.shift import ADAPT_BATCH, corrupted_inputs, shift_check
from bnorm.study.spec import TrainSpec

BY_NAME = {c.name: c for c in CORRUPTIONS}


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def test_each_corruption_changes_the_input_as_defined(digits: Dataset) -> None:
    x = digits.inputs(digits.test_images[:50])
    xn = x.double().numpy()
    # contrast: every deviation from the image mean scaled by exactly c, the mean kept
    c = BY_NAME["contrast"].severity
    y = corrupt(x, BY_NAME["contrast"], seed=0).double().numpy()
    m = xn.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(y - m, c * (xn - m), atol=1e-6)
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), m.ravel(), atol=1e-6)
    # brightness: clip(x + b, 0, 1)
    b = BY_NAME["brightness"].severity
    y = corrupt(x, BY_NAME["brightness"], seed=0).double().numpy()
    np.testing.assert_allclose(y, np.clip(xn + b, 0, 1), atol=1e-6)
    # invert: 1 − x
    np.testing.assert_allclose(
        corrupt(x, BY_NAME["invert"], seed=0).double().numpy(), 1 - xn, atol=1e-6
    )
    # clean: unchanged
    assert torch.equal(corrupt(x, BY_NAME["clean"], seed=0), x)
    # Gaussian noise: clip(x + σ ε), ε ~ N(0, 1) from Generator(seed · 1,000,003 + index)
    s = BY_NAME["gaussian_noise"].severity
    index = [c.name for c in CORRUPTIONS].index("gaussian_noise")
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5 * 1_000_003 + index))
    y = corrupt(x, BY_NAME["gaussian_noise"], seed=5).double().numpy()
    epsn = eps.double().numpy()
    np.testing.assert_allclose(y, np.clip(xn + s * epsn, 0, 1), atol=1e-6)
    inside = (y > 0) & (y < 1)
    assert inside.mean() > 0.4
    np.testing.assert_allclose((y - xn)[inside], s * epsn[inside], atol=1e-6)


@pytest.mark.parametrize("sigma", [1.0, 0.7, 1.6])
def test_blur_is_scipys_gaussian_filter_with_nearest_borders(sigma: float, digits: Dataset) -> None:
    x = digits.inputs(digits.test_images[:20])
    blur = BY_NAME["blur"]
    assert blur.function is not None
    y = blur.function(x.double(), sigma).numpy()
    expected = ndimage.gaussian_filter(
        x.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=2.0
    )
    np.testing.assert_allclose(y, expected, atol=1e-12)
    y_default = corrupt(x, blur, seed=3).double().numpy()
    expected = ndimage.gaussian_filter(
        x.double().numpy(), sigma=(0, 0, blur.severity, blur.severity), mode="nearest", truncate=2.0
    )
    np.testing.assert_allclose(y_default, expected, atol=1e-6)


def test_corruptions_are_deterministic_per_seed(digits: Dataset) -> None:
    for c in CORRUPTIONS:
        a = corrupted_inputs(digits, digits.test_images, c.name, seed=1)
        b = corrupted_inputs(digits, digits.test_images, c.name, seed=1)
        assert torch.equal(a, b), c.name
        assert a.min() >= 0 and a.max() <= 1, c.name
    noisy = [corrupted_inputs(digits, digits.test_images, "gaussian_noise", seed=s) for s in (1, 2)]
    assert not torch.equal(*noisy)


def trained(data: Dataset, norm: str, model: str = "mlp", standardize: bool = False) -> nn.Module:
    spec = TrainSpec(
        model=model, batch_size=32, steps=40, lr=0.1, standardize=standardize, init="kaiming"
    )
    net = build_model(
        model, data.image_shape, data.num_classes, norm, hidden=[32, 32], activation="relu"
    )
    initialize(net, torch.Generator().manual_seed(0), "kaiming", 0.1)
    optimizer = torch.optim.SGD(net.parameters(), lr=spec.lr)
    train_one_epoch(net, epoch_batches(data, spec, 0, 0), optimizer, max_steps=spec.steps)
    return net.eval()


@pytest.mark.parametrize("kind", ["mlp-digits", "cnn-synthetic"])
def test_shift_check_agrees_with_an_independent_recomputation(kind: str, digits: Dataset) -> None:
    model_name, standardize = ("mlp", False) if kind == "mlp-digits" else ("cnn", True)
    data = digits if kind == "mlp-digits" else make_synthetic(num_train=256, num_test=96)
    net = trained(data, "bn", model_name, standardize)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    result = shift_check(net, data, seed=0, standardize=standardize)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k  # each method adapted a copy
    acc = result["accuracy"]
    assert set(acc) == {c.name for c in CORRUPTIONS}
    assert all(
        set(entry) == {"source", "bn", "bn_online", "prior", "tent"} for entry in acc.values()
    )
    # as trained, on the clean test set: the training code's own evaluation
    clean = evaluate(net, data.test_images, data.test_labels, data, standardize=standardize)
    assert acc["clean"]["source"] == pytest.approx(clean.accuracy)
    # "bn" on the clean set: recalibrate on the clean test set, then eval mode
    x = data.inputs(data.test_images, standardize)
    ref = copy.deepcopy(net)
    bnorm.recalibrate(ref, list(x.split(ADAPT_BATCH)), progress=False)
    with torch.no_grad():
        expected = float((ref(x).argmax(1) == data.test_labels).double().mean())
    assert acc["clean"]["bn"] == pytest.approx(expected)
    # "bn_online": each batch of ADAPT_BATCH through the network in training mode
    batch_mode = copy.deepcopy(net).train()
    with torch.no_grad():
        logits = torch.cat([batch_mode(b) for b in x.split(ADAPT_BATCH)])
    expected = float((logits.argmax(1) == data.test_labels).double().mean())
    assert acc["clean"]["bn_online"] == pytest.approx(expected)
    # ... which is close to recalibrating on the training set (same distribution)
    train_ref = copy.deepcopy(net)
    bnorm.recalibrate(train_ref, [data.inputs(data.train_images, standardize)], progress=False)
    recal = evaluate(train_ref, data.test_images, data.test_labels, data, standardize=standardize)
    assert abs(acc["clean"]["bn"] - recal.accuracy) < 0.08
    # contrast ×c, as trained: the contrast-reduced inputs through the unchanged network
    xc = corrupted_inputs(data, data.test_images, "contrast", seed=0, standardize=standardize)
    with torch.no_grad():
        expected = float((net(xc).argmax(1) == data.test_labels).double().mean())
    assert acc["contrast"]["source"] == pytest.approx(expected)


def test_networks_without_batch_norm_get_their_accuracy_as_trained_only(digits: Dataset) -> None:
    result = shift_check(trained(digits, "none"), digits, seed=0)
    assert all(set(entry) == {"source"} for entry in result["accuracy"].values())


def run_study(tmp_path: Path, config: dict[str, Any]) -> Path:
    """``bnorm study --quiet`` with ``config`` as its config file; the run directory."""
    (tmp_path / "c.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert (
        bnorm_main(["study", "--config", str(tmp_path / "c.json"), "--out", str(out), "--quiet"])
        == 0
    )
    return out


def test_shift_experiment_end_to_end(tmp_path: Path) -> None:
    config = {
        "seeds": [0, 1],
        "experiments": ["curves", "shift"],
        "curves": {"steps": 30, "eval_every": 30},
    }
    out = run_study(tmp_path, config)
    assert (out / "shift.png").stat().st_size > 1000
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["experiments"]["curves"]["spec"]["shift_check"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    runs = metrics["experiments"]["curves"]["runs"]
    summary = metrics["experiments"]["shift"]["summary"]
    keys = [c["key"] for c in summary["columns"]]
    assert keys == ["none:source", "bn:source", "bn:bn", "bn:bn_online", "bn:prior", "bn:tent"]
    for row in summary["table"]:  # each cell: mean over the seeds' records
        for key in keys:
            norm, method = key.split(":")
            values = [
                r["shift"]["accuracy"][row["corruption"]][method] for r in runs if r["norm"] == norm
            ]
            assert row["columns"][key]["mean"] == pytest.approx(np.mean(values))
            assert row["columns"][key]["n"] == 2
    helped = [c.name for c in CORRUPTIONS if c.name != "clean" and c.adaptation_should_help]
    for key in keys:
        norm, method = key.split(":")
        per_seed = [
            np.mean([r["shift"]["accuracy"][name][method] for name in helped])
            for r in runs
            if r["norm"] == norm
        ]
        assert summary["mean_over_corruptions"][key]["mean"] == pytest.approx(np.mean(per_seed))
    row = next(r for r in metrics["summary"] if r["experiment"] == "shift")
    assert row["values"]["bn"]["mean"] == pytest.approx(
        summary["mean_over_corruptions"]["bn:source"]["mean"]
    )
    assert "BN adapt bn" in row["note"] and "inverted" in row["note"]
    md = (out / "report.md").read_text()
    header = [
        "test set",
        "no BN as trained",
        "BN as trained",
        "BN adapt bn",
        "BN adapt bn per batch",
    ]
    assert "| " + " | ".join([*header, "BN adapt prior", "BN Tent"]) + " |" in md
    assert "![Test accuracy per corruption" in md
    html = (out / "report.html").read_text()
    assert "BN adapt prior" in html and "data:image/png;base64," in html


def test_curves_alone_measures_no_shift(tmp_path: Path) -> None:
    config = {
        "seeds": [0],
        "norm": ["bn"],
        "experiments": ["curves"],
        "curves": {"steps": 5, "eval_every": 5},
    }
    out = run_study(tmp_path, config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert all("shift" not in r for r in metrics["experiments"]["curves"]["runs"])
    assert not (out / "shift.png").exists()
