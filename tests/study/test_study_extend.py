"""Extending the study and the small-batch arms: the report's sections come from the kinds,
per-experiment seeds, the LayerNorm/GroupNorm/moving-average-BN arms, and the BN networks
evaluated after ``bnorm.recalibrate``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import bnorm
from bnorm.study import kinds as kinds_module
from bnorm.study import report as report_module
from bnorm.study.blocks import Para
from bnorm.study.config import UsageError, resolve_config
from bnorm.study.data import Dataset, load_digits
from bnorm.study.experiments import EXPERIMENTS
from bnorm.study.kinds import KINDS, Experiment, Kind, SummaryInputs
from bnorm.study.kinds.base import schedule_nothing
from bnorm.study.kinds.sweeps import summarize_sweep
from bnorm.study.loop import epoch_batches, evaluate, train_one_epoch
from bnorm.study.measurements import recalibrated_accuracy
from bnorm.study.models import STUDY_MOVING_AVERAGE, build_model, initialize
from bnorm.study.spec import TrainSpec
from bnorm.study.train import train_run
from bnorm.testing import geometric_mean


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


# ------------------------------------------------------------------- extending it


def test_every_experiment_names_a_kind_that_schedules_summarizes_and_reports() -> None:
    for exp in EXPERIMENTS:
        kind = KINDS[exp.kind]
        assert callable(kind.schedule) and callable(kind.summarize) and callable(kind.section)


def test_a_new_kind_is_one_entry_and_its_section_reaches_the_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def section(name: str, exp: dict[str, Any], norms: list[str], out: Path) -> list[Any]:
        return [Para(f"section of {name}: {exp['summary']['answer']}")]

    def summarize(*args: Any) -> dict[str, Any]:
        return {"answer": 42, "headline": {"measure": "m", "values": {}, "speedup": {}}}

    monkeypatch.setitem(KINDS, "answer", Kind(schedule_nothing, summarize, section, trains=False))
    metrics = {
        "norms": ["none"],
        "seeds": [0],
        "dataset": {"name": "d", "train": 1, "test": 1, "shape": [1, 8, 8], "classes": 10},
        "wall_s": 1.0,
        "device": "cpu",
        "threads": 1,
        "summary": [],
        "experiments": {
            "mine": {"kind": "answer", "title": "T", "runs": [], "summary": {"answer": 42}},
        },
    }
    blocks = report_module.build_document({}, metrics, tmp_path)
    texts = [b.text for b in blocks if isinstance(b, Para)]
    assert "section of mine: 42" in texts
    # A kind that does not train has no setup line and no "no run finished" line.
    assert not any(t.startswith(("Setup:", "No run")) for t in texts)
    assert kinds_module.KINDS is KINDS


def test_geometric_mean_skips_missing_and_non_positive_values() -> None:
    assert geometric_mean([1.0, 4.0, None, -1.0, 0.0]) == pytest.approx(2.0)
    assert geometric_mean([2.0, 8.0, 4.0]) == pytest.approx(4.0)
    assert geometric_mean([None, 0.0]) is None


# ----------------------------------------------------------------------- seeds


def _seeds(config: dict[str, Any]) -> dict[str, list[int]]:
    return {name: e["seeds"] for name, e in config["experiments"].items()}


def test_small_batch_has_its_own_five_seeds_by_default() -> None:
    seeds = _seeds(resolve_config({}))
    assert seeds["small_batch"] == [0, 1, 2, 3, 4]
    assert all(s == [0, 1, 2] for name, s in seeds.items() if name != "small_batch")


def test_seeds_given_for_the_study_apply_to_every_experiment() -> None:
    assert set(map(tuple, _seeds(resolve_config({"seeds": "3-4"})).values())) == {(3, 4)}


def test_seeds_in_an_experiments_table_win(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"seeds": [1], "small_batch": {"seeds": "7-8"}}))
    seeds = _seeds(resolve_config({"config": str(path)}))
    assert seeds["small_batch"] == [7, 8] and seeds["curves"] == [1]


def test_bad_seeds_in_a_table_are_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"small_batch": {"seeds": "b-a"}}))
    with pytest.raises(UsageError, match="expected seeds to be non-negative integers"):
        resolve_config({"config": str(path)})


# ------------------------------------------------------------------- the new arms


def test_layer_norm_arm_normalizes_each_sample_over_its_100_features() -> None:
    model = build_model("mlp", (1, 8, 8), 10, "ln", activation="relu")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert [n.normalized_shape for n in norms] == [(100,)] * 3
    initialize(model, torch.Generator().manual_seed(0), "kaiming")
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    h = model.weight_layers[0](x.flatten(1))
    seen: list[torch.Tensor] = []
    norms[0].register_forward_hook(lambda m, i, o: seen.append(o))
    model(x)
    var = h.var(1, unbiased=False, keepdim=True)
    expected = (h - h.mean(1, keepdim=True)) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(seen[0], expected)
    # Per sample: a sample's output does not depend on the rest of the batch.
    torch.testing.assert_close(model(x)[2:3], model(x[2:3]))


def test_group_norm_arm_uses_32_groups_where_the_channels_allow() -> None:
    cnn = build_model("cnn", (1, 8, 8), 10, "gn")
    groups = [(m.num_channels, m.num_groups) for m in cnn.modules() if isinstance(m, nn.GroupNorm)]
    assert groups == [(32, 32), (64, 32), (128, 32)]
    resnet = build_model("resnet20", (3, 32, 32), 10, "gn")
    found = {
        (m.num_channels, m.num_groups) for m in resnet.modules() if isinstance(m, nn.GroupNorm)
    }
    assert found == {(16, 16), (32, 32), (64, 32)}
    # On a convnet "ln" is one group: LayerNorm over (C, H, W).
    ln = build_model("cnn", (1, 8, 8), 10, "ln")
    assert {m.num_groups for m in ln.modules() if isinstance(m, nn.GroupNorm)} == {1}


def test_mabn_arm_centralizes_the_layers_before_its_moving_average_batch_norms() -> None:
    mabn = build_model("mlp", (1, 8, 8), 10, "mabn", activation="relu")
    bn = build_model("mlp", (1, 8, 8), 10, "bn", activation="relu")
    for model in (mabn, bn):
        initialize(model, torch.Generator().manual_seed(3), "kaiming")
    layers = [m for m in mabn.modules() if isinstance(m, bnorm.BatchNorm1d)]
    assert len(layers) == 3 and all(m.moving_average == STUDY_MOVING_AVERAGE for m in layers)
    *hidden, head = mabn.weight_layers
    for layer, plain in zip(hidden, bn.weight_layers):
        assert parametrize.is_parametrized(layer, "weight")
        raw = layer.parametrizations.weight.original
        assert torch.equal(raw, plain.weight)  # the same draw as the other arms
        torch.testing.assert_close(layer.weight, raw - raw.mean(1, keepdim=True))
    assert not parametrize.is_parametrized(head, "weight")


@pytest.mark.parametrize("norm", ["bn", "mabn"])
def test_recalibrated_accuracy_uses_the_exact_training_set_statistics(
    digits: Dataset, norm: str
) -> None:
    spec = TrainSpec(model="mlp", hidden=[16], activation="relu", init="kaiming", batch_size=4,
                     steps=30, lr=0.05, eval_every=30, probe=False)  # fmt: skip
    model = build_model("mlp", digits.image_shape, 10, norm, hidden=[16], activation="relu")
    initialize(model, torch.Generator().manual_seed(0), "kaiming")
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
    train_one_epoch(model, epoch_batches(digits, spec, 0, 0), optimizer, max_steps=30)
    got = recalibrated_accuracy(model, digits, spec)
    # One batch norm, right after the first linear layer: its exact statistics are those of
    # W x over the training samples the batches cover (1436 of 1438: 359 batches of 4) —
    # mean and unbiased variance for BN; for moving-average BN, which normalizes by the
    # second moment about 0, (0, E[h²]).
    n = (digits.train_labels.shape[0] // 4) * 4
    with torch.no_grad():
        h = model.weight_layers[0](digits.inputs(digits.train_images[:n], False).flatten(1))
        bn = next(m for m in model.modules() if isinstance(m, bnorm.BatchNorm1d))
        if norm == "bn":
            bn.running_mean.copy_(h.mean(0))
            bn.running_var.copy_(h.var(0, unbiased=True))
        else:
            bn.running_mean.zero_()
            bn.running_var.copy_(h.double().square().mean(0))
    expected = evaluate(model, digits.test_images, digits.test_labels, digits).accuracy
    assert got == expected
    without = build_model("mlp", digits.image_shape, 10, "none")
    assert recalibrated_accuracy(without, digits, spec) is None


def test_recalibrated_runs_form_their_own_column_of_the_sweep() -> None:
    def run(norm: str, bs: int, seed: int, acc: float, recal: float | None) -> dict[str, Any]:
        record = {"norm": norm, "batch_size": bs, "seed": seed, "diverged_at": None,
                  "curve": {"step": [0, 9], "test_accuracy": [0.1, acc]}}  # fmt: skip
        if recal is not None:
            record["recalibrated_accuracy"] = recal
        return record

    runs = [
        run("bn", 2, 0, 0.3, 0.5), run("bn", 2, 1, 0.4, 0.7), run("none", 2, 0, 0.9, None),
        run("bn", 8, 0, 0.8, 0.8), run("bn", 8, 1, 0.9, 0.6), run("none", 2, 1, 0.8, None),
    ]  # fmt: skip
    exp = Experiment("sb", "batch_sweep", "t", options={"batch_sizes": [2, 8]})
    summary = summarize_sweep(exp, runs, ["none", "bn"], SummaryInputs({}, 0.1, []))
    assert summary["columns"] == ["none", "bn", "bn+recalibrated"]
    at2, at8 = summary["table"]
    assert at2["bn"]["mean"] == pytest.approx(0.35)
    assert at2["bn+recalibrated"]["mean"] == pytest.approx(0.6)
    assert at2["bn+recalibrated"]["std"] == pytest.approx(math.sqrt(0.02))
    assert at8["bn+recalibrated"]["mean"] == pytest.approx(0.7)
    assert summary["headline"]["values"]["bn+recalibrated"]["mean"] == pytest.approx(0.65)


def test_a_small_batch_run_records_its_recalibrated_accuracy(digits: Dataset) -> None:
    spec = TrainSpec(model="mlp", hidden=[8], activation="relu", init="kaiming", batch_size=16,
                     steps=5, eval_every=5, probe=False, recalibrate_check=True)  # fmt: skip
    with_bn = train_run(spec, digits, norm="bn", seed=0)
    assert 0.0 <= with_bn["recalibrated_accuracy"] <= 1.0
    assert with_bn["cpu_s"] > 0.0
    assert train_run(spec, digits, norm="ln", seed=0)["recalibrated_accuracy"] is None


def test_only_the_listed_norms_are_recalibrated_in_a_sweep() -> None:
    exp = Experiment("sb", "batch_sweep", "t",
                     options={"batch_sizes": [2, 4], "recalibrated": ["bn"]})  # fmt: skip
    runs = KINDS["batch_sweep"].schedule(exp, TrainSpec(), ["none", "bn", "mabn"], [0, 1])
    assert len(runs) == 12
    assert {r.norm for r in runs if r.spec.recalibrate_check} == {"bn"}
    assert sorted({r.spec.batch_size for r in runs}) == [2, 4]


def test_an_interrupt_after_a_runs_last_checkpoint_keeps_that_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bnorm.study import executors, runner

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"experiments": ["curves"], "seeds": [0], "norm": ["bn"],
                                  "curves": {"steps": 4, "eval_every": 2, "probe": False,
                                             "inference_check": False}}))  # fmt: skip
    real = executors.train_run  # what every executor calls to train a run

    def finish_then_interrupt(*args: Any, **kwargs: Any) -> dict[str, Any]:
        real(*args, **kwargs)  # the run ends and its checkpoint says so ...
        raise KeyboardInterrupt  # ... and Ctrl-C arrives before the runner records it

    monkeypatch.setattr(executors, "train_run", finish_then_interrupt)
    study = runner.prepare_study({"config": str(config), "out": str(tmp_path / "out")})
    runner.train_all(study, quiet=True)
    assert study.interrupted
    (kept,) = study.runs["curves"]
    assert kept["tag"] == "bn-seed0" and kept["done"] and kept["steps_done"] == 4
