"""bnorm on a CUDA device (``make test-gpu``; skipped without CUDA).

Every kernel path — plain batch norm, BatchNormAct with each activation and the
residual, the memory-efficient mode, masks, ghost batches, Batch Renorm — in float32,
bfloat16 and float16, NCHW and channels_last, compiled (Triton) and with the eager
fallback, against the float64 reference and torch's cuDNN batch norm
(tests/device_checks.py, whose logic tests/test_device_checks.py runs on the CPU);
SyncBatchNorm and the collective moments path over NCCL with one rank, in process;
bnorm.fold and bnorm.recalibrate; no host synchronization in a training step; the
``bnorm bench kernels --device cuda`` part.
"""

from __future__ import annotations

import json

import pytest
import torch

import bnorm
from bnorm import kernels
from bnorm.bench import kernels as bench_kernels
from bnorm.cli import main
from device_checks import (
    CASE_IDS,
    CASES,
    MIXED_KINDS,
    check_fold_and_recalibrate,
    check_layer,
    check_mixed_dtypes,
    check_sync_world1,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU runs the compiled kernels (conftest switches them off for the CPU suite)."""
    monkeypatch.delenv("BNORM_NO_COMPILE", raising=False)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_kernels_match_float64_and_cudnn(case, dtype, layout):
    assert kernels.compile_enabled()
    check_layer(case, "cuda", dtype, layout)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eager_fallback_matches_float64_and_cudnn(case, monkeypatch):
    monkeypatch.setenv("BNORM_NO_COMPILE", "1")
    check_layer(case, "cuda", torch.float32, "channels_last")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", MIXED_KINDS)
def test_half_parameters_with_float32_statistics_match_float32_on_cuda(kind, dtype, train):
    check_mixed_dtypes(kind, "cuda", dtype, train)


def test_sync_batch_norm_and_collective_path_over_nccl_world1():
    check_sync_world1("cuda", "nccl")


def test_fold_and_recalibrate_on_cuda():
    check_fold_and_recalibrate("cuda")


# --- no host synchronization in a training step ---------------------------------------

SYNC_FREE_LAYERS = {
    "BatchNorm2d": lambda: bnorm.BatchNorm2d(8),
    "BatchNorm-axis-1": lambda: bnorm.BatchNorm(8, axis=-1),
    "momentum=None": lambda: bnorm.BatchNorm2d(8, momentum=None),
    "skip_nonfinite=False": lambda: bnorm.BatchNorm2d(8, skip_nonfinite=False),
    "ghost": lambda: bnorm.BatchNorm2d(8, virtual_batch_size=4),
    "renorm": lambda: bnorm.BatchNorm2d(8, renorm=True),
    "BatchNormAct2d-relu": lambda: bnorm.BatchNormAct2d(8, activation="relu"),
    "memory_efficient": lambda: bnorm.BatchNormAct2d(
        8, activation="leaky_relu", memory_efficient=True
    ),
    "SyncBatchNorm-local": lambda: bnorm.SyncBatchNorm(8),
}


def _train_step(layer, x, residual=None, mask=None):
    kwargs = {} if mask is None else {"mask": mask}
    if residual is not None:
        kwargs["residual"] = residual
    y = layer(x, **kwargs)
    y.backward(torch.ones_like(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SYNC_FREE_LAYERS))
def test_training_step_does_not_synchronize_with_the_host(name, dtype):
    """Forward and backward in training under ``torch.cuda.set_sync_debug_mode("error")``
    (which raises on any synchronizing call), after a first step that compiles."""
    layer = SYNC_FREE_LAYERS[name]().cuda()
    shape = (16, 5, 6, 8) if name == "BatchNorm-axis-1" else (16, 8, 5, 6)
    x = torch.randn(shape, device="cuda", dtype=dtype).requires_grad_()
    residual = torch.randn_like(x) if isinstance(layer, bnorm.BatchNormAct) else None
    _train_step(layer, x, residual)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_step(layer, x, residual)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(layer.num_batches_tracked) == 2


def test_masked_step_synchronizes_once_eagerly_and_not_under_torch_compile():
    """The documented exception: in eager mode a masked training step reads the count of
    valid values on the host (to raise on fewer than 2); under torch.compile it does not."""
    layer = bnorm.BatchNorm1d(8).cuda()
    x = torch.randn(16, 8, 12, device="cuda").requires_grad_()
    mask = torch.rand(16, 12, device="cuda") > 0.3
    _train_step(layer, x, mask=mask)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            _train_step(layer, x, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    _train_step(compiled, x, mask=mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_step(compiled, x, mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bench_kernels_device_cuda_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_kernels, "RESNET20_SHAPES", [(32, 16, 8)])
    out = tmp_path / "kernels-cuda.json"
    argv = ["bench", "kernels", "--device", "cuda", "--repeats", "2", "--warmup", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())["suites"]["kernels"]
    assert result["device_name"]
    assert len(result["rows"]) == 2 * len(bench_kernels.DEVICE_PATTERNS)
    for row in result["rows"]:
        assert row["bnorm_ms"] > 0 and row["torch_ms"] > 0 and row["copy_GB/s"] > 0
