"""Running the study: schedule the runs, train them (checkpointed, resumable, on every rank
under ``torchrun``), then write metrics.json and the report.

:func:`prepare_study` resolves the configuration (or reads it back for ``--resume``),
schedules every run, sets up the executor that will train them (:mod:`.executors`) and
creates the run directory; :func:`train_all` trains them (an interrupt stops it and keeps
what finished); :func:`write_results` writes metrics.json and the report from the
records, in schedule order. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import RUNTIME_KEY, Checkpointer, atomic_write, to_json
from .config import UsageError, experiment_objects, load_resume, resolve_config
from .data import Dataset, load_dataset
from .executors import Executor, RunTask, make_executor, worker_threads
from .kinds import KINDS, SWEEPS, Experiment, ScheduledRun, SummaryInputs
from .loop import process_rank
from .progress import Progress
from .report import write_report
from .spec import TrainSpec

__all__ = [
    "Study",
    "build_metrics",
    "prepare_study",
    "runtime_restored",
    "train_all",
    "write_results",
]

# Set while a study of MLPs runs: bnorm's kernels then run eagerly (see resolve_config).
_NO_COMPILE = "BNORM_NO_COMPILE"


@dataclass
class Study:
    """A prepared study: its configuration, run directory, data and scheduled runs, and
    (once trained) the records of the runs that finished."""

    config: dict[str, Any]
    out: Path
    data: Dataset
    experiments: list[tuple[Experiment, TrainSpec | None, list[str]]]
    schedule: list[tuple[Experiment, list[ScheduledRun]]]
    rank: int
    resuming: bool
    started: str  # local time, ISO 8601
    wall_start: float  # time.perf_counter() when the study started
    executor: Executor
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    interrupted: bool = False
    cpu_start: float = field(default_factory=time.process_time)  # this process's CPU time

    @property
    def planned(self) -> int:
        return sum(len(runs) for _, runs in self.schedule)


@contextlib.contextmanager
def runtime_restored() -> Iterator[None]:
    """Restore torch's thread count and ``BNORM_NO_COMPILE`` as they were, however the
    study ends (it sets both from its runtime settings)."""
    threads_before = torch.get_num_threads()
    no_compile_before = os.environ.get(_NO_COMPILE)
    try:
        yield
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


def _new_out_dir(config: dict[str, Any]) -> Path:
    if config["out"]:
        out = Path(config["out"])
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(
                f"expected --out to be a new or empty directory (got {out}, which has files; "
                f"use --resume {out} to continue it)"
            )
        return out
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{stamp}-{config['name']}"
    k = 2
    while out.exists():
        out = Path("runs") / f"{stamp}-{config['name']}-{k}"
        k += 1
    return out


def _schedule_runs(
    experiments: list[tuple[Experiment, TrainSpec | None, list[str]]],
    seeds: list[int],
    n_train: int,
) -> list[tuple[Experiment, list[ScheduledRun]]]:
    """Every experiment's runs, each checked to have at least one step per epoch."""
    schedule = []
    for exp, spec, norms in experiments:
        own = exp.seeds if exp.seeds is not None else seeds
        planned = KINDS[exp.kind].schedule(exp, spec, norms, own) if spec is not None else []
        for run in planned:
            if run.spec.steps_per_epoch(n_train) < 1:
                raise UsageError(
                    f"experiment {exp.name!r}: expected a batch size ≤ the {n_train} "
                    f"training images (got {run.spec.batch_size})"
                )
        schedule.append((exp, planned))
    return schedule


def prepare_study(cli: dict[str, Any]) -> Study:
    """Everything before training, from the command-line options given (``cli``): join
    the process group, resolve (or, with ``resume``, read back) the configuration, apply
    its runtime settings, load the data, schedule the runs, and (rank 0) create the run
    directory with config.json. Raises UsageError or DataError."""
    wall_start = time.perf_counter()
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    rank, _ = _init_distributed(str(cli.get("device") or "cpu"))
    resuming = "resume" in cli
    if resuming:
        config, out = load_resume(cli)
    else:
        config = resolve_config(cli)
        # Only rank 0 owns (creates, checks, writes) the run directory.
        out = _new_out_dir(config) if rank == 0 else Path(os.devnull)
    experiments = experiment_objects(config)
    runtime = config[RUNTIME_KEY]
    torch.set_num_threads(int(runtime["threads"]))
    if not runtime.get("compile_kernels", True):
        os.environ.setdefault(_NO_COMPILE, "1")  # the user's own setting wins
    data = load_dataset(config["dataset"], config["data_dir"])
    schedule = _schedule_runs(experiments, config["seeds"], int(data.train_labels.shape[0]))
    executor = make_executor(runtime, out, data, process_rank()[1])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if not resuming and rank == 0:
        atomic_write(out / "config.json", to_json(config).encode())
    return Study(config, out, data, experiments, schedule, rank, resuming, started, wall_start,
                 executor, runs={exp.name: [] for exp, _ in schedule})  # fmt: skip


def _run_label(exp: Experiment, run: ScheduledRun) -> str:
    """The progress display's name of a run, e.g. ``lr_tolerance · bn · seed 0 · lr 0.1``."""
    label = f"{exp.name} · {run.norm} · seed {run.seed}"
    if exp.kind in SWEEPS:
        label += f" · {SWEEPS[exp.kind].field} {getattr(run.spec, SWEEPS[exp.kind].field):g}"
    if run.spec.accumulate_stats:
        label += " · once per step"
    return label


def _tasks(study: Study) -> list[RunTask]:
    """Every planned run as a task, in schedule order."""
    runtime = study.config[RUNTIME_KEY]
    threads = worker_threads(runtime)
    tasks: list[RunTask] = []
    for exp, planned in study.schedule:
        for run in planned:
            tasks.append(
                RunTask(
                    index=len(tasks), experiment=exp.name, label=_run_label(exp, run),
                    tag=run.tag, norm=run.norm, seed=run.seed, spec=run.spec,
                    out=str(study.out), config=study.config, threads=threads,
                    # Every rank resumes from the same files; rank 0 alone writes them.
                    checkpoint=study.rank == 0 or study.resuming,
                )
            )
    return tasks


def _checkpointer(study: Study, task: RunTask) -> Checkpointer:
    return Checkpointer(study.out / "checkpoints" / task.experiment, task.tag, study.config)


def train_all(study: Study, quiet: bool) -> None:
    """Train every planned run with the study's executor (one run after another, in
    worker processes, Ray tasks or Slurm jobs: :mod:`bnorm.study.executors`) and put
    the records in ``study.runs`` in schedule order, whatever order they finished in.
    Runs whose checkpoint says they finished are not trained again. An interrupt
    (Ctrl-C) stops training and sets ``study.interrupted``; what finished is kept.
    Raises CheckpointError for a damaged or foreign checkpoint, RunFailed for a run
    that raised (the runs that finished stay checkpointed)."""
    n_train = int(study.data.train_labels.shape[0])
    tasks = _tasks(study)
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for task in tasks:
        done = _checkpointer(study, task).finished_record() if study.resuming else None
        if done is not None:
            done["tag"] = task.tag
            records[task.index] = done
        else:
            todo.append(task)
    totals = {t.index: t.spec.total_steps(n_train) for t in tasks}
    executor = study.executor
    if executor.parallel:  # longest first: the last runs to start are short ones
        todo.sort(key=lambda t: -totals[t.index])
    try:
        with Progress(sum(totals.values()), quiet) as progress:
            progress.finish_run(-1, sum(totals[i] for i in records))
            for index, record in executor.run(
                todo,
                on_start=lambda i: progress.start_run(i, tasks[i].label, totals[i]),
                on_step=progress.step,
            ):
                records[index] = record
                progress.finish_run(index, totals[index])
    except KeyboardInterrupt:
        study.interrupted = True
    finally:
        executor.close()
    if study.interrupted:
        # A signal may have come after a run's last checkpoint said it finished (in this
        # process or in a worker) and before its record got here.
        for task in todo:
            if task.index not in records and task.checkpoint:
                done = _checkpointer(study, task).finished_record()
                if done is not None:
                    done["tag"] = task.tag
                    records[task.index] = done
    for task in tasks:
        if task.index in records:
            study.runs[task.experiment].append(records[task.index])


def _cpu_s(study: Study) -> float:
    """This invocation's CPU seconds: this process's, and its runs' in other processes."""
    return time.process_time() - study.cpu_start + study.executor.worker_cpu_s


def write_results(study: Study) -> tuple[dict[str, Any], list[Path]]:
    """Write metrics.json and the report (rank 0); return the metrics and the report's
    files."""
    metrics = build_metrics(study, time.perf_counter() - study.wall_start)
    atomic_write(study.out / "metrics.json", to_json(metrics).encode())
    paths = write_report(study.out, study.config, metrics)
    metrics["wall_s"] = time.perf_counter() - study.wall_start
    metrics["cpu_s"] = _cpu_s(study)
    atomic_write(study.out / "metrics.json", to_json(metrics).encode())
    return metrics, paths


def build_metrics(study: Study, wall_s: float) -> dict[str, Any]:
    """metrics.json: every curve and every summary number (schema in docs/study.md)."""
    import bnorm

    config = study.config
    given = SummaryInputs(study.runs, 1.0 / study.data.num_classes, study.data.test_labels.tolist())
    exps: dict[str, Any] = {}
    summary_rows = []
    for exp, spec, norms in study.experiments:
        runs = study.runs.get(exp.name, [])
        summ = KINDS[exp.kind].summarize(exp, runs, norms, given)
        exps[exp.name] = {
            "kind": exp.kind,
            "title": exp.title,
            "about": exp.about,
            "norms": norms,
            "seeds": exp.seeds if exp.seeds is not None else config["seeds"],
            "spec": asdict(spec) if spec is not None else {},
            "options": exp.options,
            "runs": runs,
            "summary": summ,
        }
        summary_rows.append({"experiment": exp.name, "title": exp.title, **summ["headline"]})
    all_norms: list[str] = []
    for _, _, norms in study.experiments:
        all_norms += [n for n in norms if n not in all_norms]
    # Columns some experiment reports beside its norms (accumulation's "bn+accumulate").
    for row in summary_rows:
        all_norms += [n for n in row.get("values", {}) if n not in all_norms]
    finished = sum(len(r) for r in study.runs.values())
    return {
        "schema_version": 1,
        "bnorm_version": bnorm.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "started": study.started,
        "wall_s": wall_s,
        "cpu_s": _cpu_s(study),
        "interrupted": study.interrupted,
        "runs_planned": study.planned,
        "runs_finished": finished,
        "out_dir": str(study.out),
        "device": config[RUNTIME_KEY]["device"],
        "threads": config[RUNTIME_KEY]["threads"],
        "cpu_count": os.cpu_count(),
        "dataset": study.data.describe(),
        "norms": all_norms,
        "seeds": config["seeds"],
        "summary": summary_rows,
        "experiments": exps,
    }
