"""bnorm's layers under real Lightning: BaseFinetuning's freezing, the
StochasticWeightAveraging callback, and bnorm's LayerSync plugin in a 2-process
DDP run on CPU (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bnorm

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import BaseFinetuning, StochasticWeightAveraging  # noqa: E402

from bnorm.integrations.lightning import BnormSyncBatchNorm  # noqa: E402

FEATURES = 6


def _mlp(bn: type[nn.Module], **options) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 8), bn(8, **options), nn.ReLU(), nn.Linear(8, 8), bn(8, **options),
        nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


def _dataset(n: int = 64) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, FEATURES, generator=gen) * 2 + 0.5
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


class Classifier(pl.LightningModule):
    def __init__(
        self, net: nn.Module, lr: float = 0.1, record: str | None = None, batch_size: int = 8
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.record = record
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        """Each rank's share in order (rank r: examples r, r + W, ...), so that the union
        of the ranks' step-s batches is the one-process batch s."""
        dataset = _dataset()
        sampler = torch.utils.data.DistributedSampler(
            dataset, self.trainer.world_size, self.global_rank, shuffle=False
        )
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)

    def on_train_start(self) -> None:
        if self.record:
            kinds = [type(m).__name__ for m in self.net.modules() if hasattr(m, "running_mean")]
            Path(self.record, f"kinds-{self.global_rank}.json").write_text(json.dumps(kinds))

    def on_train_end(self) -> None:
        if self.record:
            torch.save(self.net.state_dict(), Path(self.record, f"state-{self.global_rank}.pt"))


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    return pl.Trainer(**(defaults | kwargs))


@pytest.mark.parametrize("train_bn", [True, False])
def test_base_finetuning_freeze_treats_bnorm_layers_as_batch_norm(train_bn):
    results = []
    for bn in (nn.BatchNorm1d, bnorm.BatchNorm1d):
        net = _mlp(bn).train()
        BaseFinetuning.freeze(net, train_bn=train_bn)
        results.append(
            [(name, p.requires_grad) for name, p in net.named_parameters()]
            + [(name, m.training) for name, m in net.named_modules()]
        )
    assert results[1] == results[0]
    assert ("1.weight", train_bn) in results[1]


def test_stochastic_weight_averaging_callback_recomputes_statistics_like_torch():
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=16)
    nets = []
    for bn in (nn.BatchNorm1d, bnorm.BatchNorm1d):
        model = Classifier(_mlp(bn))
        swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
        _trainer(max_epochs=3, callbacks=[swa]).fit(model, loader)
        nets.append(model.net)
    theirs, ours = nets
    assert int(ours[1].num_batches_tracked) == len(loader)  # recomputed: one pass, cumulative
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_layer_sync_plugin_applies_and_reverts_sharing_state():
    net = _mlp(bnorm.BatchNorm1d, renorm=True)
    originals = [net[1], net[4]]
    plugin = BnormSyncBatchNorm()
    synced = plugin.apply(net)
    assert [type(synced[i]) for i in (1, 4)] == [bnorm.SyncBatchNorm] * 2
    assert synced[1].renorm == originals[0].renorm and synced[1].weight is originals[0].weight
    synced.train()(torch.randn(10, FEATURES))  # one training step moves the statistics
    moved = synced[4].running_mean.clone()
    reverted = plugin.revert(synced)
    assert reverted[1] is originals[0] and reverted[4] is originals[1]
    assert (
        torch.equal(reverted[4].running_mean, moved) and int(reverted[4].num_batches_tracked) == 1
    )


def _ddp_fit(record: str, batch_size: int, epochs: int) -> None:
    renorm = bnorm.Renorm(2.0, 1.0, 0, 0, 0)
    model = Classifier(_mlp(bnorm.BatchNorm1d, renorm=renorm), record=record, batch_size=batch_size)
    trainer = _trainer(
        devices=2, strategy="ddp_spawn", max_epochs=epochs, plugins=[BnormSyncBatchNorm()],
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(model)
    # Back in this process, Lightning loads rank 0's weights into the model, whose layers
    # were never converted here.
    assert type(model.net[1]) is bnorm.BatchNorm1d and model.net[1].renorm == renorm


@pytest.mark.slow
def test_layer_sync_plugin_two_processes_train_like_one_process_on_the_whole_batch(tmp_path):
    """DDP with bnorm's SyncBatchNorm (Batch Renorm kept): 2 ranks with 8 examples each
    step (interleaved: their union is examples 16s..16s+15) train exactly like one
    process on batches of 16."""
    _ddp_fit(str(tmp_path), batch_size=8, epochs=2)
    for rank in (0, 1):
        kinds = json.loads((tmp_path / f"kinds-{rank}.json").read_text())
        assert kinds == ["SyncBatchNorm", "SyncBatchNorm"]
    net = _mlp(bnorm.BatchNorm1d, renorm=bnorm.Renorm(2.0, 1.0, 0, 0, 0))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=16)
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    for rank in (0, 1):
        state = torch.load(tmp_path / f"state-{rank}.pt")
        for key, value in net.state_dict().items():
            torch.testing.assert_close(
                state[key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {key}"
            )
