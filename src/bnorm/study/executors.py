"""Where the study's runs are trained: in this process, in worker processes on this
machine, as Ray tasks, or as Slurm jobs through submitit.

Every run is independent: :func:`execute` trains one :class:`RunTask` (its seed, norm
and spec; the thread count and kernel setting it must run with) from nothing but the
task and the files of the run directory — it loads the data, sets torch's threads,
resumes from the run's checkpoint and writes it there — and returns the run's record.
Every executor calls that same function, so a run's numbers do not depend on where or
in which order it ran: its initial weights come from ``Generator(seed)`` and its batches
from ``(seed, epoch)``, both set inside the run.

An executor (:func:`make_executor`) takes the tasks and yields ``(index, record)`` as
runs finish, in any order; the runner puts the records back in schedule order. The run
directory is the only state they share: a cluster executor assumes every node sees it
at the same path (a shared filesystem). A run that raises stops the study with
:class:`RunFailed`, naming it; what finished stays checkpointed for ``--resume``.

- ``local`` with ``jobs`` = 1: in this process (and on every rank under ``torchrun``).
- ``local`` with ``jobs`` > 1: a :class:`~concurrent.futures.ProcessPoolExecutor` whose
  workers are forked from a forkserver that has imported torch and run nothing (spawn
  where there is no forkserver; a process that has run torch code must not fork), each
  with ``threads // jobs`` torch threads (at least 1); their steps reach the progress
  display through a queue.
- ``ray``: one ``ray.remote`` task per run with ``num_cpus`` = threads, at most ``jobs``
  at a time (default: no limit); ``ray.init()`` starts a local cluster, ``address``
  joins one. Needs ``bnorm[ray]``.
- ``slurm``: one job per run in a submitit job array (``submitit.AutoExecutor``, at most
  ``jobs`` running at once), its logs under ``<run directory>/submitit``;
  ``slurm-local`` runs the same path with submitit's local executor (no Slurm). Needs
  ``bnorm[slurm]``. Slurm parameters (partition, GPUs, time limit) come from
  ``BNORM_SLURM_*`` environment variables (:func:`slurm_parameters`).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import logging
import multiprocessing as mp
import os
import queue as queue_module
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .checkpoint import Checkpointer
from .config import UsageError
from .data import Dataset, load_dataset
from .spec import TrainSpec
from .train import train_run

__all__ = [
    "EXTRAS",
    "Executor",
    "RunFailed",
    "RunTask",
    "execute",
    "execute_timed",
    "make_executor",
    "slurm_parameters",
    "worker_threads",
]

# The optional extra that provides each cluster executor's engine.
EXTRAS = {
    "ray": ("ray", "ray"),
    "slurm": ("submitit", "slurm"),
    "slurm-local": ("submitit", "slurm"),
}

_NO_COMPILE = "BNORM_NO_COMPILE"

# (index, step, total, last test accuracy) of a run in progress.
StepReport = Callable[[int, int, int, "float | None"], None]


class RunFailed(RuntimeError):
    """A run raised (or its worker died): the study stops, naming the run."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"run {label} failed: {reason}")
        self.label = label


@dataclass(frozen=True)
class RunTask:
    """One run to train and everything it needs: where it is in the schedule
    (``index``), its experiment, progress label and checkpoint tag, norm, seed and spec;
    the run directory and resolved configuration (its checkpoints belong to it); the
    torch threads and kernel setting to run with; and whether to checkpoint (False only
    on ranks other than 0 of a fresh ``torchrun`` study)."""

    index: int
    experiment: str
    label: str
    tag: str
    norm: str
    seed: int
    spec: TrainSpec
    out: str
    config: dict[str, Any]
    threads: int
    checkpoint: bool = True

    @property
    def runtime(self) -> dict[str, Any]:
        return dict(self.config.get("runtime", {}))


_DATA: dict[tuple[str, str | None], Dataset] = {}  # a worker's datasets, loaded once
_STEPS: Any = None  # a pool worker's queue to the progress display


def _dataset(config: dict[str, Any]) -> Dataset:
    key = (str(config["dataset"]), config.get("data_dir"))
    if key not in _DATA:
        _DATA[key] = load_dataset(*key)
    return _DATA[key]


def execute(
    task: RunTask,
    data: Dataset | None = None,
    on_step: StepReport | None = None,
) -> dict[str, Any]:
    """Train one run and return its record (with its ``tag``): set torch's threads and
    the kernel setting, load the data (unless given), resume from the run's checkpoint
    in the run directory and checkpoint there. The same in every executor."""
    torch.set_num_threads(task.threads)
    if not task.runtime.get("compile_kernels", True):
        os.environ.setdefault(_NO_COMPILE, "1")
    if data is None:
        data = _dataset(task.config)
    if on_step is None and _STEPS is not None:
        on_step = _queue_report(_STEPS)
    checkpointer = (
        Checkpointer(Path(task.out) / "checkpoints" / task.experiment, task.tag, task.config)
        if task.checkpoint
        else None
    )
    report = None
    if on_step is not None:
        step_report = on_step

        def report(step: int, total: int, accuracy: float | None) -> None:
            step_report(task.index, step, total, accuracy)

    record = train_run(
        task.spec,
        data,
        norm=task.norm,
        seed=task.seed,
        device=str(task.runtime.get("device", "cpu")),
        checkpointer=checkpointer,
        on_progress=report,
    )
    record["tag"] = task.tag
    return record


def execute_timed(task: RunTask) -> tuple[dict[str, Any], float]:
    """:func:`execute` in a worker, with the CPU seconds the worker spent on it."""
    start = time.process_time()
    record = execute(task)
    return record, time.process_time() - start


def _queue_report(q: Any) -> StepReport:
    def report(index: int, step: int, total: int, accuracy: float | None) -> None:
        if step % 10 == 0 or step == total:  # the display shows every 10th step anyway
            q.put((index, step, total, accuracy))

    return report


def _init_worker(steps: Any) -> None:
    global _STEPS
    _STEPS = steps


class Executor(Protocol):
    """Trains tasks: ``run`` yields ``(index, record)`` as each finishes (any order), and
    ``on_start(index)`` / ``on_step(index, step, total, accuracy)`` where the executor can
    tell (this machine's workers; a Ray task or Slurm job reports only its end). Raises
    :class:`RunFailed` for a run that raised; KeyboardInterrupt stops it and
    cancels what had not started. ``parallel``: whether runs may train at once (then the
    runner hands them over longest first, so that no long run is left to finish alone)."""

    name: str
    parallel: bool
    worker_cpu_s: float  # CPU seconds the runs took in other processes (0 in this one)

    def run(
        self,
        tasks: Sequence[RunTask],
        on_start: Callable[[int], None],
        on_step: StepReport,
    ) -> Iterator[tuple[int, dict[str, Any]]]: ...

    def close(self) -> None: ...


class InProcess:
    """``--jobs 1``: one run after another in this process, on the data already loaded."""

    name = "local"
    parallel = False
    worker_cpu_s = 0.0  # this process's own CPU time counts its runs

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def run(
        self,
        tasks: Sequence[RunTask],
        on_start: Callable[[int], None],
        on_step: StepReport,
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for task in tasks:
            on_start(task.index)
            try:
                record = execute(task, self.data, on_step)
            except (KeyboardInterrupt, RunFailed):
                raise
            except Exception as err:
                raise RunFailed(task.label, f"{type(err).__name__}: {err}") from err
            yield task.index, record

    def close(self) -> None:
        pass


def _worker_context() -> Any:
    """forkserver where there is one (Linux, macOS): a server process imports torch and
    bnorm once, and each worker is forked from it — a fresh process that has run no torch
    code, as with spawn, without importing torch again; spawn elsewhere."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class ProcessPool:
    """``--jobs N``: N spawned worker processes on this machine."""

    name = "local"
    parallel = True
    worker_cpu_s = 0.0

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.context = _worker_context()
        self.steps = self.context.Queue()
        self.pool: cf.ProcessPoolExecutor | None = None

    def run(
        self,
        tasks: Sequence[RunTask],
        on_start: Callable[[int], None],
        on_step: StepReport,
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        self.pool = cf.ProcessPoolExecutor(
            self.jobs, mp_context=self.context, initializer=_init_worker, initargs=(self.steps,)
        )
        by_future = {self.pool.submit(execute_timed, task): task for task in tasks}
        pending = set(by_future)
        started: set[int] = set()
        while pending:
            done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            self._drain(on_start, on_step, started)
            for future in sorted(done, key=lambda f: by_future[f].index):
                task = by_future[future]
                try:
                    record, cpu_s = future.result()
                except cf.process.BrokenProcessPool:
                    running = [
                        by_future[f].label for f in pending | done if f.running() or f is future
                    ]
                    raise RunFailed(
                        task.label,
                        "a worker process died (killed, or out of memory) while running "
                        + ", ".join(dict.fromkeys(running)),
                    ) from None
                except KeyboardInterrupt:
                    raise
                except Exception as err:
                    raise RunFailed(task.label, f"{type(err).__name__}: {err}") from err
                if task.index not in started:
                    on_start(task.index)
                    started.add(task.index)
                self.worker_cpu_s += cpu_s
                yield task.index, record

    def _drain(
        self, on_start: Callable[[int], None], on_step: StepReport, started: set[int]
    ) -> None:
        while True:
            try:
                index, step, total, accuracy = self.steps.get_nowait()
            except queue_module.Empty:
                return
            if index not in started:
                on_start(index)
                started.add(index)
            on_step(index, step, total, accuracy)

    def close(self) -> None:
        if self.pool is not None:
            # Runs not started are dropped; runs in progress stop at Ctrl-C (the workers
            # get it too) or finish, and are checkpointed either way.
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.steps.close()


def _check_reachable(address: str) -> None:
    """Fail fast (UsageError) when nothing listens at a Ray address ``host:port`` or
    ``ray://host:port`` (Ray itself would keep retrying for minutes); ``auto`` is left to
    Ray, which fails at once when no local cluster runs."""
    where = address.split("://", 1)[-1]
    host, sep, port = where.rpartition(":")
    if address == "auto":
        return
    if not sep or not port.isdigit() or not host:
        raise UsageError(
            f"expected --address as host:port, ray://host:port or auto (got {address!r})"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise UsageError(
            f"expected to reach the Ray cluster at {address} (got: {err.strerror or err})"
        ) from None


class RayTasks:
    """``--executor ray``: one Ray task per run."""

    name = "ray"
    parallel = True
    worker_cpu_s = 0.0

    def __init__(self, address: str | None, jobs: int | None, threads: int, device: str) -> None:
        import ray

        self.ray = ray
        self.jobs = jobs
        self.threads = threads
        self.started_ray = not ray.is_initialized()  # then shut down by close()
        if self.started_ray and address is not None:
            _check_reachable(address)
        if self.started_ray:
            try:
                if address is None:
                    ray.init(include_dashboard=False, logging_level=logging.WARNING,
                             log_to_driver=False)  # fmt: skip
                else:
                    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                raise UsageError(f"expected to reach {where} (got: {err})") from None
        gpus = 1 if device.startswith("cuda") else 0  # one GPU per run on a CUDA study
        options = {"num_cpus": threads, "num_gpus": gpus, "max_retries": 0}
        self.remote = ray.remote(execute_timed).options(**options)
        # The runs submitted and not yet collected, by their object ref: what close()
        # cancels. (Cancelling a task that has finished can crash the driver with a failed
        # check inside Ray: ray 2.x, task_manager.cc's CompletePendingTask.)
        self.pending: dict[Any, RunTask] = {}

    def run(
        self,
        tasks: Sequence[RunTask],
        on_start: Callable[[int], None],
        on_step: StepReport,
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        ray = self.ray
        waiting = list(tasks)
        by_ref = self.pending
        limit = self.jobs or len(tasks)
        while waiting or by_ref:
            while waiting and len(by_ref) < limit:
                task = waiting.pop(0)
                by_ref[self.remote.remote(task)] = task
            done, _ = ray.wait(list(by_ref), num_returns=1)
            for ref in done:
                task = by_ref.pop(ref)
                try:
                    record, cpu_s = ray.get(ref)
                except Exception as err:
                    cause = getattr(err, "cause", None) or err
                    raise RunFailed(task.label, f"{type(cause).__name__}: {cause}") from err
                self.worker_cpu_s += cpu_s
                yield task.index, record

    def close(self) -> None:
        pending = list(self.pending)
        self.pending.clear()
        if pending:  # (interrupted, or a run failed) the runs still going, not the finished
            _, running = self.ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in running:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # finished meanwhile
                    pass
        if self.started_ray:
            self.ray.shutdown()


def slurm_parameters() -> dict[str, Any]:
    """submitit's Slurm parameters from ``BNORM_SLURM_<NAME>`` environment variables:
    ``TIMEOUT_MIN``, ``GPUS_PER_NODE``, ``CPUS_PER_TASK`` and ``MEM_GB`` as submitit's
    generic parameters, any other as ``slurm_<name>`` (``BNORM_SLURM_PARTITION=gpu`` →
    ``slurm_partition="gpu"``); digits become integers."""
    params: dict[str, Any] = {}
    prefix = "BNORM_SLURM_"
    for key, value in os.environ.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            name = key[len(prefix) :].lower()
            generic = name in ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb")
            params[name if generic else f"slurm_{name}"] = int(value) if value.isdigit() else value
    return params


class SubmititJobs:
    """``--executor slurm`` / ``slurm-local``: a submitit job array, one job per run."""

    parallel = True
    worker_cpu_s = 0.0

    def __init__(self, folder: Path, cluster: str | None, jobs: int | None, threads: int) -> None:
        import submitit

        self.name = "slurm-local" if cluster == "local" else "slurm"
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster or "slurm")
        params: dict[str, Any] = {"cpus_per_task": threads, "name": "bnorm-study"}
        if self.executor.cluster == "slurm":
            params.update(slurm_parameters())
            if jobs is not None:
                params["slurm_array_parallelism"] = jobs
        self.executor.update_parameters(**params)
        self.jobs: list[Any] = []

    def run(
        self,
        tasks: Sequence[RunTask],
        on_start: Callable[[int], None],
        on_step: StepReport,
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        if not tasks:
            return
        self.jobs = self.executor.map_array(execute_timed, list(tasks))
        waiting = dict(zip(self.jobs, tasks))
        while waiting:
            finished = [job for job in waiting if job.done()]
            if not finished:
                time.sleep(0.5)
                continue
            for job in finished:
                task = waiting.pop(job)
                try:
                    record, cpu_s = job.result()
                except Exception as err:
                    raise RunFailed(
                        task.label, f"{type(err).__name__}: {str(err).strip()[-2000:]}"
                    ) from err
                self.worker_cpu_s += cpu_s
                yield task.index, record

    def close(self) -> None:
        for job in self.jobs:
            if not job.done():
                job.cancel(check=False)
        self.jobs = []


def make_executor(runtime: dict[str, Any], out: Path, data: Dataset, world: int) -> Executor:
    """The executor that the runtime settings name, checked before any run starts: the
    engine's extra is installed, a Ray address is reachable, ``jobs`` is 1 under
    ``torchrun``. Raises UsageError."""
    name = str(runtime.get("executor") or "local")
    jobs: int | None = runtime.get("jobs")
    threads = int(runtime["threads"])
    if world > 1 and (name != "local" or (jobs or 1) > 1):
        raise UsageError(
            f"expected --jobs 1 and the local executor under torchrun (got --executor {name}"
            f" --jobs {jobs or 1}): the ranks of a run train together"
        )
    if name in EXTRAS:
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise UsageError(
                f"expected {module} for --executor {name} (not installed: "
                f"pip install 'bnorm[{extra}]')"
            )
    if name == "slurm" and shutil.which("sbatch") is None:
        raise UsageError(
            "expected a Slurm cluster for --executor slurm (no sbatch command here; "
            "--executor slurm-local runs the same job arrays on this machine)"
        )
    if name == "ray":
        return RayTasks(runtime.get("address"), jobs, threads, str(runtime.get("device", "cpu")))
    if name in ("slurm", "slurm-local"):
        return SubmititJobs(out / "submitit", "local" if name == "slurm-local" else None,
                            jobs, threads)  # fmt: skip
    if (jobs or 1) == 1:
        return InProcess(data)
    return ProcessPool(int(jobs or 1))


def worker_threads(runtime: dict[str, Any]) -> int:
    """Torch threads of each run: the study's threads split between the local workers
    (at least 1); a cluster's task or job gets them all."""
    threads = int(runtime["threads"])
    if str(runtime.get("executor") or "local") == "local":
        return max(1, threads // int(runtime.get("jobs") or 1))
    return threads
