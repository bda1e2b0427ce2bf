"""`bnorm study --jobs N` interrupted: Ctrl-C, then --resume, ends with the sequential
study's metrics; a worker process killed fails the study, and --resume finishes it.
Real processes and signals (the study's pool, its forkserver, their process group)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jobs_common import SMALL, resume, without_timings

from bnorm.cli import main as bnorm_main


@pytest.mark.slow
def test_ctrl_c_with_jobs_2_then_resume_ends_with_the_sequential_metrics(
    sequential: dict[str, Any], tmp_path: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps(SMALL))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    cmd = [sys.executable, "-m", "bnorm", "study", "--config", str(config), "--quiet"]
    # A new process group: the signal reaches the study and its workers, as Ctrl-C does.
    # SIGINT as a terminal gives it (a shell's background job inherits it ignored).
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--jobs", "2"], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any((out / "checkpoints").glob("*/*.json")):
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    interrupted = json.loads((out / "metrics.json").read_text())
    assert interrupted["interrupted"] and interrupted["runs_finished"] < 12
    got = resume(cmd[:4], out, env)
    assert without_timings(got) == without_timings(sequential)


def pool_workers(pid: int) -> list[int]:
    """The pool's worker processes: the children of ``pid``'s forkserver."""

    def children(p: int | str) -> list[str]:
        return Path(f"/proc/{p}/task/{p}/children").read_text().split()

    servers = [c for c in children(pid) if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return [int(w) for server in servers for w in children(server)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_a_killed_worker_fails_the_study_and_resume_finishes_it(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    for steps in (300, 1200, 4800):  # longer runs if all finished before the kill
        config = tmp_path / f"c{steps}.json"
        options = {"experiments": ["curves"], "seeds": [0, 1]}
        config.write_text(json.dumps({**options, "curves": {"steps": steps, "eval_every": steps}}))
        out = tmp_path / f"run{steps}"
        cmd = [sys.executable, "-m", "bnorm", "study", "--config", str(config), "--quiet"]
        proc = subprocess.Popen(
            [*cmd, "--out", str(out), "--jobs", "2"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any((out / "checkpoints").glob("*/*.json")):
                break
            time.sleep(0.05)
        workers = pool_workers(proc.pid) if proc.poll() is None else []
        if workers:
            os.kill(workers[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert "a worker process died" in stderr and f"--resume {out}" in stderr, stderr
    assert not (out / "metrics.json").exists()
    got = resume(cmd[:4], out, env)
    assert got["runs_finished"] == 4
    straight = tmp_path / "straight"
    assert bnorm_main(["study", "--config", str(config), "--out", str(straight), "--quiet"]) == 0
    expected = json.loads((straight / "metrics.json").read_text())
    assert without_timings(got["experiments"]) == without_timings(expected["experiments"])
