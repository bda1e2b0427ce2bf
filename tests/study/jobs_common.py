"""What the tests of `bnorm study --jobs N` share: a small study, run in-process, and its
metrics.json compared without the fields that measure time."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bnorm.cli import main as bnorm_main

# A study of a few seconds whose runs feed each other: curves' networks are compared by
# disagreement and measured by shift; small_batch has runs of different lengths.
SMALL = {
    "name": "jobs",
    "seeds": [0, 1],
    "experiments": ["curves", "small_batch", "disagreement", "shift"],
    "curves": {"steps": 30, "eval_every": 10},
    "small_batch": {"steps": 8, "eval_every": 8, "batch_sizes": [4, 16], "norms": ["bn", "ln"]},
}
# Fields that measure time or say where a study ran, not what it computed.
TIMING = {"wall_s", "cpu_s", "started", "out_dir", "latency", "latency_ratio"}


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def study(root: Path, name: str, *options: str) -> dict[str, Any]:
    config = root / "small.json"
    config.write_text(json.dumps(SMALL))
    out = root / name
    argv = ["study", "--config", str(config), "--out", str(out), "--quiet", *options]
    assert bnorm_main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def resume(cmd: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    """``bnorm study --resume out`` in a new process (``cmd``: the interpreter and
    ``-m bnorm study`` first); its metrics.json once it has finished."""
    resumed = subprocess.run(
        [*cmd, "--resume", str(out), "--quiet"], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    return json.loads((out / "metrics.json").read_text())  # type: ignore[no-any-return]
