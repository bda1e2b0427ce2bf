"""The study's configuration: defaults, presets, config files and their precedence.

:func:`resolve_config` turns the options given (command line, ``--config`` file) into
the fully resolved configuration that config.json holds. Precedence, lowest first: each
experiment's defaults (:data:`bnorm.study.experiments.EXPERIMENTS`), ``--preset`` and
``--model``, a ``--config`` file (TOML or JSON) — its top-level keys (the long option
names with underscores), then its table per experiment (training settings, and ``lrs``
for a learning-rate sweep) — and last the command-line options. Every value is checked
here; a bad one raises :class:`UsageError` with what was expected and what was got.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .checkpoint import RUNTIME_KEY
from .data import DATASETS
from .experiments import EXPERIMENTS
from .kinds import KINDS, SWEEPS, Experiment
from .models import MODELS, NORM_LAYERS
from .spec import TrainSpec

__all__ = [
    "DEFAULTS",
    "EXECUTORS",
    "PRESETS",
    "UsageError",
    "experiment_objects",
    "load_config_file",
    "load_resume",
    "resolve_config",
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
    "jobs": None,  # None: 1 with the local executor, no limit with ray and slurm
    "executor": "local",
    "address": None,  # a Ray cluster's address (None: a local one)
    "out": None,
}

# Where runs are trained (bnorm.study.executors): worker processes on this machine, Ray
# tasks, or Slurm jobs through submitit (slurm-local: submitit's local executor, the same
# job-array path without a Slurm cluster).
EXECUTORS = ("local", "ray", "slurm", "slurm-local")

# Options that may accompany --resume (they do not change the numbers being computed).
_RUNTIME_OPTIONS = ("device", "threads", "quiet", "jobs", "executor", "address")
_SPEC_OPTIONS = ("steps", "epochs", "batch_size", "lr", "eval_every")
# Keys of an experiment's config table that are kind options, not TrainSpec fields.
_OPTION_KEYS = ("lrs", "batch_sizes", "norms", "seeds")


class UsageError(ValueError):
    """A bad option, configuration file or output directory (exit code 2)."""


# ---------------------------------------------------------------------------- checks


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


def _spec_value(key: str, value: Any) -> Any:
    """A :class:`TrainSpec` setting given in a config file or on the command line (a
    number written as text is read as one), checked by :meth:`TrainSpec.check_setting`:
    the spec's rules are the only copy."""
    real = isinstance(getattr(TrainSpec(), key), float)  # lr: 1 means 1.0
    number = value
    if isinstance(value, str):
        for parse in (float,) if real else (int, float):
            try:
                number = parse(value.strip())
                break
            except ValueError:
                continue
    try:
        TrainSpec.check_setting(key, number)
    except ValueError:
        try:  # the message shows the value as it was given
            TrainSpec.check_setting(key, value)
        except ValueError as err:
            raise UsageError(str(err)) from None
        raise
    return float(number) if real else number


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
        raise UsageError(
            f"expected an available device (got {value!r}, which this machine does not have)"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(
            f"expected a CUDA device index below {torch.cuda.device_count()} (got {value!r})"
        )
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
        raise UsageError(
            f"{path}: expected a .toml or .json config file (got {path.suffix or 'no suffix'!r})"
        )
    if not isinstance(loaded, dict):
        raise UsageError(
            f"{path}: expected a table/object at the top level (got {type(loaded).__name__})"
        )
    return loaded


def _validate_executor(out: dict[str, Any]) -> None:
    """--jobs, --executor and --address, checked in place."""
    if out.get("jobs") is not None:
        out["jobs"] = _positive_int("jobs", out["jobs"])
    if out.get("executor") is not None and out["executor"] not in EXECUTORS:
        raise UsageError(
            f"expected executor in {', '.join(EXECUTORS)} (got {out['executor']!r})"
        )
    if out.get("address") is not None:
        out["address"] = str(out["address"])
        if out.get("executor") != "ray":
            raise UsageError(
                f"expected --address only with --executor ray (got --address {out['address']} "
                f"with --executor {out.get('executor') or 'local'})"
            )


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
    for key in _SPEC_OPTIONS:
        if out.get(key) is not None:
            out[key] = _spec_value(key, out[key])
    try:
        TrainSpec.check_length(out.get("steps"), out.get("epochs"), required=False)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if out.get("threads") is not None:
        out["threads"] = _positive_int("threads", out["threads"])
    _validate_executor(out)
    if "device" in out:
        out["device"] = _device(out["device"])
    if "name" in out and not re.fullmatch(r"[A-Za-z0-9._-]+", str(out["name"])):
        raise UsageError(
            f"expected a name of letters, digits, '.', '_' or '-' (got {out['name']!r})"
        )
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
                f"experiment {exp.name!r} has no {sweep.label} grid "
                f"({sweep.option} is for {kind} experiments)"
            )
        value = table[sweep.option]
        if not isinstance(value, list) or not value:
            raise UsageError(
                f"expected {sweep.option} for {exp.name!r} to be a non-empty list of numbers "
                f"(got {value!r})"
            )
        options[sweep.option] = [sweep.cast(_spec_value(sweep.field, v)) for v in value]
    if "norms" in table:
        options["norms"] = _choices(f"norms of {exp.name}", table["norms"], list(NORM_LAYERS))
    return options


def _read_config_file(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A ``--config`` file split into its top-level options and its experiment tables."""
    file_options: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    loaded = load_config_file(path)
    exp_names = {e.name for e in EXPERIMENTS}
    for key, value in loaded.items():
        if key in exp_names:
            if not isinstance(value, dict):
                raise UsageError(f"{path}: expected [{key}] to be a table of training settings")
            tables[key] = value
        elif key in DEFAULTS:
            file_options[key] = value
        else:
            raise UsageError(
                f"{path}: unknown key {key!r} (expected an option name such as "
                f"'dataset', 'seeds', or an experiment name such as 'curves')"
            )
    return file_options, tables


def _seeds_for(
    exp: Experiment, table: dict[str, Any], top: dict[str, Any], given: bool
) -> list[int]:
    """The experiment's seeds. Precedence, lowest first: the study's default seeds, the
    experiment's own (``exp.seeds``), seeds given for the whole study (``given``: in a
    config file or on the command line), ``seeds`` in its config table."""
    if "seeds" in table:
        return _seeds(table["seeds"])
    if exp.seeds is not None and not given:
        return list(exp.seeds)
    return list(top["seeds"])


def _experiment_entry(
    exp: Experiment, spec: TrainSpec | None, options: dict[str, Any], default_norms: list[str]
) -> dict[str, Any]:
    """One experiment's entry of config.json (its kind, texts, norms, spec, options; the
    caller adds its seeds)."""
    norms = list(options.get("norms", default_norms))
    for norm in norms:
        if norm not in NORM_LAYERS:
            raise UsageError(
                f"experiment {exp.name!r} needs the norm {norm!r}, which is not available"
            )
    return {
        "kind": exp.kind,
        "title": exp.title,
        "about": exp.about,
        "norms": norms,
        "spec": asdict(spec) if spec is not None else {},
        "options": {k: v for k, v in options.items() if k != "norms"},
    }


def resolve_config(cli: dict[str, Any]) -> dict[str, Any]:
    """The fully resolved configuration from the CLI options given (``cli``) and the
    config file they name; what config.json holds."""
    file_options: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    if cli.get("config"):
        file_options, tables = _read_config_file(cli["config"])
    file_top = _validate_top(file_options)
    cli_top = _validate_top({k: v for k, v in cli.items() if k in DEFAULTS})
    top = {**DEFAULTS, **file_top, **cli_top}
    if top["preset"] and top["model"] is None:
        top["model"] = PRESETS[top["preset"]]["model"]
    experiments: dict[str, Any] = {}
    for exp in EXPERIMENTS:
        if exp.name not in top["experiments"]:
            continue
        source = exp.options.get("source")
        if source is not None and source not in top["experiments"]:
            raise UsageError(
                f"experiment {exp.name!r} compares the runs of {source!r}: add it to --experiments"
            )
        table = tables.get(exp.name, {})
        spec = _spec_for(exp, top, file_top, cli_top, table) if KINDS[exp.kind].trains else None
        entry = _experiment_entry(exp, spec, _options_for(exp, table), top["norm"])
        seeds_given = "seeds" in file_top or "seeds" in cli_top
        entry["seeds"] = _seeds_for(exp, table, top, seeds_given)
        if exp.kind == "shift" and source is not None:
            # The networks are measured at the end of the source experiment's runs.
            experiments[source]["spec"]["shift_check"] = True
        experiments[exp.name] = entry
    small = all(e["spec"].get("model", "mlp") in ("mlp", "deep-mlp") for e in experiments.values())
    threads = top["threads"]
    if threads is None:
        threads = 1 if small else torch.get_num_threads()
    return {
        "name": top["name"],
        "dataset": top["dataset"],
        "data_dir": top["data_dir"],
        "model": top["model"],
        "preset": top["preset"],
        "norm": top["norm"],
        "seeds": top["seeds"],
        "experiments": experiments,
        # MLPs on small batches: compiling bnorm's fused kernels would cost more seconds
        # than the whole study's BN layers take eagerly.
        RUNTIME_KEY: {
            "device": top["device"],
            "threads": threads,
            "compile_kernels": not small,
            "jobs": top["jobs"],
            "executor": top["executor"],
            "address": top["address"],
        },
        "out": top["out"],
    }


def load_resume(cli: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    out = Path(cli["resume"])
    extra = [k for k in cli if k not in (*_RUNTIME_OPTIONS, "resume")]
    if extra:
        flag = "--" + extra[0].replace("_", "-")
        raise UsageError(
            f"--resume takes the configuration from {out / 'config.json'}; "
            f"drop {flag} (or start a new run)"
        )
    path = out / "config.json"
    if not path.is_file():
        raise UsageError(
            f"expected {path} to resume from (no such file: is {out} a run directory?)"
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from None
    required = ("dataset", "data_dir", "seeds", "experiments", "norm")
    if not isinstance(config, dict) or any(k not in config for k in required):
        raise UsageError(
            f"{path}: not a bnorm study configuration (expected the keys {', '.join(required)})"
        )
    runtime = dict(config.get(RUNTIME_KEY, {}))
    if "device" in cli:
        runtime["device"] = _device(cli["device"])
    if "threads" in cli:
        runtime["threads"] = _positive_int("threads", cli["threads"])
    # Where the runs are trained may change; without these options, as before.
    given: dict[str, Any] = {k: cli[k] for k in ("jobs", "executor", "address") if k in cli}
    placement: dict[str, Any] = {"jobs": None, "executor": "local", "address": None}
    if given:
        if "executor" in given and "address" not in given:
            given["address"] = None
        placement.update({k: runtime.get(k, v) for k, v in placement.items()})
        placement.update(given)
        _validate_executor(placement)
        runtime.update(placement)
    else:
        for key, value in placement.items():
            runtime.setdefault(key, value)
    config[RUNTIME_KEY] = runtime
    return config, out


def experiment_objects(
    config: dict[str, Any],
) -> list[tuple[Experiment, TrainSpec | None, list[str]]]:
    """(Experiment, spec, norms) for each experiment of a resolved configuration."""
    out = []
    try:
        for name, entry in config["experiments"].items():
            if entry["kind"] not in KINDS:
                raise UsageError(f"config.json: unknown experiment kind {entry['kind']!r}")
            exp = Experiment(
                name,
                entry["kind"],
                entry["title"],
                entry["spec"],
                entry["options"],
                about=entry.get("about", ""),
                seeds=entry.get("seeds"),  # absent in config.json before per-experiment seeds
            )
            spec = TrainSpec(**entry["spec"]) if KINDS[entry["kind"]].trains else None
            if spec is not None:
                spec.validate()
            out.append((exp, spec, list(entry["norms"])))
    except (TypeError, KeyError, AttributeError, ValueError) as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"config.json: not a valid bnorm study configuration ({err})") from None
    return out
