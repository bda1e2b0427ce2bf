"""`bnorm study` end to end: a seconds-long run checked file by file, Ctrl-C and
--resume, configuration precedence, and every error path (exit code 2, one line)."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bnorm.cli import build_parser
from bnorm.cli import main as bnorm_main
from bnorm.study.config import resolve_config
from bnorm.study.data import load_digits
from bnorm.study.experiments import EXPERIMENTS
from bnorm.study.kinds import mean_std
from bnorm.study.report import summary_rows
from bnorm.study.train import TrainSpec, train_run

TINY = {
    "name": "tiny",
    "seeds": [0, 1],
    "curves": {"steps": 40, "eval_every": 10},
    "lr_tolerance": {"steps": 24, "eval_every": 24, "lrs": [0.1, 8.0]},
    "depth": {"steps": 30, "eval_every": 10, "hidden": [16, 16, 16, 16]},
    "small_batch": {
        "steps": 12,
        "eval_every": 12,
        "batch_sizes": [4, 16],
        "norms": ["bn", "renorm", "ghost"],
    },
    "accumulation": {"steps": 6, "eval_every": 3, "micro_batches": 3},
}
FIGURES = [
    "curves-accuracy.png",
    "curves-percentiles.png",
    "lr_tolerance.png",
    "depth-accuracy.png",
    "depth-gradnorms.png",
    "small_batch.png",
    "accumulation.png",
    "disagreement.png",
    "shift.png",
]


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    config = write_json(root / "tiny.json", TINY)
    out = root / "run"
    assert bnorm_main(["study", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    return out


# ------------------------------------------------------------------- the outputs


def test_run_directory_holds_every_output_file(tiny_run: Path) -> None:
    names = {p.name for p in tiny_run.iterdir()}
    assert {
        "config.json",
        "metrics.json",
        "report.html",
        "report.md",
        "checkpoints",
        *FIGURES,
    } <= names
    for fig in FIGURES:
        assert (tiny_run / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_json_is_fully_resolved_and_stored_in_every_checkpoint(tiny_run: Path) -> None:
    config = json.loads((tiny_run / "config.json").read_text())
    exps = config["experiments"]
    assert list(exps) == [e.name for e in EXPERIMENTS]
    assert (
        config["seeds"] == [0, 1]
        and config["norm"] == ["none", "bn"]
        and config["dataset"] == "digits"
    )
    curves = exps["curves"]["spec"]
    # The experiment's defaults with the config file's table on top.
    assert (curves["steps"], curves["eval_every"], curves["batch_size"]) == (40, 10, 60)
    assert (curves["activation"], curves["init"], curves["hidden"]) == (
        "sigmoid",
        "normal",
        [100, 100, 100],
    )
    assert exps["lr_tolerance"]["options"]["lrs"] == [0.1, 8.0]
    checkpoints = sorted((tiny_run / "checkpoints").rglob("*.json"))
    assert exps["small_batch"]["options"]["batch_sizes"] == [4, 16]
    assert len(checkpoints) == 4 + 8 + 4 + 12 + 4
    for path in checkpoints:
        saved = json.loads(path.read_text())
        assert saved["config"] == config
        assert saved["record"]["done"]
        assert (path.parent / saved["tensors"]).is_file()


def test_metrics_json_holds_every_curve_and_consistent_summaries(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["schema_version"] == 1 and not metrics["interrupted"]
    assert metrics["runs_planned"] == metrics["runs_finished"] == 32
    exps = metrics["experiments"]
    runs = exps["curves"]["runs"]
    assert sorted((r["norm"], r["seed"]) for r in runs) == [
        ("bn", 0),
        ("bn", 1),
        ("none", 0),
        ("none", 1),
    ]
    for r in runs:
        c = r["curve"]
        assert c["step"] == [0, 10, 20, 30, 40]
        assert len(c["test_accuracy"]) == len(c["test_loss"]) == len(c["train_loss"]) == 5
        assert len(r["probe"]["p15"]) == 5 and all(
            a <= b <= d for a, b, d in zip(r["probe"]["p15"], r["probe"]["p50"], r["probe"]["p85"])
        )
        assert len(r["predictions"]) == metrics["dataset"]["test"] == 359
    # The summary's numbers recomputed from the runs.
    summary = {row["experiment"]: row for row in metrics["summary"]}
    for norm in ("none", "bn"):
        finals = [r["curve"]["test_accuracy"][-1] for r in runs if r["norm"] == norm]
        assert summary["curves"]["values"][norm] == pytest.approx(mean_std(finals))
    # Disagreement recomputed from the stored predictions and the test labels.
    labels = load_digits().test_labels.tolist()
    pairs = exps["disagreement"]["summary"]["pairs"]["bn"]
    assert sorted(pair["seed"] for pair in pairs) == [0, 1]
    for pair in pairs:
        a = next(
            r for r in runs if r["norm"] == "none" and r["seed"] == pair["seed"]
        )["predictions"]
        b = next(r for r in runs if r["norm"] == "bn" and r["seed"] == pair["seed"])["predictions"]
        where = [i for i in range(len(labels)) if a[i] != b[i]]
        a_right = sum(a[i] == labels[i] for i in where)
        b_right = sum(b[i] == labels[i] for i in where)
        assert pair["test_examples"] == len(labels) == len(a) == len(b)
        assert pair["disagreements"] == len(where) > 0
        assert pair["baseline_accuracy_on_disagreements"] == pytest.approx(a_right / len(where))
        assert pair["accuracy_on_disagreements"] == pytest.approx(b_right / len(where))
        assert pair["both_wrong"] == len(where) - a_right - b_right
    lr_runs = exps["lr_tolerance"]["runs"]
    assert sorted({r["lr"] for r in lr_runs}) == [0.1, 8.0] and len(lr_runs) == 8
    for r in runs:  # from training to inference, for the BN networks
        if r["norm"] == "bn":
            inf = r["inference"]
            assert inf["folded_layers"] == 3 and inf["not_folded_layers"] == 0
            assert inf["fold_max_abs_logit_diff"] < 1e-4
            assert 0.0 <= inf["recalibrated_accuracy"] <= 1.0
            assert inf["ema_accuracy"] == r["curve"]["test_accuracy"][-1]
            assert set(inf["latency"]) == {"batch_1", "batch_359"}
        else:
            assert r.get("inference") is None
    small = exps["small_batch"]
    assert sorted({(r["norm"], r["batch_size"]) for r in small["runs"]}) == [
        (n, b) for n in ("bn", "ghost", "renorm") for b in (4, 16)
    ]
    table = small["summary"]["table"]
    assert [row["batch_size"] for row in table] == [4, 16] and small["summary"][
        "field"
    ] == "batch_size"
    for row in table:  # the table's means recomputed from the runs
        for norm in ("bn", "renorm", "ghost"):
            finals = [
                r["curve"]["test_accuracy"][-1]
                for r in small["runs"]
                if r["norm"] == norm and r["batch_size"] == row["batch_size"]
            ]
            assert row[norm]["mean"] == pytest.approx(sum(finals) / len(finals))
    # A batch of 4 is one ghost batch of at most 8: ghost BN is exactly BN there.
    for seed in (0, 1):
        pick = {r["norm"]: r for r in small["runs"] if r["batch_size"] == 4 and r["seed"] == seed}
        assert pick["ghost"]["curve"]["test_accuracy"] == pick["bn"]["curve"]["test_accuracy"]
    depth = exps["depth"]["runs"]
    assert all(len(r["grad_norms"]["init"]) == len(r["grad_norms"]["final"]) == 5 for r in depth)
    acc = exps["accumulation"]
    assert sorted((r["seed"], r["accumulate_stats"]) for r in acc["runs"]) == [
        (s, m) for s in (0, 1) for m in (False, True)
    ]
    for r in acc["runs"]:
        assert r["norm"] == "bn" and r["micro_batches"] == 3 and r["batch_size"] == 4
        assert r["curve"]["step"] == [0, 3, 6]
        check = r["running_stats"]
        assert check["layers"] == ["body.2", "body.5", "body.8"] and len(check["drift"]) == 3
        assert check["mean_drift"] == pytest.approx(sum(check["drift"]) / 3)
    for seed in (0, 1):  # same gradients in both arms: only the running statistics differ
        pick = {r["accumulate_stats"]: r for r in acc["runs"] if r["seed"] == seed}
        assert pick[False]["curve"]["train_loss"] == pick[True]["curve"]["train_loss"]
        per_micro, merged = pick[False]["running_stats"], pick[True]["running_stats"]
        assert per_micro["recalibrated_accuracy"] == merged["recalibrated_accuracy"]
        assert per_micro["drift"] != merged["drift"]
    acc_summary = acc["summary"]["per_norm"]["bn"]
    for merged, arm in ((False, "per_micro"), (True, "accumulate")):
        mine = [r for r in acc["runs"] if r["accumulate_stats"] == merged]
        finals = [r["curve"]["test_accuracy"][-1] for r in mine]
        assert acc_summary[arm]["final_accuracy"] == pytest.approx(mean_std(finals))
        drifts = [r["running_stats"]["mean_drift"] for r in mine]
        assert acc_summary[arm]["mean_drift"] == pytest.approx(mean_std(drifts))
    assert acc_summary["train_loss_max_abs_diff"] == 0
    merged_final = acc_summary["accumulate"]["final_accuracy"]
    assert summary["accumulation"]["values"]["bn+accumulate"] == merged_final
    assert "bn+accumulate" in metrics["norms"]


def test_report_html_is_self_contained_with_the_summary_first(tiny_run: Path) -> None:
    page = (tiny_run / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page), "external asset referenced"
    assert "<link" not in page and "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(FIGURES)
    embedded = {base64.b64decode(i) for i in images}
    assert embedded == {(tiny_run / f).read_bytes() for f in FIGURES}
    first_table = page[page.index("<table") : page.index("</table>")]
    assert "Summary" in page[: page.index("<table")]
    for cell in (
        "The BN paper&#x27;s MNIST experiment, adapted",
        "Learning-rate tolerance",
        "Prediction disagreement",
        "Speed-up BN vs no BN",
    ):
        assert cell in first_table


def test_report_md_has_the_same_summary_table_and_figures_beside_it(tiny_run: Path) -> None:
    md = (tiny_run / "report.md").read_text()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    headers, rows = summary_rows(metrics)
    assert "| " + " | ".join(headers) + " |" in md
    for row in rows:
        assert "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" in md
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert sorted(linked) == sorted(FIGURES)
    assert all((tiny_run / name).is_file() for name in linked)


# -------------------------------------------------------------- configuration


def test_command_line_beats_config_file_beats_defaults(tmp_path: Path) -> None:
    config = write_json(
        tmp_path / "c.json", {"steps": 11, "batch_size": 30, "curves": {"steps": 22}}
    )
    resolved = resolve_config({"config": str(config)})
    specs = {k: v["spec"] for k, v in resolved["experiments"].items() if v["spec"]}
    assert specs["curves"]["steps"] == 22 and specs["depth"]["steps"] == 11
    assert all(s["batch_size"] == 30 for s in specs.values())
    resolved = resolve_config({"config": str(config), "steps": "7", "lr": "0.05"})
    specs = {k: v["spec"] for k, v in resolved["experiments"].items() if v["spec"]}
    assert all(s["steps"] == 7 and s["epochs"] is None for s in specs.values())
    assert all(s["lr"] == 0.05 for s in specs.values())


def test_toml_config_and_preset(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        'dataset = "synthetic"\npreset = "resnet-paper"\nexperiments = ["curves"]\nseeds = "3-5"\n'
    )
    resolved = resolve_config({"config": str(toml)})
    spec = resolved["experiments"]["curves"]["spec"]
    assert resolved["seeds"] == [3, 4, 5] and resolved["dataset"] == "synthetic"
    assert (spec["model"], spec["momentum"], spec["weight_decay"], spec["lr"]) == (
        "resnet20",
        0.9,
        1e-4,
        0.1,
    )
    assert (spec["epochs"], spec["steps"], spec["batch_size"], spec["augment"]) == (
        164,
        None,
        128,
        True,
    )
    assert spec["lr_milestones"] == [0.5, 0.75]
    # --model picks another network of the recipe; --epochs shortens it.
    resolved = resolve_config({"config": str(toml), "model": "resnet56", "epochs": "2"})
    spec = resolved["experiments"]["curves"]["spec"]
    assert (spec["model"], spec["epochs"]) == ("resnet56", 2)


def test_model_option_switches_conv_nets_to_he_initialization() -> None:
    resolved = resolve_config({"model": "cnn"})
    exps = resolved["experiments"]
    assert exps["curves"]["spec"]["model"] == "cnn" and exps["curves"]["spec"]["init"] == "kaiming"
    assert exps["depth"]["spec"]["model"] == "deep-mlp"  # the depth experiment keeps its network


def test_help_documents_every_option() -> None:
    parser = build_parser()
    study = parser._subparsers._group_actions[0].choices["study"]  # type: ignore[union-attr]
    text = study.format_help()
    options = [
        a.option_strings[-1]
        for a in study._actions
        if a.option_strings and a.option_strings[-1] != "--help"
    ]
    assert len(options) == 22
    for opt in options:
        assert opt in text
    for exp in EXPERIMENTS:
        assert exp.name in text


# ------------------------------------------------------------------- errors


def idx(array: np.ndarray) -> bytes:
    return (
        struct.pack(">BBBB", 0, 0, 8, array.ndim)
        + b"".join(struct.pack(">I", n) for n in array.shape)
        + array.tobytes()
    )


def mnist_dir(root: Path, truncate: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": np.zeros((4, 28, 28), np.uint8),
        "train-labels-idx1-ubyte": np.zeros(4, np.uint8),
        "t10k-images-idx3-ubyte": np.zeros((2, 28, 28), np.uint8),
        "t10k-labels-idx1-ubyte": np.zeros(2, np.uint8),
    }
    for name, array in files.items():
        data = idx(array)
        if truncate and name == "t10k-images-idx3-ubyte":
            data = data[:-30]
        (root / (name + ".gz")).write_bytes(gzip.compress(data))
    return root


def error_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    bad_key = write_json(tmp / "bad_key.json", {"sedes": [1]})
    bad_table = write_json(tmp / "bad_table.json", {"curves": {"stepz": 3}})
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text("seeds = [1, 2\n")
    bad_type = write_json(tmp / "bad_type.json", {"depth": {"activation": "gelu"}})
    yaml = tmp / "c.yaml"
    yaml.write_text("seeds: [1]\n")
    full = tmp / "full"
    full.mkdir()
    (full / "something").write_text("x")
    return {
        "steps-not-int": (
            ["--steps", "abc"],
            "expected steps to be a positive integer (got 'abc')",
        ),
        "steps-zero": (["--steps", "0"], "expected steps to be a positive integer (got '0')"),
        "steps-and-epochs": (["--steps", "5", "--epochs", "2"], "not allowed with argument"),
        "lr-negative": (["--lr", "-1"], "expected lr to be a positive number (got '-1')"),
        "unknown-norm": (
            ["--norm", "none,layernorm"],
            "expected norm from none, bn, renorm, ghost, syncbn, ln, gn, mabn (got 'layernorm')",
        ),
        "repeated-norm": (["--norm", "bn,bn"], "expected no repeated entries in norm"),
        "unknown-experiment": (
            ["--experiments", "curves,foo"],
            "expected experiments from curves, lr_tolerance",
        ),
        "missing-source": (
            ["--experiments", "disagreement"],
            "experiment 'disagreement' compares the runs of 'curves'",
        ),
        "bad-seeds": (["--seeds", "1,x"], "expected seeds to be non-negative integers (got 'x')"),
        "unknown-dataset": (["--dataset", "imagenet"], "expected dataset in digits, mnist"),
        "unknown-model": (["--model", "vgg"], "expected model in mlp, deep-mlp"),
        "unavailable-device": (["--device", "cuda:7"], "expected an available device"),
        "bad-device": (["--device", "gpu!"], "expected a torch device"),
        "threads-zero": (["--threads", "0"], "expected threads to be a positive integer"),
        "bad-name": (["--name", "a/b"], "expected a name of letters"),
        "missing-config": (
            ["--config", str(tmp / "nope.toml")],
            "nope.toml: cannot read the config file",
        ),
        "config-suffix": (
            ["--config", str(yaml)],
            "c.yaml: expected a .toml or .json config file (got '.yaml')",
        ),
        "config-unknown-key": (["--config", str(bad_key)], "bad_key.json: unknown key 'sedes'"),
        "config-unknown-setting": (
            ["--config", str(bad_table)],
            "unknown setting 'stepz' for experiment 'curves'",
        ),
        "config-bad-toml": (["--config", str(bad_toml)], "bad.toml: not valid TOML"),
        "config-bad-value": (
            ["--config", str(bad_type)],
            "experiment 'depth': expected activation in sigmoid",
        ),
        "out-not-empty": (["--out", str(full)], "expected --out to be a new or empty directory"),
        "resume-not-a-run": (["--resume", str(full)], "config.json to resume from"),
        "resume-with-options": (["--resume", str(full), "--steps", "5"], "drop --steps"),
        "batch-too-large": (
            ["--batch-size", "5000"],
            "expected a batch size ≤ the 1438 training images (got 5000)",
        ),
        "mnist-missing": (
            ["--dataset", "mnist", "--data-dir", str(tmp / "empty")],
            "train-images-idx3-ubyte: file not found",
        ),
        "mnist-truncated": (
            ["--dataset", "mnist", "--data-dir", str(mnist_dir(tmp / "mnist", truncate=True))],
            "t10k-images-idx3-ubyte.gz: truncated: the header promises 2×28×28 = 1568 values "
            "(got 1538 bytes)",
        ),
    }


ERROR_NAMES = [
    "steps-not-int", "steps-zero", "steps-and-epochs", "lr-negative", "unknown-norm",
    "repeated-norm", "unknown-experiment", "missing-source", "bad-seeds", "unknown-dataset",
    "unknown-model", "unavailable-device", "bad-device", "threads-zero", "bad-name",
    "missing-config", "config-suffix", "config-unknown-key", "config-unknown-setting",
    "config-bad-toml", "config-bad-value", "out-not-empty", "resume-not-a-run",
    "resume-with-options", "batch-too-large", "mnist-missing", "mnist-truncated",
]  # fmt: skip


def test_error_case_list_is_complete(tmp_path: Path) -> None:
    assert sorted(error_cases(tmp_path)) == sorted(ERROR_NAMES)


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    argv, message = error_cases(tmp_path)[name]
    try:
        code = bnorm_main(
            ["study", "--quiet", "--out", str(tmp_path / "out"), *argv]
            if name not in ("out-not-empty", "resume-not-a-run", "resume-with-options")
            else ["study", *argv]
        )
    except SystemExit as exit_:
        code = exit_.code  # argparse's own errors
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bnorm study: error: ")
    assert message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing is written for a rejected run"


def test_missing_fashion_mnist_exits_2_saying_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnorm.study import data as data_module

    monkeypatch.chdir(tmp_path)  # no ./data, and no system-wide copy either
    monkeypatch.setitem(data_module.SYSTEM_DATA_DIRS, "fashion-mnist", tmp_path / "nowhere")
    args = ["study", "--dataset", "fashion-mnist", "--out", str(tmp_path / "run"), "--quiet"]
    assert bnorm_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bnorm study: error: ")
    assert str(tmp_path / "nowhere") in err and "apt-get install dataset-fashion-mnist" in err


def test_unknown_option_exits_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    # Unknown options are rejected by the top-level `bnorm` parser (argparse's usage + error).
    with pytest.raises(SystemExit) as exit_:
        bnorm_main(["study", "--bogus"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in err and "Traceback" not in err


# ------------------------------------------------------------ Ctrl-C and --resume


def _interrupt_after_first_run(cmd: list[str], out: Path, env: dict[str, str]) -> tuple:
    """Start the study, wait until its first run is checkpointed as done, send SIGINT.
    Returns (process, stdout, stderr, whether the signal came before the last run ended)."""
    # SIGINT's default disposition, as a terminal gives it (a shell's background job, such
    # as a CI runner may start, inherits it ignored and would never see the Ctrl-C).
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = out / "checkpoints" / "curves" / "bn-seed0.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if first.is_file() and json.loads(first.read_text())["record"]["done"]:
            break
        time.sleep(0.01)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    # Late (not lost) when the last run had already been checkpointed as done.
    last = out / "checkpoints" / "curves" / "bn-seed1.json"
    late = proc.returncode == 0 and last.is_file() and last.stat().st_mtime < sent
    return proc, stdout, stderr, not late


def test_ctrl_c_writes_the_report_and_resume_finishes_identically(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    # On a busy machine the runs after the first may all finish before this process gets
    # to send the signal: then the same study is tried again with longer runs.
    for steps in (600, 2400, 9600):
        config = write_json(
            tmp_path / f"c{steps}.json",
            {
                "experiments": ["curves"],
                "seeds": [0, 1],
                "steps": steps,
                "eval_every": steps // 4,
                "curves": {"probe": False},
            },
        )
        out = tmp_path / f"run{steps}"
        cmd = [sys.executable, "-m", "bnorm", "study", "--config", str(config), "--quiet"]
        proc, stdout, stderr, running = _interrupt_after_first_run(cmd, out, env)
        if running:
            break
    assert running, "the study trained to the end before the signal, even with long runs"
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert "Traceback" not in stderr, stderr
    interrupted = json.loads((out / "metrics.json").read_text())
    assert interrupted["interrupted"] and 2 <= interrupted["runs_finished"] < 4, interrupted[
        "runs_finished"
    ]
    assert "Interrupted" in (out / "report.html").read_text()
    assert stdout.strip().endswith("report.html")

    resumed = subprocess.run(
        [*cmd[:4], "--resume", str(out), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    after = json.loads((out / "metrics.json").read_text())
    assert not after["interrupted"] and after["runs_finished"] == 4

    # Runs finished before Ctrl-C were not trained again.
    done_before = {
        (r["norm"], r["seed"]): r["wall_s"] for r in interrupted["experiments"]["curves"]["runs"]
    }
    for r in after["experiments"]["curves"]["runs"]:
        if (r["norm"], r["seed"]) in done_before:
            assert r["wall_s"] == done_before[(r["norm"], r["seed"])]

    # Uninterrupted runs of the same configuration end with the same metrics.
    resolved = json.loads((out / "config.json").read_text())
    spec = TrainSpec(**resolved["experiments"]["curves"]["spec"])
    data = load_digits()
    for r in after["experiments"]["curves"]["runs"]:
        straight = json.loads(json.dumps(train_run(spec, data, norm=r["norm"], seed=r["seed"])))
        got = {k: v for k, v in r.items() if k not in ("wall_s", "cpu_s", "tag")}
        straight.pop("wall_s")
        straight.pop("cpu_s")
        for record in (got, straight):  # latencies are measurements, not results
            if record.get("inference"):
                record["inference"].pop("latency")
        assert got == straight, (
            r["norm"],
            r["seed"],
            {k for k in got if got[k] != straight.get(k)},
        )


def test_mlp_studies_run_bnorm_eagerly_and_leave_the_environment_as_found(
    tmp_path: Path, monkeypatch
) -> None:
    """Tiny MLPs: compiling the fused kernels would cost more than it saves, so the study
    runs them eagerly (BNORM_NO_COMPILE) for its duration only; convnets keep compiling,
    and a user's own BNORM_NO_COMPILE wins."""
    assert resolve_config({})["runtime"]["compile_kernels"] is False
    resnet = resolve_config({"preset": "resnet-paper", "dataset": "synthetic"})
    assert resnet["runtime"]["compile_kernels"] is True
    monkeypatch.delenv("BNORM_NO_COMPILE", raising=False)
    seen: list[str | None] = []
    import bnorm.study.runner as run_module

    real_load = run_module.load_dataset

    def spy(*args: Any) -> Any:  # called once the runtime settings are applied
        seen.append(os.environ.get("BNORM_NO_COMPILE"))
        return real_load(*args)

    monkeypatch.setattr(run_module, "load_dataset", spy)
    config = write_json(tmp_path / "t.json", {**TINY, "seeds": [0], "experiments": ["curves"]})
    assert (
        bnorm_main(["study", "--config", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    )
    assert seen == ["1"]  # set while the study ran
    assert "BNORM_NO_COMPILE" not in os.environ  # and removed afterwards
