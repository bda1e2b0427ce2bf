"""bnorm.recalibrate: exact population statistics (vs the concatenated inputs, computed
independently), masks and per-layer counts, state restored, two gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnorm
from bnorm import reference
from bnorm.testing import spawn_gloo
from tool_models import conv_bn_model, reference_inputs

MEAN_ATOL = 1e-6
VAR_RTOL = 1e-5


def uneven_batches(seed: int, sizes: tuple[int, ...], shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Batches of different sizes AND different means (so the between-batch spread of the
    means matters: averaging batch variances would be wrong)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, *shape, generator=g) * (1 + 0.3 * i) + 0.5 * i for i, n in enumerate(sizes)
    ]


def test_recalibrate_equals_statistics_of_the_concatenated_inputs_with_uneven_batches() -> None:
    model = conv_bn_model().eval()
    batches = uneven_batches(0, (5, 1, 8, 3), (3, 6, 6))
    first, second = reference_inputs(model, batches)
    report = bnorm.recalibrate(model, batches, progress=False)
    assert report.num_batches == 4 and report.num_samples == 17
    for layer, inputs in ((model[1], first), (model[4], second)):
        values = np.concatenate(inputs)  # (17, C, H, W)
        mean = values.mean(axis=(0, 2, 3))
        var = values.var(axis=(0, 2, 3), ddof=1)
        np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=0, atol=MEAN_ATOL)
        np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=VAR_RTOL, atol=0)
        # The spec's pooled form agrees; the paper's average of batch variances does not.
        spec_mean, spec_var = reference.population_statistics(inputs)
        np.testing.assert_allclose(spec_mean, mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(spec_var, var, rtol=1e-12)
        naive = np.mean([v.var(axis=(0, 2, 3), ddof=1) for v in inputs], axis=0)
        assert np.abs(naive / var - 1).max() > 100 * VAR_RTOL
    assert [entry.status for entry in report.layers] == ["updated", "updated"]
    assert [entry.count for entry in report.layers] == [17 * 16, 17 * 16]


def test_recalibrate_respects_masks_and_counts_every_call_of_a_shared_layer() -> None:
    torch.manual_seed(1)
    shared = bnorm.BatchNorm1d(4)
    g = torch.Generator().manual_seed(1)
    batches = []
    for n, length in ((3, 5), (2, 9), (4, 2)):
        x = torch.randn(n, 4, length, generator=g) * 2 + 1
        mask = torch.rand(n, length, generator=g) > 0.4
        mask[0, 0] = True
        x[~mask.unsqueeze(1).expand_as(x)] = float("nan")  # padding: must not count
        y = torch.randn(n, 4, 3, generator=g) - 3  # second call, unmasked, other length
        batches.append((x, mask, y))

    def run(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> None:
        x, mask, y = batch
        model(x, mask=mask)
        model(y)

    report = bnorm.recalibrate(shared, batches, forward=run, progress=False)
    values = [x.permute(1, 0, 2)[:, mask].T.double() for x, mask, _ in batches]
    values += [y.permute(0, 2, 1).reshape(-1, 4).double() for _, _, y in batches]
    every = torch.cat(values)  # (n_values, C)
    torch.testing.assert_close(shared.running_mean, every.mean(0).float(), rtol=0, atol=MEAN_ATOL)
    torch.testing.assert_close(shared.running_var, every.var(0).float(), rtol=VAR_RTOL, atol=0)
    assert report.layers[0].count == every.shape[0]


def test_recalibrate_num_samples_cuts_the_last_batch() -> None:
    layer = nn.BatchNorm1d(3)
    batches = uneven_batches(2, (4, 4, 4), (3,))
    bnorm.recalibrate(layer, batches, num_samples=6, progress=False)
    used = torch.cat(batches)[:6].double()
    torch.testing.assert_close(layer.running_mean, used.mean(0).float(), rtol=0, atol=MEAN_ATOL)
    torch.testing.assert_close(layer.running_var, used.var(0).float(), rtol=VAR_RTOL, atol=0)


def test_recalibrate_num_batches_and_tuple_batches_use_the_first_element() -> None:
    layer = bnorm.BatchNorm1d(3)
    batches = [(x, torch.zeros(len(x))) for x in uneven_batches(3, (2, 5, 7), (3,))]
    report = bnorm.recalibrate(layer, batches, num_batches=2, progress=False)
    used = torch.cat([x for x, _ in batches[:2]]).double()
    torch.testing.assert_close(layer.running_var, used.var(0).float(), rtol=VAR_RTOL, atol=0)
    assert report.num_batches == 2 and report.num_samples == 7


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.BatchNorm1d(2)
        self.unused = nn.BatchNorm1d(2)
        self.frozen = bnorm.FrozenBatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.used(x))


def test_recalibrate_keeps_unreached_layers_and_skips_frozen_ones() -> None:
    model = Branchy()
    model.unused.running_mean.fill_(7.0)
    report = bnorm.recalibrate(model, uneven_batches(4, (3, 4), (2,)), progress=False)
    status = {entry.name: entry.status for entry in report.layers}
    assert status == {
        "used": "updated",
        "unused": "kept: not reached by the data",
        "frozen": "skipped: frozen",
    }
    assert torch.equal(model.unused.running_mean, torch.full((2,), 7.0))
    assert "updated" in str(report) and report.to_dict()["layers"][1]["name"] == "unused"


def test_recalibrate_leaves_flags_momentum_counters_and_computes_no_gradients() -> None:
    model = conv_bn_model()
    model.train()
    model[4].momentum = None
    model[2].train(False)
    flags = [m.training for m in model.modules()]
    tracked = [model[1].num_batches_tracked.clone(), model[4].num_batches_tracked.clone()]
    grad_enabled: list[bool] = []
    model[3].register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    bnorm.recalibrate(model, uneven_batches(5, (2, 3), (3, 6, 6)), progress=False)
    assert [m.training for m in model.modules()] == flags
    assert model[1].momentum == 0.1 and model[4].momentum is None
    assert torch.equal(model[1].num_batches_tracked, tracked[0])
    assert torch.equal(model[4].num_batches_tracked, tracked[1])
    assert grad_enabled == [False, False]
    assert all(p.grad is None for p in model.parameters())
    assert len(model[1]._forward_pre_hooks) == 0 and len(model[3]._forward_hooks) == 1


def test_recalibrate_restores_the_model_when_an_exception_interrupts_it() -> None:
    model = conv_bn_model().eval()
    model[1].momentum = None
    user_hook = model[4].register_forward_pre_hook(lambda *_: None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    skipped = model[1].num_batches_skipped.clone()

    def failing_data():
        yield torch.randn(4, 3, 6, 6)
        yield torch.randn(4, 3, 6, 6)
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        bnorm.recalibrate(model, failing_data(), progress=False)
    assert not any(m.training for m in model.modules())
    assert model[1].momentum is None and model[4].momentum == 0.1
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(model[1].num_batches_skipped, skipped)
    assert list(model[4]._forward_pre_hooks) == [user_hook.id]
    assert len(model[1]._forward_pre_hooks) == 0


def test_recalibrate_progress_line_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    bnorm.recalibrate(nn.BatchNorm1d(2), [torch.randn(3, 2)] * 2, progress=True)
    err = capsys.readouterr().err
    assert "recalibrate: batch 2/2, 6 samples" in err


def test_recalibrate_rejects_a_single_tensor_as_data() -> None:
    with pytest.raises(TypeError, match="iterable of batches"):
        bnorm.recalibrate(nn.BatchNorm1d(2), torch.randn(4, 2))


def test_recalibrate_rejects_a_model_without_batch_norm() -> None:
    with pytest.raises(ValueError, match="at least one batch-norm layer"):
        bnorm.recalibrate(nn.Linear(2, 2), [torch.randn(4, 2)])


def test_recalibrate_rejects_zero_batches() -> None:
    with pytest.raises(ValueError, match="num_batches >= 1"):
        bnorm.recalibrate(nn.BatchNorm1d(2), [torch.randn(4, 2)], num_batches=0)


def test_recalibrate_rejects_a_batch_it_cannot_read_and_restores_state() -> None:
    layer = nn.BatchNorm1d(2).eval()
    with pytest.raises(TypeError, match="forward="):
        bnorm.recalibrate(layer, [{"pixels": torch.randn(3, 2)}], progress=False)
    assert not layer.training and layer.momentum == 0.1


# --------------------------------------------------------------------------------------
# Two processes


RANK_SIZES = {0: (3, 6), 1: (5,)}  # uneven batches, and a different number per rank


def _rank_batches(rank: int) -> list[torch.Tensor]:
    return uneven_batches(10 + rank, RANK_SIZES[rank], (3, 6, 6))


def _recalibrate_worker(rank: int, world: int) -> dict[str, object]:
    model = conv_bn_model().eval()
    report = bnorm.recalibrate(model, _rank_batches(rank), progress=False)
    return {
        "mean0": model[1].running_mean,
        "var0": model[1].running_var,
        "mean1": model[4].running_mean,
        "var1": model[4].running_var,
        "world": report.world_size,
        "count": report.layers[0].count,
    }


@pytest.mark.slow
def test_recalibrate_across_two_gloo_ranks_gives_every_rank_the_global_statistics() -> None:
    results = spawn_gloo(_recalibrate_worker, 2)
    for key in ("mean0", "var0", "mean1", "var1"):
        assert torch.equal(results[0][key], results[1][key]), key  # bit-identical
    assert results[0]["world"] == 2 and results[0]["count"] == 14 * 16
    model = conv_bn_model().eval()
    first, second = reference_inputs(model, _rank_batches(0) + _rank_batches(1))
    for inputs, mean_key, var_key in ((first, "mean0", "var0"), (second, "mean1", "var1")):
        values = np.concatenate(inputs)
        np.testing.assert_allclose(
            results[0][mean_key].numpy(), values.mean(axis=(0, 2, 3)), rtol=0, atol=MEAN_ATOL
        )
        np.testing.assert_allclose(
            results[0][var_key].numpy(), values.var(axis=(0, 2, 3), ddof=1), rtol=VAR_RTOL, atol=0
        )


def test_moving_average_layers_get_the_second_moment_they_normalize_with() -> None:
    """A moving-average layer normalizes with the uncentered second moment χ = E[x²]
    (reduced normalization): recalibrate gives it (0, χ) of all its inputs — not their
    mean and variance — and diagnose, and adapt("bn"), then agree with it."""
    batches = uneven_batches(1, (5, 2, 7), (3,))  # means 0, 0.5, 1: far from centered
    values = torch.cat(batches).double().numpy()
    chi = (values * values).mean(axis=0)
    layer = bnorm.BatchNorm1d(3, moving_average=True)
    report = bnorm.recalibrate(layer, batches, progress=False)
    assert report.layers[0].status == "updated"
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.0, atol=0)
    np.testing.assert_allclose(layer.running_var.numpy(), chi, rtol=VAR_RTOL)
    # The layer's own training rule says the same: one batch of everything, window 1,
    # no warm-up, momentum 1 leaves running_var = χ̄ = χ of that batch.
    trained = bnorm.BatchNorm1d(
        3, momentum=1.0, moving_average=bnorm.MovingAverage(window=1, warmup_steps=0)
    ).double()
    trained(torch.cat(batches).double())
    np.testing.assert_allclose(layer.running_var.numpy(), trained.running_var.numpy(), rtol=1e-6)
    # Evaluation is then γ x / √(χ + ε) + β.
    x = batches[0]
    expected = x.double().numpy() / np.sqrt(chi + layer.eps)
    np.testing.assert_allclose(layer.eval()(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    # diagnose compares like with like: no drift right after recalibrating.
    diagnosis = bnorm.diagnose(layer, batches, progress=False)
    assert diagnosis.layers[0].drift < 1e-6
    # adapt's "bn" (recalibrate on the test data) writes the same statistics.
    fresh = bnorm.BatchNorm1d(3, moving_average=True).eval()
    bnorm.adapt(fresh, batches, "bn", progress=False)
    np.testing.assert_allclose(fresh.running_var.numpy(), chi, rtol=VAR_RTOL)
    np.testing.assert_allclose(fresh.running_mean.numpy(), 0.0, atol=0)
