"""The device checks of tests/test_cuda.py run on the CPU: their references, tolerances
and helpers are exercised here, where no GPU is (the layers take the eager fallback of
the fused kernels, as everywhere in this suite but the compiled tests)."""

from __future__ import annotations

import argparse

import pytest
import torch

from bnorm.bench import kernels as bench_kernels
from bnorm.cli import main
from device_checks import (
    CASE_IDS,
    CASES,
    check_fold_and_recalibrate,
    check_layer,
    check_sync_world1,
)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_on_cpu_matches_float64_and_torch(case, layout):
    check_layer(case, "cpu", torch.float32, layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[9]], ids=lambda c: c.name)
def test_half_precision_on_cpu_within_the_documented_tolerance(case, dtype):
    check_layer(case, "cpu", dtype, "channels_last")


def test_sync_batch_norm_world1_gloo():
    check_sync_world1("cpu", "gloo")


def test_fold_and_recalibrate_on_cpu():
    check_fold_and_recalibrate("cpu")


def test_device_bench_part_runs_and_its_ratios_are_consistent(monkeypatch):
    """`bnorm bench kernels --device cuda`'s part, on the CPU with a tiny shape (a smoke
    run: the timings are not checked, only that every kernel case runs and reports)."""
    monkeypatch.setattr(bench_kernels, "RESNET20_SHAPES", [(8, 4, 4)])
    args = argparse.Namespace(quick=False, repeats=1, warmup=0)
    result = bench_kernels.device_layer_part(args, torch.device("cpu"))
    rows = result["rows"]
    assert {(r["pattern"], r["layout"]) for r in rows} == {
        (p, layout) for p in bench_kernels.DEVICE_PATTERNS for layout in ("NCHW", "channels_last")
    }
    for r in rows:
        assert r["bnorm/torch"] == pytest.approx(r["bnorm_ms"] / r["torch_ms"])
        assert r["bnorm/copy"] == pytest.approx(r["bnorm_GB/s"] / r["copy_GB/s"])
    assert "bnorm/torch" in result["summary"][0]


def test_bench_device_option_is_checked_before_anything_runs(capsys):
    assert main(["bench", "kernels", "--device", "tpu"]) == 2
    assert "expected --device cpu or cuda[:N] (got 'tpu')" in capsys.readouterr().out
    assert main(["bench", "layer", "--device", "cuda"]) == 2
    expected = "expected the suite 'kernels' with --device cuda (got 'layer')"
    assert expected in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["bench", "kernels", "--device", "cuda"]) == 2
        assert "expected a CUDA device for --device cuda" in capsys.readouterr().out
