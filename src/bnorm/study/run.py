"""Run the classic batch-normalization experiments with and without BN and write a report.

``bnorm study`` (no arguments) trains, on scikit-learn's bundled digits and for three
seeds, every experiment of :data:`EXPERIMENTS` once per normalization (``--norm``), from
the same initial weights and on the same batches, and writes a run directory with
``config.json``, ``metrics.json``, ``report.html``, ``report.md`` and the figures.

Configuration, lowest precedence first: each experiment's defaults (below), ``--preset``
and ``--model``, a ``--config`` file (TOML or JSON) — its top-level keys (the long
option names with underscores), then its table per experiment (training settings, and
``lrs`` for a learning-rate sweep) — and last the command-line options.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import DATASETS, DataError, Dataset, load_dataset
from .experiments import KINDS, SWEEPS, Experiment, PlannedRun, SummaryInputs
from .models import MODELS, NORM_LAYERS
from .train import (
    RUNTIME_KEY,
    Checkpointer,
    CheckpointError,
    TrainSpec,
    atomic_write,
    process_rank,
    to_json,
    train_run,
)

__all__ = ["EXPERIMENTS", "PRESETS", "UsageError", "add_arguments", "main", "resolve_config"]

_PAPER_MLP = {"model": "mlp", "hidden": [100, 100, 100], "init": "normal", "batch_size": 60}

# The study, one experiment per line. An entry names a kind (bnorm.study.experiments.KINDS),
# overrides TrainSpec's defaults and gives the kind's options.
EXPERIMENTS: list[Experiment] = [
    Experiment("curves", "curves", "The BN paper's MNIST experiment, adapted", {**_PAPER_MLP, "activation": "sigmoid", "init_std": 0.1, "steps": 1500, "lr": 0.5, "eval_every": 20, "keep_predictions": True, "inference_check": True}, follows_model=True, about="Three fully connected hidden layers of 100 sigmoid units, small Gaussian initial weights, batches of 60, plain SGD — the network of the paper's Fig. 1, on the chosen dataset."),
    Experiment("lr_tolerance", "lr_sweep", "Learning-rate tolerance", {**_PAPER_MLP, "activation": "relu", "init": "kaiming", "steps": 300, "eval_every": 300, "probe": False}, {"lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 4.0]}, follows_model=True, about="The same 3×100 network with ReLU units and He initialization, trained for a fixed number of steps at each learning rate of a grid: the paper's claim that BN allows higher learning rates."),
    Experiment("depth", "curves", "Depth: 10 hidden sigmoid layers", {"model": "deep-mlp", "hidden": [64] * 10, "activation": "sigmoid", "init": "xavier", "batch_size": 60, "steps": 600, "lr": 0.2, "eval_every": 20, "probe": False, "grad_norms": True}, about="Ten hidden layers of 64 sigmoid units with Glorot (Xavier) normal initialization: the depth at which vanishing gradients bite. The gradient norm of each layer's weights is measured at initialization and after training."),
    Experiment("small_batch", "batch_sweep", "Small batches: BN, Batch Renorm, ghost BN", {**_PAPER_MLP, "activation": "relu", "init": "kaiming", "steps": None, "epochs": 1, "lr": 0.05, "eval_every": 10**6, "probe": False}, {"batch_sizes": [2, 4, 8, 32], "norms": ["none", "bn", "renorm", "ghost"]}, about="The 3×100 ReLU network trained for the same number of epochs at each batch size: BN's statistics get noisy as the batch shrinks, and the running statistics used at test time drift from the batch statistics used in training. Batch Renorm corrects the training-time normalization towards the running statistics (the paper's schedule scaled to these short runs); ghost BN normalizes groups of 8 samples within larger batches."),
    Experiment(
        "accumulation", "accumulation",
        "Gradient accumulation: running statistics per micro-batch or per step",
        {**_PAPER_MLP, "activation": "relu", "init": "kaiming", "batch_size": 4,
         "micro_batches": 8, "steps": None, "epochs": 3, "lr": 0.1, "eval_every": 22,
         "probe": False, "stats_check": True},
        {"norms": ["bn"]},
        about="The 3×100 ReLU network trained with gradient accumulation: each SGD step "
        "sums the gradients of 8 micro-batches of 4 samples, each normalized with its own "
        "statistics. Left alone, every BN layer updates its running statistics after each "
        "micro-batch (8 updates per step, each from 4 samples: the momentum then means "
        "1 − 0.9⁸ ≈ 0.57 per step); inside bnorm.accumulate it updates them once per step, "
        "from the exact merged moments of the step's 32 samples. Both arms start from the "
        "same weights and see the same micro-batches, and their gradients are identical "
        "(normalization is per micro-batch either way): only the running statistics "
        "differ. Measured: test accuracy in eval mode (running statistics), and how far "
        "the running statistics are from the exact statistics of each layer's inputs over "
        "the training set (bnorm.diagnose's drift, the KL divergence of the two Gaussians, "
        "worst channel, in mode='train')."),
    Experiment("disagreement", "disagreement", "Prediction disagreement", {}, {"source": "curves"}, about="On the test set, how often the final networks of the first experiment with and without BN (same seed) predict different classes, and which of them is right when they do."),
    Experiment("shift", "shift", "Distribution shift: corrupted test sets and test-time adaptation", {}, {"source": "curves"}, about="The final networks of the first experiment on corrupted copies of the test set (Gaussian noise σ=0.3, contrast ×0.3, brightness +0.4, blur σ=1 px, inverted; pixel values in [0, 1], seeded): accuracy as trained, and for BN networks after bnorm.adapt — 'bn' (running statistics := the exact statistics of the corrupted test set), 'prior' (Schneider et al. 2020: each test batch of 32 normalized with the source statistics weighted as 16 samples mixed with the batch's own) and 'tent' (Wang et al. 2021: one SGD step, lr 0.01, momentum 0.9, on the prediction entropy per test batch of 32, updating only BN's γ and β). Inverting the images flips the sign of the input, which no statistic can undo: adaptation is expected to fail there."),
]

# Recipes selectable with --preset; they apply to the experiments that follow --model.
PRESETS: dict[str, dict[str, Any]] = {
    # He et al. 2016 (CIFAR ResNets): SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided
    # by 10 at 32k and 48k of 64k iterations (≈164 epochs), batch 128, pad-4 crop + flip.
    "resnet-paper": {
        "model": "resnet20", "init": "kaiming", "hidden": None, "activation": None,
        "batch_size": 128, "epochs": 164, "steps": None, "lr": 0.1, "momentum": 0.9,
        "weight_decay": 1e-4, "lr_milestones": [0.5, 0.75], "lr_gamma": 0.1,
        "augment": True, "standardize": True, "eval_every": 390,
    },
}  # fmt: skip

DEFAULTS: dict[str, Any] = {
    "name": "study",
    "dataset": "digits",
    "data_dir": None,  # None: data/ (and for fashion-mnist /usr/share/datasets/fashion-mnist)
    "model": None,
    "preset": None,
    "norm": ["none", "bn"],
    "experiments": [e.name for e in EXPERIMENTS],
    "seeds": [0, 1, 2],
    "steps": None,
    "epochs": None,
    "batch_size": None,
    "lr": None,
    "eval_every": None,
    "device": "cpu",
    "threads": None,  # None: 1 when every network is an MLP, else torch's default
    "out": None,
}

# Options that may accompany --resume (they do not change the numbers being computed).
_RUNTIME_OPTIONS = ("device", "threads", "quiet")
_SPEC_OPTIONS = ("steps", "epochs", "batch_size", "lr", "eval_every")
# Keys of an experiment's config table that are kind options, not TrainSpec fields.
_OPTION_KEYS = ("lrs", "batch_sizes", "norms")


class UsageError(ValueError):
    """A bad option, configuration file or output directory (exit code 2)."""


# ----------------------------------------------------------------------------- CLI


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
                        help="where the dataset files are: MNIST/Fashion-MNIST IDX files (.gz or not), "
                        "CIFAR-10/100 binary files (default: data; for fashion-mnist then "
                        "/usr/share/datasets/fashion-mnist, "
                        "from `apt-get install dataset-fashion-mnist`)")
    parser.add_argument("--model", default=S, metavar="NAME",
                        help=f"{' | '.join(MODELS)}: the network of the experiments 'curves' and "
                        "'lr_tolerance' (default: each experiment's own MLP; see below)")
    parser.add_argument("--preset", default=S, metavar="NAME",
                        help=f"{' | '.join(PRESETS)}: a published training recipe for those experiments "
                        "(resnet-paper: He et al. 2016 — SGD momentum 0.9, weight decay 1e-4, lr 0.1 ÷10 at "
                        "50%% and 75%%, batch 128, 164 epochs, crop + flip; model resnet20 unless --model)")
    parser.add_argument("--norm", default=S, metavar="LIST",
                        help=f"comma-separated normalizations to compare: {', '.join(NORM_LAYERS)} "
                        "(default: none,bn)")
    parser.add_argument("--experiments", default=S, metavar="LIST",
                        help=f"comma-separated experiments to run: {names} (default: all)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", default=S, metavar="N",
                        help="training steps per run, for every experiment (default: each experiment's own)")
    length.add_argument("--epochs", default=S, metavar="N",
                        help="training epochs per run, instead of --steps")
    parser.add_argument("--batch-size", default=S, metavar="N",
                        help="mini-batch size for every experiment (default: 60)")
    parser.add_argument("--lr", default=S, metavar="LR",
                        help="SGD learning rate for every experiment but the learning-rate sweep "
                        "(default: each experiment's own)")
    parser.add_argument("--eval-every", default=S, metavar="N",
                        help="evaluate on the test set every N steps (default: each experiment's own)")
    parser.add_argument("--seeds", default=S, metavar="LIST",
                        help="comma-separated seeds, or a range A-B (default: 0,1,2)")
    parser.add_argument("--device", default=S, metavar="DEV",
                        help="torch device to train on, e.g. cpu, cuda, cuda:1, mps (default: cpu)")
    parser.add_argument("--threads", default=S, metavar="N",
                        help="torch CPU threads (default: 1 when every network is an MLP — fastest for "
                        "such small networks — else torch's default, one per core)")
    parser.add_argument("--config", default=S, metavar="FILE",
                        help="TOML or JSON file with any of these options (keys with underscores) and "
                        "per-experiment tables")
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
        "",
        "exit codes: 0 done, 2 bad option / config / data file, 130 interrupted (report written).",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ configuration


def _as_list(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise UsageError(f"expected {key} to be a comma-separated string or a list (got {value!r})")
    if not items or any(not v for v in items):
        raise UsageError(f"expected a non-empty comma-separated list for {key} (got {value!r})")
    if len(set(items)) != len(items):
        raise UsageError(f"expected no repeated entries in {key} (got {value!r})")
    return items


def _choices(key: str, value: Any, allowed: Sequence[str]) -> list[str]:
    items = _as_list(key, value)
    for item in items:
        if item not in allowed:
            raise UsageError(f"expected {key} from {', '.join(allowed)} (got {item!r})")
    return items


def _positive_int(key: str, value: Any) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number is None or number < 1:
        raise UsageError(f"expected {key} to be a positive integer (got {value!r})")
    return number


def _positive_float(key: str, value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise UsageError(f"expected {key} to be a positive number (got {value!r})")
    return number


def _seeds(value: Any) -> list[int]:
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", value):
        a, b = (int(v) for v in value.split("-"))
        if b < a:
            raise UsageError(f"expected a seed range A-B with A ≤ B (got {value!r})")
        return list(range(a, b + 1))
    seeds = []
    for item in _as_list("seeds", value):
        if not item.isdigit():
            raise UsageError(f"expected seeds to be non-negative integers (got {item!r})")
        seeds.append(int(item))
    return seeds


def _device(value: Any) -> str:
    try:
        dev = torch.device(str(value))
    except (RuntimeError, ValueError):
        raise UsageError(f"expected a torch device such as cpu or cuda (got {value!r})") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
    }.get(dev.type, False)
    if not available:
        raise UsageError(f"expected an available device (got {value!r}, which this machine does not have)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"expected a CUDA device index below {torch.cuda.device_count()} (got {value!r})")
    return str(dev)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON (``.json``) config file as a dict."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise UsageError(f"{path}: TOML config files need Python 3.11+; use JSON") from None
        try:
            loaded: Any = tomllib.loads(text.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: not valid TOML ({err})") from None
    elif path.suffix == ".json":
        try:
            loaded = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: not valid JSON ({err})") from None
    else:
        raise UsageError(f"{path}: expected a .toml or .json config file (got {path.suffix or 'no suffix'!r})")
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a table/object at the top level (got {type(loaded).__name__})")
    return loaded


def _validate_top(options: dict[str, Any]) -> dict[str, Any]:
    """Check and normalize the top-level options (from the config file or the CLI)."""
    out = dict(options)
    if out.get("dataset") is not None and out["dataset"] not in DATASETS:
        raise UsageError(f"expected dataset in {', '.join(DATASETS)} (got {out['dataset']!r})")
    if out.get("model") is not None and out["model"] not in MODELS:
        raise UsageError(f"expected model in {', '.join(MODELS)} (got {out['model']!r})")
    if out.get("preset") is not None and out["preset"] not in PRESETS:
        raise UsageError(f"expected preset in {', '.join(PRESETS)} (got {out['preset']!r})")
    if "norm" in out:
        out["norm"] = _choices("norm", out["norm"], list(NORM_LAYERS))
    if "experiments" in out:
        value = out["experiments"]
        names = [e.name for e in EXPERIMENTS]
        out["experiments"] = names if value == "all" else _choices("experiments", value, names)
    if "seeds" in out:
        out["seeds"] = _seeds(out["seeds"])
    for key in ("steps", "epochs", "batch_size", "eval_every", "threads"):
        if out.get(key) is not None:
            out[key] = _positive_int(key.replace("_", "-"), out[key])
    if out.get("lr") is not None:
        out["lr"] = _positive_float("lr", out["lr"])
    if "device" in out:
        out["device"] = _device(out["device"])
    if "name" in out and not re.fullmatch(r"[A-Za-z0-9._-]+", str(out["name"])):
        raise UsageError(f"expected a name of letters, digits, '.', '_' or '-' (got {out['name']!r})")
    for key in ("data_dir", "out"):
        if out.get(key) is not None:
            out[key] = str(out[key])
    return out


def _apply_length(values: dict[str, Any], key: str, value: Any) -> None:
    """Set a TrainSpec entry; steps and epochs exclude each other."""
    values[key] = value
    if key == "steps" and value is not None:
        values["epochs"] = None
    if key == "epochs" and value is not None:
        values["steps"] = None


def _spec_for(
    exp: Experiment,
    top: dict[str, Any],
    file_top: dict[str, Any],
    cli_top: dict[str, Any],
    table: dict[str, Any],
) -> TrainSpec:
    """The experiment's TrainSpec. Precedence, lowest first: the experiment's defaults,
    --model/--preset (``top``), the config file's global options (``file_top``), its
    table for this experiment, the command line's global options (``cli_top``)."""
    values: dict[str, Any] = asdict(TrainSpec())
    values.update(exp.spec)
    if exp.follows_model:
        if top.get("preset"):
            values.update(PRESETS[top["preset"]])
        model = top.get("model")
        if model is not None and model != values["model"]:
            values["model"] = model
            if model not in ("mlp", "deep-mlp"):
                values.update(init="kaiming", hidden=None, activation=None)
    for key in _SPEC_OPTIONS:
        if file_top.get(key) is not None:
            _apply_length(values, key, file_top[key])
    fields = set(TrainSpec.field_names())
    for key, value in table.items():
        if key in _OPTION_KEYS:
            continue
        if key not in fields:
            raise UsageError(
                f"unknown setting {key!r} for experiment {exp.name!r} (expected one of "
                f"{', '.join(sorted(fields | set(_OPTION_KEYS)))})"
            )
        _apply_length(values, key, value)
    for key in _SPEC_OPTIONS:
        if cli_top.get(key) is not None:
            _apply_length(values, key, cli_top[key])
    spec = TrainSpec(**values)
    try:
        spec.validate()
    except ValueError as err:
        raise UsageError(f"experiment {exp.name!r}: {err}") from None
    return spec


def _options_for(exp: Experiment, table: dict[str, Any]) -> dict[str, Any]:
    """The experiment's kind options, with a sweep's grid (``lrs``, ``batch_sizes``) and
    ``norms`` from its config table."""
    options = dict(exp.options)
    for kind, sweep in SWEEPS.items():
        if sweep.option not in table:
            continue
        if exp.kind != kind:
            raise UsageError(
                f"experiment {exp.name!r} has no {sweep.label} grid ({sweep.option} is for {kind} experiments)"
            )
        value = table[sweep.option]
        if not isinstance(value, list) or not value:
            raise UsageError(
                f"expected {sweep.option} for {exp.name!r} to be a non-empty list of numbers (got {value!r})"
            )
        check = _positive_float if sweep.cast is float else _positive_int
        options[sweep.option] = [check(sweep.option, v) for v in value]
    if "norms" in table:
        options["norms"] = _choices(f"norms of {exp.name}", table["norms"], list(NORM_LAYERS))
    return options


def resolve_config(cli: dict[str, Any]) -> dict[str, Any]:
    """The fully resolved configuration from the CLI options given (``cli``) and the
    config file they name; what config.json holds."""
    file_options: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    if cli.get("config"):
        loaded = load_config_file(cli["config"])
        exp_names = {e.name for e in EXPERIMENTS}
        for key, value in loaded.items():
            if key in exp_names:
                if not isinstance(value, dict):
                    raise UsageError(f"{cli['config']}: expected [{key}] to be a table of training settings")
                tables[key] = value
            elif key in DEFAULTS:
                file_options[key] = value
            else:
                raise UsageError(
                    f"{cli['config']}: unknown key {key!r} (expected an option name such as "
                    f"'dataset', 'seeds', or an experiment name such as 'curves')"
                )
    file_top = _validate_top(file_options)
    cli_top = _validate_top({k: v for k, v in cli.items() if k in DEFAULTS})
    for given in (file_top, cli_top):
        if given.get("steps") is not None and given.get("epochs") is not None:
            raise UsageError("expected steps or epochs, not both")
    top = {**DEFAULTS, **file_top, **cli_top}
    if top["preset"] and top["model"] is None:
        top["model"] = PRESETS[top["preset"]]["model"]
    selected = [e for e in EXPERIMENTS if e.name in top["experiments"]]
    experiments: dict[str, Any] = {}
    for exp in selected:
        kind = KINDS[exp.kind]
        source = exp.options.get("source")
        if source is not None and source not in top["experiments"]:
            raise UsageError(f"experiment {exp.name!r} compares the runs of {source!r}: add it to --experiments")
        table = tables.get(exp.name, {})
        spec = _spec_for(exp, top, file_top, cli_top, table) if kind.trains else None
        options = _options_for(exp, table)
        norms = list(options.get("norms", top["norm"]))
        for norm in norms:
            if norm not in NORM_LAYERS:
                raise UsageError(f"experiment {exp.name!r} needs the norm {norm!r}, which is not available")
        if exp.kind == "shift" and source is not None:
            # The networks are measured at the end of the source experiment's runs.
            experiments[source]["spec"]["shift_check"] = True
        experiments[exp.name] = {
            "kind": exp.kind,
            "title": exp.title,
            "about": exp.about,
            "norms": norms,
            "spec": asdict(spec) if spec is not None else {},
            "options": {k: v for k, v in options.items() if k != "norms"},
        }
    small = all(e["spec"].get("model", "mlp") in ("mlp", "deep-mlp") for e in experiments.values())
    threads = top["threads"]
    if threads is None:
        threads = 1 if small else torch.get_num_threads()
    config = {
        "name": top["name"],
        "dataset": top["dataset"],
        "data_dir": top["data_dir"],
        "model": top["model"],
        "preset": top["preset"],
        "norm": top["norm"],
        "seeds": top["seeds"],
        "experiments": experiments,
        # MLPs on small batches: compiling bnorm's fused kernels would cost more seconds
        # than the whole study's BN layers take eagerly (README "Fused kernels").
        RUNTIME_KEY: {"device": top["device"], "threads": threads, "compile_kernels": not small},
        "out": top["out"],
    }
    return config


# -------------------------------------------------------------------------- progress


class _Progress:
    """Rich progress display (a bar for the whole study and one for the current run),
    or nothing with ``quiet``."""

    def __init__(self, total_steps: int, quiet: bool) -> None:
        self.quiet = quiet
        self.progress: Any = None
        if quiet:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.overall = self.progress.add_task("study", total=total_steps, status="")
        self.current = self.progress.add_task("", total=1, status="", visible=False)
        self._last = 0

    def __enter__(self) -> _Progress:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start_run(self, description: str, total: int) -> None:
        if self.progress is None:
            return
        self._last = 0
        self.progress.reset(self.current, total=total, description=description, status="", visible=True)

    def step(self, step: int, total: int, accuracy: float | None) -> None:
        if self.progress is None or (step % 10 and step != total):
            return
        status = f"test acc {100 * accuracy:.1f}%" if accuracy is not None else ""
        self.progress.update(self.current, completed=step, status=status)
        self.progress.advance(self.overall, step - self._last)
        self._last = step

    def finish_run(self, total: int) -> None:
        if self.progress is None:
            return
        self.progress.advance(self.overall, total - self._last)
        self._last = total


# ---------------------------------------------------------------------------- main


@dataclass
class _StudyState:
    config: dict[str, Any]
    out: Path
    data: Dataset
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    planned: int = 0
    interrupted: bool = False


def _new_out_dir(config: dict[str, Any]) -> Path:
    if config["out"]:
        out = Path(config["out"])
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"expected --out to be a new or empty directory (got {out}, which has files; "
                             f"use --resume {out} to continue it)")
        return out
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{stamp}-{config['name']}"
    k = 2
    while out.exists():
        out = Path("runs") / f"{stamp}-{config['name']}-{k}"
        k += 1
    return out


def _load_resume(cli: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    out = Path(cli["resume"])
    extra = [k for k in cli if k not in (*_RUNTIME_OPTIONS, "resume")]
    if extra:
        flag = "--" + extra[0].replace("_", "-")
        raise UsageError(f"--resume takes the configuration from {out / 'config.json'}; drop {flag} (or start a new run)")
    path = out / "config.json"
    if not path.is_file():
        raise UsageError(f"expected {path} to resume from (no such file: is {out} a run directory?)")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from None
    required = ("dataset", "data_dir", "seeds", "experiments", "norm")
    if not isinstance(config, dict) or any(k not in config for k in required):
        raise UsageError(f"{path}: not a bnorm study configuration (expected the keys {', '.join(required)})")
    runtime = dict(config.get(RUNTIME_KEY, {}))
    if "device" in cli:
        runtime["device"] = _device(cli["device"])
    if "threads" in cli:
        runtime["threads"] = _positive_int("threads", cli["threads"])
    config[RUNTIME_KEY] = runtime
    return config, out


def _experiment_objects(config: dict[str, Any]) -> list[tuple[Experiment, TrainSpec | None, list[str]]]:
    """(Experiment, spec, norms) for each experiment of a resolved configuration."""
    out = []
    try:
        for name, entry in config["experiments"].items():
            if entry["kind"] not in KINDS:
                raise UsageError(f"config.json: unknown experiment kind {entry['kind']!r}")
            exp = Experiment(name, entry["kind"], entry["title"], entry["spec"], entry["options"], about=entry.get("about", ""))
            spec = TrainSpec(**entry["spec"]) if KINDS[entry["kind"]].trains else None
            if spec is not None:
                spec.validate()
            out.append((exp, spec, list(entry["norms"])))
    except (TypeError, KeyError, AttributeError, ValueError) as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"config.json: not a valid bnorm study configuration ({err})") from None
    return out


_NO_COMPILE = "BNORM_NO_COMPILE"


def main(args: argparse.Namespace) -> int:
    """``bnorm study``: 0 when done, 2 for a bad option/configuration/data file (one line on
    stderr), 130 when interrupted (after writing the report for what finished)."""
    cli = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    threads_before = torch.get_num_threads()
    no_compile_before = os.environ.get(_NO_COMPILE)
    try:
        return _run_study(cli)
    except KeyboardInterrupt:  # before training started, or while writing the report
        print("bnorm study: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads_before)
        if no_compile_before is None:
            os.environ.pop(_NO_COMPILE, None)


def _init_distributed(device: str) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE,
    RANK, MASTER_ADDR, MASTER_PORT): gloo on CPU, NCCL on CUDA. (0, 1) when not launched
    so. Rank 0 alone writes the run directory and prints."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return process_rank()


def _run_study(cli: dict[str, Any]) -> int:
    quiet = bool(cli.get("quiet", False))
    wall_start = time.perf_counter()
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        rank, _ = _init_distributed(str(cli.get("device") or "cpu"))
        quiet = quiet or rank != 0
        if "resume" in cli:
            config, out = _load_resume(cli)
        else:
            config = resolve_config(cli)
            # Only rank 0 owns (creates, checks, writes) the run directory.
            out = _new_out_dir(config) if rank == 0 else Path(os.devnull)
        experiments = _experiment_objects(config)
        runtime = config[RUNTIME_KEY]
        torch.set_num_threads(int(runtime["threads"]))
        if not runtime.get("compile_kernels", True):
            os.environ.setdefault(_NO_COMPILE, "1")  # the user's own setting wins
        data = load_dataset(config["dataset"], config["data_dir"])
        plans: list[tuple[Experiment, list[PlannedRun]]] = []
        for exp, spec, norms in experiments:
            planned = KINDS[exp.kind].plan(exp, spec, norms, config["seeds"]) if spec is not None else []
            for run in planned:
                if run.spec.steps_per_epoch(int(data.train_labels.shape[0])) < 1:
                    raise UsageError(
                        f"experiment {exp.name!r}: expected a batch size ≤ the {int(data.train_labels.shape[0])} "
                        f"training images (got {run.spec.batch_size})"
                    )
            plans.append((exp, planned))
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        if "resume" not in cli and rank == 0:
            atomic_write(out / "config.json", to_json(config).encode())
    except (UsageError, DataError) as err:
        print(f"bnorm study: error: {err}", file=sys.stderr)
        return 2

    state = _StudyState(config, out, data, {exp.name: [] for exp, _ in plans})
    n_train = int(data.train_labels.shape[0])
    state.planned = sum(len(p) for _, p in plans)
    total_steps = sum(r.spec.total_steps(n_train) for _, p in plans for r in p)
    try:
        with _Progress(total_steps, quiet) as progress:
            for exp, planned in plans:
                for run in planned:
                    total = run.spec.total_steps(n_train)
                    progress.start_run(f"{exp.name} · {run.norm} · seed {run.seed}" + (
                        f" · {SWEEPS[exp.kind].field} {getattr(run.spec, SWEEPS[exp.kind].field):g}"
                        if exp.kind in SWEEPS else "")
                        + (" · once per step" if run.spec.accumulate_stats else ""), total)
                    # Every rank resumes from the same files; rank 0 alone writes them.
                    checkpointer = (
                        Checkpointer(out / "checkpoints" / exp.name, run.tag, config)
                        if rank == 0 or "resume" in cli else None
                    )
                    record = train_run(
                        run.spec, data, norm=run.norm, seed=run.seed, device=runtime["device"],
                        checkpointer=checkpointer, on_progress=progress.step,
                    )  # fmt: skip
                    record["tag"] = run.tag
                    state.runs[exp.name].append(record)
                    progress.finish_run(total)
    except KeyboardInterrupt:
        state.interrupted = True
    except CheckpointError as err:
        print(f"bnorm study: error: {err}", file=sys.stderr)
        return 2

    if rank != 0:
        return 130 if state.interrupted else 0
    metrics = build_metrics(state, experiments, started, time.perf_counter() - wall_start)
    atomic_write(out / "metrics.json", to_json(metrics).encode())
    from .report import write_report

    paths = write_report(out, config, metrics)
    metrics["wall_s"] = time.perf_counter() - wall_start
    atomic_write(out / "metrics.json", to_json(metrics).encode())
    if quiet:
        print(out / "report.html")
    else:
        print_summary(metrics, out, paths)
    return 130 if state.interrupted else 0


def build_metrics(
    state: _StudyState,
    experiments: list[tuple[Experiment, TrainSpec | None, list[str]]],
    started: str,
    wall_s: float,
) -> dict[str, Any]:
    """metrics.json: every curve and every summary number (schema in the README)."""
    import bnorm

    config = state.config
    given = SummaryInputs(state.runs, 1.0 / state.data.num_classes, state.data.test_labels.tolist())
    exps: dict[str, Any] = {}
    summary_rows = []
    for exp, spec, norms in experiments:
        runs = state.runs.get(exp.name, [])
        summ = KINDS[exp.kind].summarize(exp, runs, norms, given)
        exps[exp.name] = {
            "kind": exp.kind,
            "title": exp.title,
            "about": exp.about,
            "norms": norms,
            "spec": asdict(spec) if spec is not None else {},
            "options": exp.options,
            "runs": runs,
            "summary": summ,
        }
        summary_rows.append({"experiment": exp.name, "title": exp.title, **summ["headline"]})
    all_norms: list[str] = []
    for _, _, norms in experiments:
        all_norms += [n for n in norms if n not in all_norms]
    # Columns some experiment reports beside its norms (accumulation's "bn+accumulate").
    for row in summary_rows:
        all_norms += [n for n in row.get("values", {}) if n not in all_norms]
    finished = sum(len(r) for r in state.runs.values())
    return {
        "schema_version": 1,
        "bnorm_version": bnorm.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "started": started,
        "wall_s": wall_s,
        "interrupted": state.interrupted,
        "runs_planned": state.planned,
        "runs_finished": finished,
        "out_dir": str(state.out),
        "device": config[RUNTIME_KEY]["device"],
        "threads": config[RUNTIME_KEY]["threads"],
        "cpu_count": os.cpu_count(),
        "dataset": state.data.describe(),
        "norms": all_norms,
        "seeds": config["seeds"],
        "summary": summary_rows,
        "experiments": exps,
    }


def print_summary(metrics: dict[str, Any], out: Path, paths: list[Path]) -> None:
    """The one-screen summary: the summary table and where the report is."""
    from rich.console import Console
    from rich.table import Table

    from .report import summary_rows

    console = Console()
    if not console.is_terminal:  # piped or logged (e.g. `make study | tee`): room for the table
        console = Console(width=160)
    headers, rows = summary_rows(metrics, compact=True)
    table = Table(title="bnorm study: accuracy is mean ± std over seeds; speed-up as in the BN paper")
    for h in headers:
        table.add_column(h, no_wrap=h in ("Experiment",))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for row in metrics["summary"]:
        if row.get("note"):
            console.print(f"  [dim]{row['experiment']}:[/] {row['note']}", highlight=False)
    if metrics["interrupted"]:
        console.print(
            f"[bold yellow]Interrupted[/]: {metrics['runs_finished']} of {metrics['runs_planned']} runs "
            f"finished; the report covers them. Continue with: bnorm study --resume {out}"
        )
    console.print(
        f"Wall time {metrics['wall_s']:.1f} s · {metrics['runs_finished']} runs · {len(paths) - 2} figures",
        highlight=False,
    )
    console.print(f"Report: [bold]{out / 'report.html'}[/]  (also report.md, metrics.json, config.json)")
