"""`bnorm study --jobs N` and the cluster executors (Ray's local cluster, submitit's
local executor for the Slurm path): the same metrics.json as the sequential study apart
from timings, a failing run named, and bad placement options rejected before anything is
written. (Ctrl-C and a killed worker: test_study_jobs_signals.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
from jobs_common import SMALL, study, without_timings

from bnorm.cli import main as bnorm_main


def test_jobs_2_gives_the_sequential_metrics(
    sequential: dict[str, Any], tmp_path: Path
) -> None:
    parallel = study(tmp_path, "run", "--jobs", "2")
    assert sequential["runs_finished"] == sequential["runs_planned"] == 12
    assert without_timings(parallel) == without_timings(sequential)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["runtime"]["jobs"] == 2 and config["runtime"]["threads"] == 1
    # The study's CPU time counts the runs trained in the workers.
    runs = [r for e in parallel["experiments"].values() for r in e["runs"]]
    assert parallel["cpu_s"] >= sum(r["cpu_s"] for r in runs)
    # The runs consumed by disagreement and shift were there when they were summarized.
    assert parallel["experiments"]["disagreement"]["summary"]["headline"]["values"]
    assert parallel["experiments"]["shift"]["summary"]["headline"]["values"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs bnorm[ray]")
def test_ray_local_cluster_gives_the_sequential_metrics(
    sequential: dict[str, Any], tmp_path: Path
) -> None:
    import ray

    got = study(tmp_path, "run", "--executor", "ray", "--jobs", "2")
    assert not ray.is_initialized(), "the local cluster the study started is shut down"
    assert without_timings(got) == without_timings(sequential)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="needs bnorm[slurm]")
def test_submitit_job_array_gives_the_sequential_metrics(
    sequential: dict[str, Any], tmp_path: Path
) -> None:
    # Two runs (each job starts a Python process: seconds apiece); each the same as the
    # sequential study's run of that norm and seed.
    got = study(tmp_path, "run", "--executor", "slurm-local", "--experiments", "curves,shift",
                "--seeds", "1")  # fmt: skip
    runs = without_timings(got["experiments"]["curves"]["runs"])
    assert [(r["norm"], r["seed"]) for r in runs] == [("none", 1), ("bn", 1)]
    expected = without_timings(sequential["experiments"]["curves"]["runs"])
    assert runs == [r for r in expected if r["seed"] == 1]
    # One job per run, its logs beside the run's outputs.
    logs = list((tmp_path / "run" / "submitit").glob("*_log.out"))
    assert len(logs) == 2


# ------------------------------------------------------------------- failures


def test_a_failing_run_stops_the_study_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnorm.study import executors

    real = executors.train_run

    def train_run(spec: Any, data: Any, *, norm: str, seed: int, **kw: Any) -> Any:
        if norm == "bn" and seed == 1:
            raise RuntimeError("out of memory")
        return real(spec, data, norm=norm, seed=seed, **kw)

    monkeypatch.setattr(executors, "train_run", train_run)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**SMALL, "experiments": ["curves"]}))
    out = tmp_path / "run"
    assert bnorm_main(["study", "--config", str(config), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "run curves · bn · seed 1 failed: RuntimeError: out of memory" in err
    assert f"--resume {out}" in err
    # The runs before it finished and are checkpointed; --resume trains only the rest.
    finished = sorted(p.name for p in (out / "checkpoints" / "curves").glob("*.json"))
    assert finished == ["bn-seed0.json", "none-seed0.json", "none-seed1.json"]
    monkeypatch.setattr(executors, "train_run", real)
    trained: list[tuple[str, int]] = []

    def spy(spec: Any, data: Any, *, norm: str, seed: int, **kw: Any) -> Any:
        trained.append((norm, seed))
        return real(spec, data, norm=norm, seed=seed, **kw)

    monkeypatch.setattr(executors, "train_run", spy)
    assert bnorm_main(["study", "--resume", str(out), "--quiet"]) == 0
    assert trained == [("bn", 1)]


# ------------------------------------------------------------------- bad input


def bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    return {
        "jobs-zero": (["--jobs", "0"], "expected jobs to be a positive integer (got '0')"),
        "unknown-executor": (
            ["--executor", "dask"],
            "expected executor in local, ray, slurm, slurm-local (got 'dask')",
        ),
        "address-without-ray": (
            ["--address", "head:6379"],
            "expected --address only with --executor ray",
        ),
        "unreachable-ray": (
            ["--executor", "ray", "--address", "127.0.0.1:1"],
            "expected to reach the Ray cluster at 127.0.0.1:1 (got: ",
        ),
    }


@pytest.mark.parametrize("name", ["jobs-zero", "unknown-executor", "address-without-ray",
                                  "unreachable-ray"])  # fmt: skip
def test_bad_placement_exits_2_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    argv, message = bad_cases(tmp_path)[name]
    if name == "unreachable-ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("needs bnorm[ray]")
    code = bnorm_main(["study", "--quiet", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bnorm study: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing is written for a rejected run"


@pytest.mark.parametrize("executor,extra", [("ray", "ray"), ("slurm", "slurm")])
def test_an_executor_without_its_extra_says_which_to_install(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    executor: str,
    extra: str,
) -> None:
    real = importlib.util.find_spec
    missing = {"ray": "ray", "slurm": "submitit"}[executor]
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    out = tmp_path / "out"
    assert bnorm_main(["study", "--quiet", "--out", str(out), "--executor", executor]) == 2
    err = capsys.readouterr().err
    assert f"pip install 'bnorm[{extra}]'" in err and f"--executor {executor}" in err, err
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="needs bnorm[slurm]")
def test_slurm_without_a_cluster_points_to_slurm_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    out = tmp_path / "out"
    assert bnorm_main(["study", "--quiet", "--out", str(out), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "expected a Slurm cluster for --executor slurm (no sbatch command here" in err, err
    assert "--executor slurm-local" in err and not out.exists()


def test_slurm_parameters_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnorm.study.executors import slurm_parameters

    for key in [k for k in os.environ if k.startswith("BNORM_SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BNORM_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("BNORM_SLURM_GPUS_PER_NODE", "1")
    monkeypatch.setenv("BNORM_SLURM_TIMEOUT_MIN", "720")
    assert slurm_parameters() == {"slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 720}


def test_resume_keeps_the_placement_unless_given_and_checks_it(tmp_path: Path) -> None:
    from bnorm.study.config import UsageError, load_resume

    out = tmp_path / "run"
    out.mkdir()
    runtime = {"device": "cpu", "threads": 1, "jobs": 2, "executor": "local", "address": None}
    config = {"dataset": "digits", "data_dir": None, "seeds": [0], "experiments": {},
              "norm": ["bn"], "runtime": runtime}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    assert load_resume({"resume": str(out)})[0]["runtime"]["jobs"] == 2
    assert load_resume({"resume": str(out), "jobs": "1"})[0]["runtime"]["jobs"] == 1
    with pytest.raises(UsageError, match=r"expected jobs to be a positive integer \(got '0'\)"):
        load_resume({"resume": str(out), "jobs": "0"})
    with pytest.raises(UsageError, match="drop --batch-size"):
        load_resume({"resume": str(out), "batch_size": "8"})
