"""SyncBatchNorm across real processes: gloo on localhost, 2 and 3 ranks spawned here.

Every rank saves what it computed; the test process compares it with single-process
batch norm over the concatenation of all ranks' batches.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import bnorm
from bnorm.testing import spawn_gloo

# Per-rank batch sizes: uneven, and rank 2 has an empty batch.
SIZES = [5, 3, 0]
STEPS = 2


def _data(step: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of a step: input, upstream gradient, mask (deterministic)."""
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES)
    x = torch.randn(n, channels, 4, 5, generator=g) * 2 + 1
    dy = torch.randn(n, channels, 4, 5, generator=g)
    mask = torch.rand(n, 4, 5, generator=g) > 0.3
    return x, dy, mask


def _slice(t: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SIZES[:rank])
    return t[start : start + SIZES[rank]]


def _layer(kind: str) -> torch.nn.Module:
    if kind == "renorm":
        layer = bnorm.SyncBatchNorm(3, renorm=bnorm.Renorm(1.5, 0.5, 0, 0, 0))
    elif kind.startswith("moving"):  # step 1 warm-up, step 2 the window's average
        layer = bnorm.SyncBatchNorm(3, moving_average=bnorm.MovingAverage(2, warmup_steps=1))
    else:
        layer = bnorm.SyncBatchNorm(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return layer


def _run_layer(kind: str, rank: int | None) -> dict[str, torch.Tensor]:
    """Run STEPS training steps of one layer on rank ``rank``'s slice (None: all data)."""
    layer = _layer(kind)
    out: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        x, dy, mask = _data(step)
        if rank is not None:
            x, dy, mask = _slice(x, rank), _slice(dy, rank), _slice(mask, rank)
        x = x.clone().requires_grad_()
        y = layer(x, mask=mask) if kind.endswith("mask") else layer(x)
        (y * dy).sum().backward()
        out[f"y{step}"] = y.detach()
        out[f"dx{step}"] = x.grad.detach()
    out["dweight"] = layer.weight.grad.detach()
    out["dbias"] = layer.bias.grad.detach()
    out["running_mean"] = layer.running_mean.clone()
    out["running_var"] = layer.running_var.clone()
    out["num_batches_tracked"] = layer.num_batches_tracked.clone()
    for name in ("moving_chi", "moving_psi"):
        if hasattr(layer, name):
            out[name] = layer.get_buffer(name).clone()
    return out


GRADGRAD_SIZES = [5, 3]


def _run_gradgrad(rank: int | None) -> dict[str, torch.Tensor]:
    """Double backward (float64) of act(BN(x) + r) with a mask: first-order gradients with
    create_graph, then the gradient of Σ dx² + Σ dγ (summed over ranks: the global loss)."""
    g = torch.Generator().manual_seed(7)
    n = sum(GRADGRAD_SIZES)
    x = torch.randn(n, 3, 4, 5, generator=g, dtype=torch.float64) * 2 + 1
    r = torch.randn(n, 3, 4, 5, generator=g, dtype=torch.float64)
    dy = torch.randn(n, 3, 4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(n, 4, 5, generator=g) > 0.3
    if rank is not None:
        start = sum(GRADGRAD_SIZES[:rank])
        x, r, dy, mask = (t[start : start + GRADGRAD_SIZES[rank]] for t in (x, r, dy, mask))
    layer = bnorm.BatchNormAct2d(3, activation="silu", sync=rank is not None).double()
    x = x.clone().requires_grad_()
    y = layer(x, r, mask=mask)
    dx, dweight = torch.autograd.grad(y, (x, layer.weight), dy, create_graph=True)
    (dx.square().sum() + dweight.sum()).backward()
    return {"dx": dx.detach(), "ddx": x.grad.detach(), "ddweight": layer.weight.grad.detach()}


def _ddp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 5, 2),
    )
    converted, _ = bnorm.convert(model, bnorm.SyncBatchNorm)
    return converted


def _run_ddp(rank: int | None, world: int) -> dict[str, torch.Tensor]:
    model = _ddp_model()
    net: torch.nn.Module = model
    if rank is not None:
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, _, _ = _data(step)
        if rank is not None:
            x = _slice(x, rank)
        opt.zero_grad()
        loss = net(x).square().sum()
        # DDP averages gradients over ranks; scale so both sides minimize the global sum.
        (loss * (world if rank is not None else 1)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _layers_worker(rank: int, world: int) -> dict[str, object]:
    kinds = ("plain", "mask", "renorm", "moving", "moving+mask")
    results: dict[str, object] = {kind: _run_layer(kind, rank) for kind in kinds}
    results["ddp"] = _run_ddp(rank, world)
    return results


def _gradgrad_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _run_gradgrad(rank)


def _timeout_worker(rank: int, world: int) -> dict[str, str]:
    if rank != 0:
        time.sleep(8)  # never calls the layer; stays alive past rank 0's timeout
        return {}
    layer = bnorm.SyncBatchNorm(3)
    try:
        layer(torch.randn(4, 3, 2, 2))
        return {"error": ""}
    except RuntimeError as err:
        return {"error": str(err)}


@pytest.fixture(scope="module")
def three_ranks() -> list[dict]:
    return spawn_gloo(_layers_worker, len(SIZES))


@pytest.mark.parametrize("kind", ["plain", "mask", "renorm", "moving", "moving+mask"])
def test_sync_equals_single_process_bn_on_concatenated_batch(three_ranks, kind):
    ref = _run_layer(kind, None)
    world = len(SIZES)
    for step in range(STEPS):
        y = torch.cat([three_ranks[r][kind][f"y{step}"] for r in range(world)])
        dx = torch.cat([three_ranks[r][kind][f"dx{step}"] for r in range(world)])
        torch.testing.assert_close(y, ref[f"y{step}"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, ref[f"dx{step}"], rtol=1e-5, atol=1e-5)
    # Parameter gradients: each rank holds its own part; their sum is the global one.
    for name in ("dweight", "dbias"):
        total = sum(three_ranks[r][kind][name] for r in range(world))
        torch.testing.assert_close(total, ref[name], rtol=1e-5, atol=1e-5)
    for r in range(world):  # every rank ends with the global running statistics
        for name in ref.keys() & {"running_mean", "running_var", "num_batches_tracked",
                                  "moving_chi", "moving_psi"}:  # (the moving-average windows)
            torch.testing.assert_close(three_ranks[r][kind][name], ref[name], rtol=1e-5, atol=1e-6)


def test_sync_plain_matches_torch_batchnorm_reference(three_ranks):
    # Independent reference: torch's own BatchNorm2d over the concatenated batch.
    layer = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for step in range(STEPS):
        x, _, _ = _data(step)
        y = torch.cat([three_ranks[r]["plain"][f"y{step}"] for r in range(len(SIZES))])
        torch.testing.assert_close(y, layer(x).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(three_ranks[0]["plain"]["running_var"], layer.running_var)


def test_sync_inside_ddp_trains_like_single_process_on_global_batch(three_ranks):
    ref = _run_ddp(None, len(SIZES))
    for r in range(len(SIZES)):
        got = three_ranks[r]["ddp"]
        assert set(got) == set(ref)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)


def test_double_backward_through_sync_keeps_the_cross_rank_terms():
    got = spawn_gloo(_gradgrad_worker, len(GRADGRAD_SIZES))
    ref = _run_gradgrad(None)
    for key in ("dx", "ddx"):
        torch.testing.assert_close(
            torch.cat([g[key] for g in got]), ref[key], rtol=1e-9, atol=1e-10
        )
    torch.testing.assert_close(
        sum(g["ddweight"] for g in got), ref["ddweight"], rtol=1e-9, atol=1e-10
    )


def test_missing_peer_surfaces_as_clear_error_not_hang():
    # A group whose collective timed out cannot be torn down cleanly (teardown=False).
    result = spawn_gloo(_timeout_worker, 2, timeout_s=4, teardown=False)[0]
    assert "SyncBatchNorm" in result["error"]
    assert "timeout" in result["error"]


def test_sync_without_process_group_is_local_batch_norm():
    assert not dist.is_initialized()
    x = torch.randn(6, 3, 4, 4)
    ours, theirs = bnorm.SyncBatchNorm(3), torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
