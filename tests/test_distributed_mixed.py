"""Sharded training with low-precision parameters (FSDP2) and compiled SyncBatchNorm, in
real processes: gloo on localhost, 2 ranks, one spawn for the whole module.

Each rank runs, in one process group:

* FSDP2 — a conv–BN network under ``fully_shard`` with
  ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``, trained 3 steps,
  then a sharded checkpoint (``torch.distributed.checkpoint``) saved and loaded into a
  fresh sharded network; the same network trained in float32 under DDP is the reference;
* compiled SyncBatchNorm — ``torch.compile(model, fullgraph=True)`` of a chain of
  ``bnorm.SyncBatchNorm`` layers (plain, masked, Batch Renorm), against the same chain
  eagerly on each rank and against one process running it on the whole batch.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnorm
from bnorm.testing import spawn_gloo

pytestmark = pytest.mark.slow

WORLD = 2
BF16 = {"atol": 2e-2, "rtol": 2e-2}  # 3 steps of bfloat16 forward/backward vs float32
EXACT = {"atol": 0.0, "rtol": 0.0}
FLOAT32 = {"atol": 2e-5, "rtol": 2e-5}  # one process vs two: float32 sums in another order


# --- FSDP2 --------------------------------------------------------------------------------


def _network(kind: str) -> nn.Module:
    """A conv–BN network: "layers" is built from bnorm's layers (synchronized statistics),
    "convert" is torch's network converted with ``bnorm.convert`` (local statistics)."""
    torch.manual_seed(0)
    if kind == "layers":
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            bnorm.SyncBatchNorm(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            bnorm.BatchNormAct2d(4, activation="relu", sync=True),
            nn.Flatten(),
            nn.Linear(4 * 4 * 5, 2),
        )
    torch_net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 5, 2),
    )
    converted, report = bnorm.convert(torch_net, bnorm.BatchNorm2d)
    assert not report.skipped
    return converted


def _batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4 * WORLD, 3, 4, 5, generator=g) * 2 + 1
    return x[4 * rank : 4 * (rank + 1)]


def _train(net: nn.Module, params: list[nn.Parameter], rank: int) -> None:
    opt = torch.optim.SGD(params, lr=0.05)
    for step in range(3):
        opt.zero_grad()
        net(_batch(step, rank)).float().square().mean().backward()
        opt.step()


def _full_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every sharded parameter gathered whole."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in net.state_dict().items()
    }


def _dtype_recorder(seen: list[tuple[torch.dtype, ...]]) -> object:
    """A forward hook that records (input, weight, running_mean, output) dtypes."""

    def hook(layer: nn.Module, args: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
        seen.append((args[0].dtype, layer.weight.dtype, layer.running_mean.dtype, y.dtype))

    return hook


def _fsdp(rank: int, ckpt: str) -> dict[str, object]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out: dict[str, object] = {}
    for kind in ("layers", "convert"):
        reference = _network(kind)
        # broadcast_buffers=False: each rank keeps its own running statistics, as FSDP2 does.
        ddp = nn.parallel.DistributedDataParallel(reference, broadcast_buffers=False)
        _train(ddp, list(reference.parameters()), rank)
        sharded = _network(kind)
        seen: list[tuple[torch.dtype, ...]] = []
        for layer in sharded.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.register_forward_hook(_dtype_recorder(seen))
        fully_shard(sharded, mp_policy=policy)
        _train(sharded, list(sharded.parameters()), rank)
        state = sharded.state_dict()
        dcp.save(state, checkpoint_id=f"{ckpt}/{kind}")
        fresh = _network(kind)
        fully_shard(fresh, mp_policy=policy)
        loaded = fresh.state_dict()
        dcp.load(loaded, checkpoint_id=f"{ckpt}/{kind}")
        fresh.load_state_dict(loaded)
        out[kind] = {
            "ddp": {k: v.detach().clone() for k, v in reference.state_dict().items()},
            "fsdp": _full_state(sharded),
            "loaded": _full_state(fresh),
            "dtypes": seen,
        }
    return out


# --- compiled SyncBatchNorm -----------------------------------------------------------------

SIZES = [5, 3]  # per-rank batch sizes (uneven)


class _SyncChain(nn.Module):
    """Three synchronized layers in a row: plain, masked, Batch Renorm (fed a squared
    output, whose (r, d) are clipped: the compiled backward must read the running
    statistics from before the step's update)."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = bnorm.SyncBatchNorm(3)
        self.masked = bnorm.SyncBatchNorm(3)
        self.renorm = bnorm.SyncBatchNorm(3, renorm=bnorm.Renorm(1.5, 0.5, 0, 0, 0))
        with torch.no_grad():
            for i, layer in enumerate((self.plain, self.masked, self.renorm)):
                layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]) + i)
                layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]) * i)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.plain(x)
        b = self.masked(a * 2 + 1, mask=mask)
        c = self.renorm(b.square())
        return a, b, c


def _chain(rank: int | None, compiled: bool) -> dict[str, torch.Tensor]:
    """Two training steps of the chain on rank ``rank``'s slice (None: the whole batch)."""
    chain = _SyncChain()
    run = torch.compile(chain, fullgraph=True) if compiled else chain
    out: dict[str, torch.Tensor] = {}
    for step in range(2):
        g = torch.Generator().manual_seed(200 + step)
        n = sum(SIZES)
        x = torch.randn(n, 3, 4, 5, generator=g) * 2 + 1
        dys = [torch.randn(n, 3, 4, 5, generator=g) for _ in range(3)]
        mask = torch.rand(n, 4, 5, generator=g) > 0.3
        if rank is not None:
            start = sum(SIZES[:rank])
            x, mask, *dys = (t[start : start + SIZES[rank]] for t in (x, mask, *dys))
        x = x.clone().requires_grad_()
        ys = run(x, mask)
        sum((y * dy).sum() for y, dy in zip(ys, dys, strict=True)).backward()
        for name, y in zip("abc", ys, strict=True):
            out[f"{name}{step}"] = y.detach()
        out[f"dx{step}"] = x.grad
    for name, p in chain.named_parameters():
        out[f"grad.{name}"] = p.grad
    for name, buf in chain.named_buffers():
        out[name] = buf.clone()
    return out


# --- torch's layers in the same settings (docs/distributed.md's table) ----------------------


def _outcome(step: object) -> str:
    """``"ok"``, or the type and first line of the error ``step()`` raised."""
    try:
        step()  # type: ignore[operator]
        return "ok"
    except Exception as err:  # (what torch raises is the measurement)
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"


def _torch_layers(rank: int) -> dict[str, str]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    x = _batch(0, rank)

    def ddp() -> None:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        nn.parallel.DistributedDataParallel(net)(x).sum().backward()

    def sync_cpu() -> None:
        nn.SyncBatchNorm(3)(x).sum().backward()

    def sync_compiled() -> None:
        torch.compile(nn.SyncBatchNorm(3), fullgraph=True)(x).sum().backward()

    def fsdp_bf16() -> None:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(net, mp_policy=policy)
        net(x).float().sum().backward()

    steps = {"ddp": ddp, "sync_cpu": sync_cpu, "sync_compiled": sync_compiled}
    return {name: _outcome(step) for name, step in {**steps, "fsdp_bf16": fsdp_bf16}.items()}


# --- the spawn ------------------------------------------------------------------------------


def _worker(rank: int, world: int, ckpt: str) -> dict[str, object]:
    assert dist.get_world_size() == world == WORLD
    return {
        "fsdp": _fsdp(rank, ckpt),
        "eager": _chain(rank, compiled=False),
        "compiled": _chain(rank, compiled=True),
        "torch": _torch_layers(rank),
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as ckpt:
        return spawn_gloo(_worker, WORLD, ckpt, timeout_s=120)


# --- FSDP2 tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["layers", "convert"])
def test_fsdp2_bf16_parameters_run_with_float32_statistics(ranks, kind):
    for rank in ranks:
        seen = rank["fsdp"][kind]["dtypes"]
        assert len(seen) == 2 * 3  # two layers, three steps
        # bf16 input and weight meet float32 running statistics; output in bf16.
        assert set(seen) == {(torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16)}
        for name, value in rank["fsdp"][kind]["fsdp"].items():
            if "running" in name:
                assert value.dtype == torch.float32, name


@pytest.mark.parametrize("kind", ["layers", "convert"])
def test_fsdp2_bf16_training_matches_ddp_float32(ranks, kind):
    for rank in ranks:
        ddp, fsdp = rank["fsdp"][kind]["ddp"], rank["fsdp"][kind]["fsdp"]
        assert ddp.keys() == fsdp.keys()
        for name in ddp:
            if name.endswith("num_batches_tracked"):
                assert int(fsdp[name]) == int(ddp[name]) == 3
            else:
                torch.testing.assert_close(fsdp[name], ddp[name], **BF16, msg=name)
    if kind == "layers":  # synchronized statistics: equal on every rank
        for name, value in ranks[0]["fsdp"][kind]["fsdp"].items():
            torch.testing.assert_close(value, ranks[1]["fsdp"][kind]["fsdp"][name], **EXACT)


def test_fsdp2_checkpoint_restores_synchronized_statistics_exactly(ranks):
    for rank in ranks:
        saved, loaded = rank["fsdp"]["layers"]["fsdp"], rank["fsdp"]["layers"]["loaded"]
        assert saved.keys() == loaded.keys()
        for name in saved:
            assert loaded[name].dtype == saved[name].dtype, name
            torch.testing.assert_close(loaded[name], saved[name], **EXACT, msg=name)


def test_fsdp2_checkpoint_keeps_one_copy_of_local_statistics(ranks):
    # Local batch norm under FSDP2 leaves each rank its own running statistics; they are
    # plain (replicated) tensors to torch.distributed.checkpoint, which saves one copy:
    # every rank loads the same statistics, those of one rank. (Parameters: exact.)
    saved = [rank["fsdp"]["convert"]["fsdp"] for rank in ranks]
    loaded = [rank["fsdp"]["convert"]["loaded"] for rank in ranks]
    stats = [name for name in saved[0] if "running" in name]
    assert any(not torch.equal(saved[0][n], saved[1][n]) for n in stats)  # (they differ)
    source = 0 if torch.equal(loaded[0][stats[0]], saved[0][stats[0]]) else 1
    for name in saved[0]:
        for rank in range(WORLD):
            want = saved[source][name] if name in stats else saved[rank][name]
            torch.testing.assert_close(loaded[rank][name], want, **EXACT, msg=name)


# --- compiled SyncBatchNorm tests -----------------------------------------------------------


def test_compiled_sync_batch_norm_equals_eager_on_each_rank(ranks):
    for rank in ranks:
        eager, compiled = rank["eager"], rank["compiled"]
        assert eager.keys() == compiled.keys()
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], **FLOAT32, msg=name)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_sync_batch_norm_on_two_ranks_equals_one_process_on_the_whole_batch(ranks, mode):
    whole = _chain(None, compiled=False)
    for r, rank in enumerate(ranks):
        got = rank[mode]
        start = sum(SIZES[:r])
        for name, value in whole.items():
            if name.startswith(("a", "b", "c", "dx")):  # per sample: this rank's slice
                want = value[start : start + SIZES[r]]
            elif name.startswith("grad."):  # the global loss: the ranks' gradients sum
                want = None
            else:  # running statistics and counters: the global batch's
                want = value
            if want is not None:
                torch.testing.assert_close(got[name], want, **FLOAT32, msg=name)
    for name in (n for n in whole if n.startswith("grad.")):
        total = sum(rank[mode][name] for rank in ranks)
        torch.testing.assert_close(total, whole[name], **FLOAT32, msg=name)


# --- torch's layers, measured in the same processes ------------------------------------------


def test_torch_batch_norm_trains_under_ddp(ranks):
    assert [rank["torch"]["ddp"] for rank in ranks] == ["ok"] * WORLD


def test_torch_sync_batch_norm_refuses_cpu_eager_and_compiled(ranks):
    for rank in ranks:
        assert rank["torch"]["sync_cpu"].startswith("ValueError: SyncBatchNorm expected input")
        # Compiled, Dynamo stops at the same refusal (torch._dynamo's "Unsupported").
        assert rank["torch"]["sync_compiled"] != "ok"


def test_torch_batch_norm_fails_under_fsdp2_with_bf16_parameters(ranks):
    for rank in ranks:
        assert rank["torch"]["fsdp_bf16"] == (
            "RuntimeError: expected scalar type BFloat16 but found Float"
        )
