"""Run the classic batch-normalization experiments with and without BN and write a report.

``bnorm study`` (no arguments) trains, on scikit-learn's bundled digits and for seeds
0, 1, 2 (an experiment may have its own: ``small_batch`` runs 0–4), every experiment of
:data:`~bnorm.study.experiments.EXPERIMENTS` once per normalization (``--norm``, or the
experiment's own list), from the same initial weights and on the same batches, and
writes a run directory with ``config.json``, ``metrics.json``, ``report.html``,
``report.md`` and the figures. The options and their precedence:
:mod:`bnorm.study.config`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .checkpoint import CheckpointError
from .config import EXECUTORS, PRESETS, UsageError
from .data import DATASETS, DataError
from .executors import RunFailed
from .experiments import EXPERIMENTS
from .models import MODELS, NORM_LAYERS
from .runner import prepare_study, runtime_restored, train_all, write_results
from .summary import print_summary

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bnorm study`` options. Defaults are stated in the help text; an option not
    given keeps the value of the config file or the built-in default."""
    S = argparse.SUPPRESS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    names = ", ".join(e.name for e in EXPERIMENTS)
    parser.epilog = _epilog()
    parser.add_argument("--dataset", default=S, metavar="NAME",
                        help=f"{' | '.join(DATASETS)} (default: digits, bundled with scikit-learn)")
    parser.add_argument("--data-dir", default=S, metavar="DIR",
                        help="where the dataset files are: MNIST/Fashion-MNIST IDX files "
                        "(.gz or not), "
                        "CIFAR-10/100 binary files (default: data; for fashion-mnist then "
                        "/usr/share/datasets/fashion-mnist, "
                        "from `apt-get install dataset-fashion-mnist`)")
    parser.add_argument("--model", default=S, metavar="NAME",
                        help=f"{' | '.join(MODELS)}: the network of the experiments 'curves' and "
                        "'lr_tolerance' (default: each experiment's own MLP; see below)")
    parser.add_argument("--preset", default=S, metavar="NAME",
                        help=f"{' | '.join(PRESETS)}: a published training recipe for those "
                        "experiments (resnet-paper: He et al. 2016 — SGD momentum 0.9, weight "
                        "decay 1e-4, lr 0.1 ÷10 at 50%% and 75%%, batch 128, 164 epochs, "
                        "crop + flip; model resnet20 unless --model)")
    parser.add_argument("--norm", default=S, metavar="LIST",
                        help=f"comma-separated normalizations to compare: {', '.join(NORM_LAYERS)} "
                        "(default: none,bn)")
    parser.add_argument("--experiments", default=S, metavar="LIST",
                        help=f"comma-separated experiments to run: {names} (default: all)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", default=S, metavar="N",
                        help="training steps per run, for every experiment "
                        "(default: each experiment's own)")
    length.add_argument("--epochs", default=S, metavar="N",
                        help="training epochs per run, instead of --steps")
    parser.add_argument("--batch-size", default=S, metavar="N",
                        help="mini-batch size for every experiment (default: 60)")
    parser.add_argument("--lr", default=S, metavar="LR",
                        help="SGD learning rate for every experiment but the learning-rate sweep "
                        "(default: each experiment's own)")
    parser.add_argument("--eval-every", default=S, metavar="N",
                        help="evaluate on the test set every N steps "
                        "(default: each experiment's own)")
    parser.add_argument("--seeds", default=S, metavar="LIST",
                        help="comma-separated seeds, or a range A-B, for every experiment "
                        "(default: 0,1,2, and an experiment's own: small_batch 0-4)")
    parser.add_argument("--device", default=S, metavar="DEV",
                        help="torch device to train on, e.g. cpu, cuda, cuda:1, mps (default: cpu)")
    parser.add_argument("--threads", default=S, metavar="N",
                        help="torch CPU threads (default: 1 when every network is an MLP — "
                        "fastest for such small networks — else torch's default, one per core)")
    parser.add_argument("--jobs", default=S, metavar="N",
                        help="train up to N runs at once (default: 1 with the local executor, "
                        "no limit with ray and slurm); locally, N worker processes share "
                        "--threads (at least 1 each); every run's numbers stay the same")
    parser.add_argument("--executor", default=S, metavar="NAME",
                        help=f"{' | '.join(EXECUTORS)}: where runs are trained — this machine, "
                        "Ray tasks (pip install 'bnorm[ray]'), Slurm jobs through submitit "
                        "(pip install 'bnorm[slurm]'; slurm-local: submitit's local executor). "
                        "Cluster executors need the output directory on a shared filesystem "
                        "(default: local)")
    parser.add_argument("--address", default=S, metavar="ADDR",
                        help="with --executor ray: the Ray cluster to join, e.g. "
                        "ray://head:10001 or auto (default: start a local one)")
    parser.add_argument("--config", default=S, metavar="FILE",
                        help="TOML or JSON file with any of these options (keys with underscores) "
                        "and per-experiment tables")
    parser.add_argument("--name", default=S, metavar="NAME",
                        help="name of the run, used in the output directory (default: study)")
    parser.add_argument("--out", default=S, metavar="DIR",
                        help="output directory, new or empty (default: runs/<timestamp>-<name>)")
    parser.add_argument("--resume", default=S, metavar="DIR",
                        help="continue the interrupted run in DIR (its config.json) from its last "
                        "checkpoints; ends with the same metrics as an uninterrupted run")
    parser.add_argument("--quiet", action="store_true", default=S,
                        help="no progress display and no summary; print only the report's path")

    def one_line_error(message: str) -> None:  # argparse's own errors: one line, exit 2
        print(f"bnorm study: error: {message} (see bnorm study --help)", file=sys.stderr)
        sys.exit(2)

    setattr(parser, "error", one_line_error)  # noqa: B010


def _epilog() -> str:
    lines = ["experiments (run in this order):"]
    for e in EXPERIMENTS:
        lines.append(f"  {e.name:14s} {e.title}")
    lines += [
        "",
        "outputs (in the run directory): config.json, metrics.json, report.html (self-contained),",
        "report.md and the figures (*.png), checkpoints/ (one per run, rewritten at the end of",
        "an epoch, at most once a second).",
        "",
        "config file example (study.toml):",
        '  dataset = "mnist"',
        '  data_dir = "data"',
        "  seeds = [0, 1, 2]",
        '  experiments = ["curves", "disagreement"]',
        "  [curves]             # TrainSpec fields for one experiment",
        "  steps = 50000",
        "  eval_every = 500",
        "  [small_batch]        # also norms, seeds, and a sweep's grid",
        "  seeds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]",
        "",
        "exit codes: 0 done, 1 a run failed (named; no report), 2 bad option / config / data",
        "file, 130 interrupted (report written).",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``bnorm study``: 0 when done, 1 when a run raised (named on stderr; the others that
    finished are checkpointed), 2 for a bad option/configuration/data file (one line on
    stderr), 130 when interrupted (after writing the report for what finished)."""
    cli = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    try:
        with runtime_restored():
            return _run_study(cli)
    except KeyboardInterrupt:  # before training started, or while writing the report
        print("bnorm study: interrupted", file=sys.stderr)
        return 130


def _run_study(cli: dict[str, Any]) -> int:
    try:
        study = prepare_study(cli)
    except (UsageError, DataError) as err:
        print(f"bnorm study: error: {err}", file=sys.stderr)
        return 2
    quiet = bool(cli.get("quiet", False)) or study.rank != 0
    try:
        train_all(study, quiet)
    except CheckpointError as err:
        print(f"bnorm study: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(
            f"bnorm study: error: {err} (the runs that finished are checkpointed: "
            f"--resume {study.out} trains the rest)",
            file=sys.stderr,
        )
        return 1
    status = 130 if study.interrupted else 0
    if study.rank != 0:
        return status
    metrics, paths = write_results(study)
    if quiet:
        print(study.out / "report.html")
    else:
        print_summary(metrics, study.out, paths)
    return status
