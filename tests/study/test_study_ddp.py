"""`torchrun --nproc_per_node=2 -m bnorm study --norm syncbn`: real processes, gloo, DDP.

Two processes with SyncBatchNorm see the statistics of the global batch, so they must
train exactly like one process with plain BN on the whole batch; two processes with
local BN (each half batch normalized on its own) must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnorm.cli import main as bnorm_main
from bnorm.testing import free_port

ARGS = [
    "--experiments",
    "curves",
    "--norm",
    "bn,syncbn",
    "--steps",
    "20",
    "--seeds",
    "0",
    "--quiet",
]


def _runs(out: Path) -> dict[str, dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return {r["norm"]: r for r in metrics["experiments"]["curves"]["runs"]}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "-m", "bnorm", "study", *ARGS, "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_process_syncbn_trains_like_one_process_bn_on_the_global_batch(
    two_process_run, tmp_path
):
    single = tmp_path / "single"
    assert bnorm_main(["study", *ARGS, "--out", str(single)]) == 0
    one = _runs(single)["bn"]["curve"]
    two = _runs(two_process_run)
    sync, local = two["syncbn"]["curve"], two["bn"]["curve"]
    assert sync["step"] == one["step"] == [0, 20]
    assert sync["train_loss"][1:] == pytest.approx(one["train_loss"][1:], rel=1e-4)
    assert sync["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    # Local BN over half batches is a different training run.
    assert local["train_loss"][1:] != pytest.approx(one["train_loss"][1:], rel=1e-4)


def test_only_rank_zero_writes_the_run_directory(two_process_run):
    names = {p.name for p in two_process_run.iterdir()}
    assert {"config.json", "metrics.json", "report.html", "report.md"} <= names
    metrics = json.loads((two_process_run / "metrics.json").read_text())
    assert metrics["runs_finished"] == 2
    assert not any(p.name.startswith("rank") for p in two_process_run.parent.iterdir())
