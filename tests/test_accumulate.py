"""bnorm.accumulate: k micro-batches per optimizer step, one running-statistics update.

The reference for every layer kind is torch's own ``nn.BatchNorm1d`` in float64 fed the
step's micro-batches concatenated (for masks: the valid positions only) — one forward per
step, the update the block must reproduce.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import bnorm
from bnorm.testing import spawn_gloo

F64 = torch.float64
STEPS = 2


def _init_state(layer: nn.Module, channels: int, seed: int = 7, tracked: int = 3) -> None:
    """Non-trivial starting state: random running statistics, affine, step count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(channels, generator=g, dtype=F64))
        layer.running_var.copy_(torch.rand(channels, generator=g, dtype=F64) + 0.5)
        layer.num_batches_tracked.fill_(tracked)
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(channels, generator=g, dtype=F64) + 0.5)
            layer.bias.copy_(torch.randn(channels, generator=g, dtype=F64))


def _reference(layer: nn.Module, channels: int) -> nn.BatchNorm1d:
    """torch's BatchNorm1d with ``layer``'s momentum, eps and running state."""
    ref = nn.BatchNorm1d(channels, eps=layer.eps, momentum=layer.momentum, dtype=F64)
    with torch.no_grad():
        ref.running_mean.copy_(layer.running_mean)
        ref.running_var.copy_(layer.running_var)
        ref.num_batches_tracked.copy_(layer.num_batches_tracked)
    return ref


def _values(x: Tensor, axis: int, mask: Tensor | None) -> Tensor:
    """The values a layer's statistics see, as (values, C)."""
    xc = x.movedim(axis, -1)
    if mask is not None:
        return xc[mask]
    return xc.reshape(-1, x.shape[axis])


Case = tuple[Callable[[], nn.Module], tuple[int, ...], int, bool, str]
# (factory, per-sample shape, channel axis, masked, forward kind)


def _plain(factory: Callable[[], nn.Module], shape: tuple[int, ...] = (3, 4, 5)) -> Case:
    """A case run on unmasked input of per-sample ``shape``, channels on axis 1."""
    return (factory, shape, 1, False, "plain")


CASES: dict[str, Case] = {
    "bn1d_2d_input": _plain(lambda: bnorm.BatchNorm1d(3, dtype=F64), (3,)),
    "bn1d_3d_input": _plain(lambda: bnorm.BatchNorm1d(3, dtype=F64), (3, 5)),
    "bn2d": _plain(lambda: bnorm.BatchNorm2d(3, dtype=F64)),
    "bn3d": _plain(lambda: bnorm.BatchNorm3d(3, dtype=F64), (3, 2, 3, 2)),
    "axis_last": (lambda: bnorm.BatchNorm(3, axis=-1, dtype=F64), (4, 5, 3), -1, False, "plain"),
    "act_fused": (
        lambda: bnorm.BatchNormAct2d(3, activation="relu", dtype=F64),
        (3, 4, 5),
        1,
        False,
        "residual",
    ),
    "ghost": _plain(lambda: bnorm.BatchNorm2d(3, virtual_batch_size=2, dtype=F64)),
    "renorm": _plain(
        lambda: bnorm.BatchNorm2d(3, renorm=bnorm.Renorm(1.5, 0.5, 0, 0, 0), dtype=F64)
    ),
    "masked": (lambda: bnorm.BatchNorm1d(3, dtype=F64), (3, 6), 1, True, "plain"),
    "masked_act": (
        lambda: bnorm.BatchNormAct1d(3, activation="gelu", dtype=F64),
        (3, 6),
        1,
        True,
        "mask_kw",
    ),
    "momentum_none": _plain(lambda: bnorm.BatchNorm2d(3, momentum=None, dtype=F64)),
    "momentum_0.3": _plain(lambda: bnorm.BatchNorm2d(3, momentum=0.3, dtype=F64)),
    "torch_bn2d": _plain(lambda: nn.BatchNorm2d(3, dtype=F64)),
    "torch_bn1d_momentum_none": _plain(lambda: nn.BatchNorm1d(3, momentum=None, dtype=F64), (3, 5)),
}

# Unequal micro-batch sizes (even, so that ghost batches of 2 divide them).
SIZES = [(4, 2, 6), (6, 4)]


def _micro(step: int, shape: tuple[int, ...], masked: bool) -> list[tuple[Tensor, Tensor | None]]:
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for n in SIZES[step]:
        x = torch.randn(n, *shape, generator=g, dtype=F64) * (1.0 + step) + 0.5 * step - 1
        mask = None
        if masked:
            mask = torch.rand(n, *shape[1:], generator=g) > 0.35
            mask[:, 0] = True  # at least one valid position per sample
            x = x.masked_fill(~mask.unsqueeze(1), float("nan"))  # padding never counts
        out.append((x, mask))
    return out


def _forward(layer: nn.Module, x: Tensor, mask: Tensor | None, kind: str) -> Tensor:
    if kind == "residual":
        return layer(x, torch.ones_like(x) * 0.25)
    if kind == "mask_kw":
        return layer(x, mask=mask)
    return layer(x, mask) if mask is not None else layer(x)


@pytest.mark.parametrize("name", list(CASES))
def test_one_update_per_step_equals_torch_on_the_concatenated_batch(name: str) -> None:
    factory, shape, axis, masked, kind = CASES[name]
    layer = factory()
    _init_state(layer, 3)
    plain = copy.deepcopy(layer)  # torch-style: one update per micro-batch
    ref = _reference(layer, 3)
    start_tracked = int(layer.num_batches_tracked)
    for step in range(STEPS):
        micro = _micro(step, shape, masked)
        before = copy.deepcopy(layer)  # the step-start state
        with bnorm.accumulate(layer) as block:
            for x, mask in micro:
                x = x.clone().requires_grad_()
                y = _forward(layer, x, mask, kind)
                # Per-micro-batch normalization: the layer on this micro-batch alone, from
                # the step-start state (Batch Renorm's r, d included).
                alone = copy.deepcopy(before)
                x2 = x.detach().clone().requires_grad_()
                y2 = _forward(alone, x2, mask, kind)
                torch.testing.assert_close(y, y2, rtol=0, atol=0, equal_nan=True)
                (y.nan_to_num() * 1.5).sum().backward()
                (y2.nan_to_num() * 1.5).sum().backward()
                torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0, equal_nan=True)
                _forward(plain, x.detach(), mask, kind)
        assert block.layers == [""]
        values = torch.cat([_values(x, axis, mask) for x, mask in micro])
        assert block.counts == {"": values.shape[0]}
        ref(values)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
        assert int(layer.num_batches_tracked) == start_tracked + step + 1
        assert layer.momentum == ref.momentum  # restored after the block
    # The test discriminates: torch-style per-micro-batch updates end elsewhere.
    gap = (plain.running_var - ref.running_var).abs().max()
    assert gap > 1e-3
    assert int(plain.num_batches_tracked) == start_tracked + sum(map(len, SIZES))


def _capture_inputs(model: nn.Module) -> tuple[dict[str, list[Tensor]], list[Any]]:
    seen: dict[str, list[Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm2d, bnorm.BatchNorm2d, bnorm.BatchNormAct2d)):

            def hook(m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                seen.setdefault(name, []).append(args[0].detach().clone())

            handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


def _model() -> nn.Module:
    torch.manual_seed(0)
    shared = bnorm.BatchNorm2d(4, dtype=F64)  # called twice per forward
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, dtype=F64),
        shared,
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, dtype=F64),
        nn.BatchNorm2d(4, dtype=F64),
        bnorm.BatchNormAct2d(4, activation="relu", dtype=F64),
        nn.Conv2d(4, 4, 1, dtype=F64),
        shared,
        nn.Flatten(),
        nn.Linear(4 * 25, 3, dtype=F64),
    )


def test_training_a_model_gradients_as_without_block_and_exact_statistics() -> None:
    model = _model()
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    names = ["1", "4", "5"]
    for _ in range(3):
        micro = [torch.randn(n, 2, 5, 5, generator=g, dtype=F64) for n in (3, 5, 4)]
        targets = [torch.randint(0, 3, (x.shape[0],), generator=g) for x in micro]
        refs = {name: _reference(model.get_submodule(name), 4) for name in names}
        start = copy.deepcopy(model)
        seen, handles = _capture_inputs(start)
        for x in micro:
            start(x)  # the step-start model fed each micro-batch: the inputs each BN sees
        for h in handles:
            h.remove()
        with bnorm.accumulate(model):
            for x, t in zip(micro, targets):
                (nn.functional.cross_entropy(model(x), t) / len(micro)).backward()
        for x, t in zip(micro, targets):
            (nn.functional.cross_entropy(plain(x), t) / len(micro)).backward()
        for o in (opt, opt_plain):
            o.step()
            o.zero_grad()
        for name in names:
            layer = model.get_submodule(name)
            ref = refs[name]
            ref(torch.cat([_values(x, 1, None) for x in seen[name]]))
            torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
        assert len(seen["1"]) == 6  # the shared layer: every call counts
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert int(model.get_submodule("1").num_batches_tracked) == 3
    assert int(plain.get_submodule("1").num_batches_tracked) == 18


def test_nonfinite_step_is_skipped_and_counted() -> None:
    layer = bnorm.BatchNorm2d(3, dtype=F64)
    _init_state(layer, 3)
    torch_layer = nn.BatchNorm2d(3, dtype=F64)
    _init_state(torch_layer, 3)
    ref = _reference(torch_layer, 3)
    before = copy.deepcopy(layer.state_dict())
    good = torch.randn(4, 3, 2, 2, dtype=F64)
    bad = torch.randn(4, 3, 2, 2, dtype=F64)
    bad[1, 2, 0, 0] = float("inf")
    for m in (layer, torch_layer):
        with bnorm.accumulate(m):
            m(good)
            m(bad)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(layer.state_dict()[key], before[key], rtol=0, atol=0)
    assert int(layer.num_batches_skipped) == 1
    # torch's layer takes the non-finite update, like torch on the concatenated batch.
    ref(torch.cat([_values(good, 1, None), _values(bad, 1, None)]))
    for got, want in (
        (torch_layer.running_mean, ref.running_mean),
        (torch_layer.running_var, ref.running_var),
    ):
        torch.testing.assert_close(got[:2], want[:2], rtol=1e-9, atol=1e-9)
        assert not torch.isfinite(got[2]) and not torch.isfinite(want[2])
    assert int(torch_layer.num_batches_tracked) == 4


def test_exception_restores_the_step_start_state_and_reraises() -> None:
    model = _model()
    layers = {n: m for n, m in model.named_modules() if n in ("1", "4", "5")}
    for m in layers.values():
        m.momentum = None if isinstance(m, nn.BatchNorm2d) else 0.2
    before = copy.deepcopy(model.state_dict())
    momenta = {n: m.momentum for n, m in layers.items()}
    g = torch.Generator().manual_seed(5)
    with pytest.raises(KeyError, match="boom"), bnorm.accumulate(model):
        model(torch.randn(4, 2, 5, 5, generator=g, dtype=F64)).sum().backward()
        model(torch.randn(3, 2, 5, 5, generator=g, dtype=F64) * float("nan"))
        raise KeyError("boom")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    for n, m in layers.items():
        assert m.momentum == momenta[n]
        assert not m._forward_pre_hooks
    assert int(layers["1"].num_batches_skipped) == 0
    with bnorm.accumulate(model):  # usable again
        model(torch.randn(4, 2, 5, 5, generator=g, dtype=F64))
    assert int(layers["4"].num_batches_tracked) == 1


def test_eval_layers_and_layers_without_running_stats_are_untouched() -> None:
    evaluated = bnorm.BatchNorm2d(3, dtype=F64)
    _init_state(evaluated, 3)
    evaluated.eval()
    no_stats = nn.BatchNorm2d(3, track_running_stats=False, dtype=F64)
    trained = nn.BatchNorm2d(3, dtype=F64)
    model = nn.Sequential(evaluated, no_stats, trained)
    before = copy.deepcopy(evaluated.state_dict())
    x = torch.randn(5, 3, 2, 2, dtype=F64)
    with bnorm.accumulate(model) as block:
        y = evaluated(x)
        model(x)
    assert block.layers == ["2"]
    for key, value in evaluated.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    expected = (x - before["running_mean"].view(1, 3, 1, 1)) / (
        before["running_var"].view(1, 3, 1, 1) + evaluated.eps
    ).sqrt() * before["weight"].view(1, 3, 1, 1) + before["bias"].view(1, 3, 1, 1)
    torch.testing.assert_close(y, expected)
    assert int(trained.num_batches_tracked) == 1


def test_layer_not_called_is_not_counted_and_empty_input_counts_like_torch() -> None:
    a, b = nn.BatchNorm1d(2, dtype=F64), bnorm.BatchNorm1d(2, dtype=F64)
    model = nn.ModuleList([a, b])
    with bnorm.accumulate(model) as block:
        b(torch.zeros(0, 2, dtype=F64))
    assert block.counts == {"1": 0}
    assert int(a.num_batches_tracked) == 0 and int(b.num_batches_tracked) == 1
    torch.testing.assert_close(b.running_var, torch.ones(2, dtype=F64))


def test_one_block_object_serves_every_step_and_follows_the_modes() -> None:
    a, b = bnorm.BatchNorm1d(2, dtype=F64), nn.BatchNorm1d(2, dtype=F64)
    model = nn.Sequential(a, b)
    block = bnorm.accumulate(model)
    g = torch.Generator().manual_seed(9)
    ref = nn.BatchNorm1d(2, dtype=F64)
    for step in range(3):
        if step == 2:
            b.eval()
        xs = [torch.randn(n, 2, generator=g, dtype=F64) for n in (3, 4)]
        with block:
            for x in xs:
                a(x)
                b(x)
        ref(torch.cat(xs))
        assert block.layers == (["0"] if step == 2 else ["0", "1"])
        torch.testing.assert_close(a.running_var, ref.running_var, rtol=1e-9, atol=1e-9)
        if step == 1:
            after_two = {k: v.clone() for k, v in ref.state_dict().items()}
    assert int(a.num_batches_tracked) == 3 and int(b.num_batches_tracked) == 2
    for key, value in b.state_dict().items():  # in eval mode for step 3: untouched
        torch.testing.assert_close(value, after_two[key], rtol=1e-9, atol=1e-9)


def test_bad_arguments_raise_before_any_state_change() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        bnorm.accumulate(torch.randn(3, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one batch-norm layer"):
        bnorm.accumulate(nn.Linear(2, 2))
    odd = nn.BatchNorm1d(2)
    odd.momentum = 1.5
    ok = nn.BatchNorm1d(2)
    with pytest.raises(ValueError, match=r"layer 1 to have momentum in \[0, 1\]"):
        bnorm.accumulate(nn.Sequential(ok, odd))
    assert ok.momentum == 0.1 and not ok._forward_pre_hooks


def test_nested_use_is_refused_and_leaves_the_outer_block_working() -> None:
    layer = bnorm.BatchNorm1d(2, dtype=F64)
    model = nn.Sequential(layer)
    x = torch.randn(6, 2, dtype=F64)
    block = bnorm.accumulate(model)
    with block:
        layer(x[:3])
        with pytest.raises(RuntimeError, match="already inside an accumulate block"):
            with bnorm.accumulate(layer):
                pass
        with pytest.raises(RuntimeError, match="already active"), block:
            pass
        layer(x[3:])
    ref = nn.BatchNorm1d(2, dtype=F64)
    ref(x)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-9, atol=1e-9)
    assert int(layer.num_batches_tracked) == 1 and layer.momentum == 0.1
    assert not layer._forward_pre_hooks


# --------------------------------------------------------------------------------------
# SyncBatchNorm across real processes (gloo)

# Per-rank micro-batch sizes of each step; rank 1's second micro-batch is empty.
RANK_SIZES = [[(3, 5), (4, 2)], [(4, 0), (2, 3)]]


def _rank_micro(rank: int, step: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(10 * rank + step)
    out = []
    for n in RANK_SIZES[rank][step]:
        x = torch.randn(n, 3, 4, 5, generator=g, dtype=F64) * (1 + rank) + rank - 0.5
        out.append((x, torch.rand(n, 4, 5, generator=g) > 0.3))
    return out


def _sync_layers() -> dict[str, nn.Module]:
    layers: dict[str, nn.Module] = {
        "sync": bnorm.SyncBatchNorm(3, dtype=F64),
        "sync_mask": bnorm.SyncBatchNorm(3, momentum=None, dtype=F64),
        "act_sync": bnorm.BatchNormAct2d(3, activation="relu", sync=True, dtype=F64),
        "local": bnorm.BatchNorm2d(3, dtype=F64),
    }
    for layer in layers.values():
        _init_state(layer, 3)
    return layers


def _sync_worker(rank: int, world: int) -> dict[str, dict[str, Tensor]]:
    layers = _sync_layers()
    model = nn.ModuleDict(layers)
    for step in range(STEPS):
        with bnorm.accumulate(model):
            for x, mask in _rank_micro(rank, step):
                x = x.clone().requires_grad_()
                total = layers["sync"](x).sum() + layers["act_sync"](x).sum()
                total = total + layers["sync_mask"](x, mask=mask).sum()
                if x.shape[0]:
                    total = total + layers["local"](x).sum()
                total.backward()
    return {
        name: {k: v.clone() for k, v in layer.state_dict().items()}
        for name, layer in layers.items()
    }


@pytest.mark.slow
def test_sync_layers_update_once_from_every_ranks_micro_batches() -> None:
    world = 2
    got = spawn_gloo(_sync_worker, world)
    start = _sync_layers()
    for name in ("sync", "sync_mask", "act_sync"):
        ref = _reference(start[name], 3)
        for step in range(STEPS):
            parts = [
                _values(x, 1, mask if name == "sync_mask" else None)
                for rank in range(world)
                for x, mask in _rank_micro(rank, step)
            ]
            ref(torch.cat(parts))
        for rank in range(world):
            state = got[rank][name]
            torch.testing.assert_close(state["running_mean"], ref.running_mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(state["running_var"], ref.running_var, rtol=1e-6, atol=1e-6)
            assert int(state["num_batches_tracked"]) == 3 + STEPS
    for rank in range(world):  # the plain layer stays local, as under DDP
        ref = _reference(start["local"], 3)
        for step in range(STEPS):
            ref(torch.cat([_values(x, 1, None) for x, _ in _rank_micro(rank, step)]))
        state = got[rank]["local"]
        torch.testing.assert_close(state["running_mean"], ref.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(state["running_var"], ref.running_var, rtol=1e-6, atol=1e-6)
