"""Training, evaluation, checkpoints and resumption; the summary arithmetic."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bnorm.study.checkpoint import Checkpointer, CheckpointError
from bnorm.study.data import Dataset, load_digits
from bnorm.study.kinds import mean_std
from bnorm.study.kinds.curves import speedup, steps_to_reach
from bnorm.study.kinds.disagreement import compare_predictions
from bnorm.study.loop import epoch_batches, evaluate, layer_grad_norms, train_one_epoch
from bnorm.study.measurements import stats_check
from bnorm.study.models import build_model, initialize
from bnorm.study.spec import TrainSpec
from bnorm.study.train import train_run


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def small_spec(**kw: Any) -> TrainSpec:
    base = TrainSpec(model="mlp", hidden=[16, 16], activation="sigmoid", init="normal",
                     init_std=0.3, batch_size=60, steps=100, lr=0.3, eval_every=10,
                     keep_predictions=True)  # fmt: skip
    return replace(base, **kw)


# ------------------------------------------------------------------------ batches


def test_epoch_batches_are_full_disjoint_and_seeded(digits: Dataset) -> None:
    spec = small_spec()
    n = digits.train_labels.shape[0]
    batches = list(epoch_batches(digits, spec, seed=3, epoch=0))
    assert len(batches) == n // 60 == spec.steps_per_epoch(n)
    assert all(x.shape == (60, 1, 8, 8) for x, _ in batches)
    again = list(epoch_batches(digits, spec, seed=3, epoch=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    other_epoch = next(epoch_batches(digits, spec, seed=3, epoch=1))
    assert not torch.equal(other_epoch[0], batches[0][0])
    # Each training image appears at most once per epoch: match rows back to the set
    # (identical images are interchangeable, so count them).
    def key(x: torch.Tensor, y: torch.Tensor) -> tuple[bytes, int]:
        return (x.mul(16).round().to(torch.uint8).numpy().tobytes(), int(y))

    available: dict[tuple[bytes, int], int] = {}
    for img, label in zip(digits.train_images, digits.train_labels):
        k = (img.numpy().tobytes(), int(label))
        available[k] = available.get(k, 0) + 1
    for x, y in batches:
        for row, label in zip(x, y):
            k = key(row, label)
            assert available.get(k, 0) > 0, (
                "an image appeared twice in one epoch (or is not in the set)"
            )
            available[k] -= 1


def test_augmentation_is_a_shifted_crop_or_its_mirror(digits: Dataset) -> None:
    from bnorm.study.loop import _augment

    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    out = _augment(images, torch.Generator().manual_seed(0))
    padded = nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(2):
        candidates = [
            padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)
        ]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)


# ------------------------------------------------------------------ one epoch, eval


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_train_one_epoch_is_plain_sgd_on_the_cross_entropy(
    digits: Dataset, momentum: float
) -> None:
    spec = small_spec(momentum=momentum, weight_decay=1e-3)
    model = build_model("mlp", digits.image_shape, 10, "bn", hidden=[16, 16])
    initialize(model, torch.Generator().manual_seed(0), "normal", 0.3)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum, weight_decay=1e-3)
    lrs = lambda step: 0.3 if step < 5 else 0.03  # noqa: E731
    batches = list(epoch_batches(digits, spec, seed=1, epoch=0))[:8]
    seen_steps: list[int] = []
    result = train_one_epoch(
        model,
        batches,
        optimizer,
        step=0,
        lr_at=lrs,
        after_step=lambda s, loss: seen_steps.append(s),
    )
    assert result.step == 8 and not result.diverged
    assert seen_steps == list(range(1, 9))

    # The same by hand: v ← μ v + (g + λ w), w ← w − lr v, with lr from the schedule.
    params = list(reference.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    losses = []
    for step, (x, y) in enumerate(batches):
        logits = reference(x)
        loss = -torch.log_softmax(logits, dim=1)[torch.arange(len(y)), y].mean()
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, v in zip(params, grads, velocity):
                d = g + 1e-3 * p
                v.copy_(d if step == 0 or momentum == 0 else momentum * v + d)
                p -= lrs(step) * v
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert result.mean_loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_train_one_epoch_stops_at_a_non_finite_loss(digits: Dataset) -> None:
    model = build_model("mlp", digits.image_shape, 10, "none", hidden=[8])
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.full((4, 1, 8, 8), math.inf)
    result = train_one_epoch(model, [(x, torch.zeros(4, dtype=torch.long))] * 3, optimizer, step=7)
    assert result.diverged and result.step == 7
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_evaluate_matches_a_direct_computation(digits: Dataset) -> None:
    model = build_model("mlp", digits.image_shape, 10, "bn", hidden=[16, 16])
    initialize(model, torch.Generator().manual_seed(2), "normal", 0.3)
    model.train()
    model(digits.inputs(digits.train_images[:120]))  # move the running statistics
    ev = evaluate(
        model, digits.test_images, digits.test_labels, digits, batch_size=100, probe_unit=3
    )
    assert model.training, "evaluate must restore the training mode"
    model.eval()
    with torch.no_grad():
        x = digits.inputs(digits.test_images)
        logits = model(x)
        hidden = model.body[:-2](x)  # up to the last BN: the probe's input... and output
    assert ev.accuracy == pytest.approx(
        float((logits.argmax(1) == digits.test_labels).float().mean())
    )
    assert ev.loss == pytest.approx(
        float(nn.functional.cross_entropy(logits, digits.test_labels)), rel=1e-5
    )
    assert torch.equal(ev.predictions, logits.argmax(1))
    assert ev.probe is not None
    torch.testing.assert_close(ev.probe, hidden[:, 3])


def test_layer_grad_norms_match_autograd_and_leave_the_model_alone(digits: Dataset) -> None:
    model = build_model("deep-mlp", digits.image_shape, 10, "bn", hidden=[8, 8, 8])
    initialize(model, torch.Generator().manual_seed(0), "xavier")
    x, y = digits.inputs(digits.train_images[:50]), digits.train_labels[:50]
    state = copy.deepcopy(model.state_dict())
    norms = layer_grad_norms(model, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    assert all(p.grad is None for p in model.parameters())
    reference = copy.deepcopy(model)
    reference.train()
    loss = nn.functional.cross_entropy(reference(x), y)
    grads = torch.autograd.grad(loss, [layer.weight for layer in reference.weight_layers])
    assert norms == pytest.approx([float(g.norm()) for g in grads], rel=1e-5)
    assert len(norms) == 4


def test_lr_schedule_divides_at_the_milestones() -> None:
    spec = small_spec(lr=0.1, lr_milestones=[0.5, 0.75], lr_gamma=0.1)
    assert [spec.lr_at(s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_total_steps_from_epochs_drops_the_partial_batch() -> None:
    spec = small_spec(steps=None, epochs=3, batch_size=100)
    assert spec.total_steps(1437) == 3 * 14
    # With gradient accumulation a step takes micro_batches batches: 1437 // (4·8) = 44.
    assert replace(spec, batch_size=4, micro_batches=8).total_steps(1437) == 3 * 44


# ------------------------------------------------------------- gradient accumulation


def test_accumulated_step_is_sgd_on_the_mean_loss_of_its_micro_batches(digits: Dataset) -> None:
    spec = small_spec(batch_size=5)
    model = build_model("mlp", digits.image_shape, 10, "none", hidden=[16, 16])
    initialize(model, torch.Generator().manual_seed(0), "normal", 0.3)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    batches = list(epoch_batches(digits, spec, seed=1, epoch=0))[:7]  # 2 steps of 3; 1 left
    seen: list[tuple[int, float]] = []
    result = train_one_epoch(
        model, batches, optimizer, micro_batches=3, after_step=lambda s, v: seen.append((s, v))
    )
    assert result.step == 2 and not result.diverged
    params = list(reference.parameters())
    for step in range(2):  # by hand: one SGD step on the 15 samples' mean loss
        x = torch.cat([b[0] for b in batches[3 * step : 3 * step + 3]])
        y = torch.cat([b[1] for b in batches[3 * step : 3 * step + 3]])
        loss = -torch.log_softmax(reference(x), dim=1)[torch.arange(len(y)), y].mean()
        assert seen[step][0] == step + 1
        assert seen[step][1] == pytest.approx(float(loss.detach()), rel=1e-5)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.3 * g
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulation_arms_train_identically_and_differ_in_running_stats(digits: Dataset) -> None:
    spec = small_spec(batch_size=4)
    per_micro = build_model("mlp", digits.image_shape, 10, "bn", hidden=[16, 16])
    initialize(per_micro, torch.Generator().manual_seed(0), "normal", 0.3)
    merged = copy.deepcopy(per_micro)
    batches = list(epoch_batches(digits, spec, seed=1, epoch=0))[:12]
    for model, flag in ((per_micro, False), (merged, True)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        result = train_one_epoch(model, batches, optimizer, micro_batches=4, accumulate_stats=flag)
        assert result.step == 3
    for p, q in zip(per_micro.parameters(), merged.parameters()):
        assert torch.equal(p, q)
    from bnorm.tools import batch_norm_layers

    bns = [m for _, m in batch_norm_layers(merged)]
    torch_style = [m for _, m in batch_norm_layers(per_micro)]
    assert len(bns) == len(torch_style) == 2
    assert all(int(m.num_batches_tracked) == 3 for m in bns)  # once per step
    assert all(int(m.num_batches_tracked) == 12 for m in torch_style)  # once per micro-batch
    assert not torch.allclose(bns[0].running_var, torch_style[0].running_var)


def test_stats_check_reports_no_drift_for_exact_statistics(digits: Dataset) -> None:
    import bnorm
    spec = small_spec(batch_size=30)
    model = build_model("mlp", digits.image_shape, 10, "bn", hidden=[16, 16])
    initialize(model, torch.Generator().manual_seed(0), "normal", 0.3)
    before = stats_check(model, digits, spec)  # fresh running statistics: mean 0, var 1
    assert before is not None and before["layers"] == ["body.2", "body.5"]
    assert before["mean_drift"] > 0.1
    n = int(digits.train_labels.shape[0])
    batches = [digits.inputs(digits.train_images[i : i + 30]) for i in range(0, n - 29, 30)]
    bnorm.recalibrate(model, batches, progress=False)
    after = stats_check(model, digits, spec)
    assert after is not None and after["mean_drift"] < 1e-6
    ev = evaluate(model, digits.test_images, digits.test_labels, digits)
    assert after["recalibrated_accuracy"] == before["recalibrated_accuracy"] == ev.accuracy
    no_bn = build_model("mlp", digits.image_shape, 10, "none", hidden=[16])
    assert stats_check(no_bn, digits, spec) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": None}, "expected exactly one of steps and epochs"),
        ({"batch_size": 0}, "expected batch_size to be a positive integer"),
        ({"lr": -1.0}, "expected lr to be a positive number"),
        ({"lr_milestones": [1.5]}, r"expected lr_milestones to be a list of fractions in \(0, 1\)"),
        ({"activation": "gelu"}, "expected activation in sigmoid, tanh, relu"),
        ({"augment": "yes"}, "expected augment to be true or false"),
        ({"hidden": [10, 0]}, "expected hidden to be a list of positive widths"),
        ({"micro_batches": 0}, "expected micro_batches to be a positive integer"),
        ({"accumulate_stats": 1}, "expected accumulate_stats to be true or false"),
        ({"stats_check": "no"}, "expected stats_check to be true or false"),
    ],
)
def test_bad_train_spec_is_rejected(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_spec(**change).validate()


# --------------------------------------------------------------- checkpoints, resume


class Stop(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_resumed_run_ends_with_the_same_metrics(digits: Dataset, tmp_path: Path, norm: str) -> None:
    spec = small_spec(momentum=0.9, steps=100)  # 23 steps per epoch: resume mid-training
    config = {"study": "test", "runtime": {"threads": 1}}
    straight = train_run(spec, digits, norm=norm, seed=4)

    def interrupt_at_57(step: int, total: int, acc: float | None) -> None:
        if step == 57:
            raise Stop

    ckpt = Checkpointer(tmp_path, f"{norm}-run", config, min_interval_s=0.0)
    with pytest.raises(Stop):
        train_run(spec, digits, norm=norm, seed=4, checkpointer=ckpt, on_progress=interrupt_at_57)
    saved = json.loads(ckpt.json_path.read_text())
    assert saved["step"] == 46 and saved["epoch"] == 1 and not saved["record"]["done"]
    assert saved["config"] == config

    # Resume with a different runtime entry (threads): allowed, same numbers.
    resumed_ckpt = Checkpointer(
        tmp_path, f"{norm}-run", {**config, "runtime": {"threads": 2}}, min_interval_s=0.0
    )
    resumed = train_run(spec, digits, norm=norm, seed=4, checkpointer=resumed_ckpt)
    for record in (straight, resumed):
        record.pop("wall_s")
        record.pop("cpu_s")
    assert resumed == straight
    assert len(straight["curve"]["step"]) == 11 and straight["curve"]["step"][-1] == 100
    # Only the newest tensor file remains.
    assert sorted(p.name for p in tmp_path.glob(f"{norm}-run-e*.safetensors")) == [
        json.loads(ckpt.json_path.read_text())["tensors"]
    ]


def test_resumed_accumulation_run_ends_with_the_same_metrics(
    digits: Dataset, tmp_path: Path
) -> None:
    # 1438 // (6·4) = 59 steps per epoch; 80 steps: interrupted after the first epoch.
    spec = small_spec(batch_size=6, micro_batches=4, accumulate_stats=True, stats_check=True,
                      steps=80, eval_every=20, keep_predictions=False)  # fmt: skip
    straight = train_run(spec, digits, norm="bn", seed=2)

    def interrupt_at_70(step: int, total: int, acc: float | None) -> None:
        if step == 70:
            raise Stop

    ckpt = Checkpointer(tmp_path, "acc-run", {"study": "test"}, min_interval_s=0.0)
    with pytest.raises(Stop):
        train_run(spec, digits, norm="bn", seed=2, checkpointer=ckpt, on_progress=interrupt_at_70)
    assert json.loads(ckpt.json_path.read_text())["step"] == 59
    resumed = train_run(spec, digits, norm="bn", seed=2, checkpointer=ckpt)
    for record in (straight, resumed):
        record.pop("wall_s")
        record.pop("cpu_s")
    assert resumed == straight
    assert straight["micro_batches"] == 4 and straight["accumulate_stats"] is True
    assert straight["running_stats"]["layers"] == ["body.2", "body.5"]


def test_finished_run_is_not_trained_again(digits: Dataset, tmp_path: Path) -> None:
    spec = small_spec(steps=30)
    ckpt = Checkpointer(tmp_path, "r", {"a": 1})
    first = train_run(spec, digits, norm="bn", seed=0, checkpointer=ckpt)
    calls: list[int] = []
    again = train_run(
        spec,
        digits,
        norm="bn",
        seed=0,
        checkpointer=ckpt,
        on_progress=lambda s, t, a: calls.append(s),
    )
    assert again == json.loads(json.dumps(first)) and calls == []


def test_checkpoint_of_another_configuration_is_refused(digits: Dataset, tmp_path: Path) -> None:
    spec = small_spec(steps=30)
    train_run(spec, digits, norm="bn", seed=0, checkpointer=Checkpointer(tmp_path, "r", {"lr": 1}))
    with pytest.raises(CheckpointError, match=r"r\.json: checkpoint of a different configuration"):
        train_run(
            spec, digits, norm="bn", seed=0, checkpointer=Checkpointer(tmp_path, "r", {"lr": 2})
        )


def test_damaged_checkpoint_is_reported(digits: Dataset, tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"r\.json: damaged checkpoint"):
        train_run(
            small_spec(steps=30),
            digits,
            norm="bn",
            seed=0,
            checkpointer=Checkpointer(tmp_path, "r", {}),
        )


def test_checkpoint_round_trips_model_and_momentum(digits: Dataset, tmp_path: Path) -> None:
    model = build_model("mlp", digits.image_shape, 10, "bn", hidden=[8])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_one_epoch(model, epoch_batches(digits, small_spec(), 0, 0), optimizer)
    ckpt = Checkpointer(tmp_path, "t", {"x": 1})
    ckpt.save(model, optimizer, {"epoch": 0, "step": 23, "record": {}})
    fresh = build_model("mlp", digits.image_shape, 10, "bn", hidden=[8])
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    state = ckpt.load(fresh, fresh_opt)
    assert state is not None and state["step"] == 23
    for (k, v), w in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(v, w), k
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(
            optimizer.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"]
        )


# --------------------------------------------------------------------- summaries


def curve(steps: list[int], acc: list[float], seed: int = 0) -> dict[str, Any]:
    return {"seed": seed, "curve": {"step": steps, "test_accuracy": acc}}


def test_speedup_is_the_papers_ratio_of_steps() -> None:
    # Baseline reaches its best 0.90 first at step 400; the other reaches 0.90 at step 50.
    base = curve([0, 50, 100, 200, 400, 500], [0.1, 0.2, 0.5, 0.8, 0.9, 0.88])
    other = curve([0, 50, 100, 200, 400, 500], [0.1, 0.91, 0.95, 0.97, 0.97, 0.98])
    s = speedup(base, other, chance=0.1)
    assert (s["baseline_steps"], s["steps"], s["target_accuracy"]) == (400, 50, 0.9)
    assert s["factor"] == 8.0


def test_speedup_is_undefined_when_the_baseline_never_learned() -> None:
    base = curve([0, 10, 20], [0.1, 0.11, 0.12])
    other = curve([0, 10, 20], [0.1, 0.9, 0.95])
    s = speedup(base, other, chance=0.1)
    assert s["factor"] is None and "never learned" in s["reason"]


def test_speedup_is_undefined_when_the_other_never_reaches_the_target() -> None:
    s = speedup(curve([0, 10], [0.1, 0.9]), curve([0, 10], [0.1, 0.5]), chance=0.1)
    assert s["factor"] is None and "never reached" in s["reason"]


def test_steps_to_reach_skips_missing_values() -> None:
    assert steps_to_reach([0, 5, 10], [None, 0.4, 0.6], 0.5) == 10
    assert steps_to_reach([0, 5], [0.1, 0.2], 0.5) is None


def test_mean_std_uses_the_sample_standard_deviation() -> None:
    s = mean_std([0.9, 0.8, 1.0, None, math.nan])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_disagreement_counts_who_is_right() -> None:
    labels = [0, 1, 2, 3, 4, 5]
    base = [0, 1, 9, 9, 4, 7]
    other = [0, 2, 2, 8, 4, 5]
    d = compare_predictions(base, other, labels, seed=0)
    # Disagree at 1, 2, 3, 5: base right at 1; other right at 2 and 5; both wrong at 3.
    assert d["disagreements"] == 4 and d["rate"] == pytest.approx(4 / 6)
    assert d["baseline_accuracy_on_disagreements"] == pytest.approx(1 / 4)
    assert d["accuracy_on_disagreements"] == pytest.approx(2 / 4)
    assert d["both_wrong"] == 1
