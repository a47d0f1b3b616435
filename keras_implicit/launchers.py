"""Where a sweep's runs run: one small interface and three engines (local processes, Ray, SLURM through submitit).

:func:`keras_implicit.sweep.run_jobs` keeps the sweep's logic (which runs to skip, continue or start; the progress
lines; ``on_done``); a :class:`Launcher` only starts one run, says whether it has ended and with which exit code, and
stops it on Ctrl-C. The run directory is the unit of work and of recovery on every engine: a run started again, by a
rerun of the same sweep or by the engine's own retry, resumes from its last checkpoint (its ``.lock`` is a
``flock``, released by the system when a process or a machine dies). The exit codes are
:func:`keras_implicit.training.train_with_exit_code`'s; :data:`EXIT_ENGINE_LOST` where the engine lost the run for
good (retries spent), with the engine's message in the run's log.

- :class:`LocalLauncher` (the default): one process per run on this machine (``job.command``).
- :class:`RayLauncher`: each run a Ray task (``num_cpus``/``num_gpus`` a run, a fresh worker process each) calling
  ``train_with_exit_code`` in the worker; ``max_retries`` restarts a run whose worker process or node died. The
  run directories must be on a path every node reads and writes (a shared filesystem, as on any cluster).
- :class:`SlurmLauncher`: each run a job of ``submitit.AutoExecutor`` (submitted as an array when several start
  at once); on preemption or the time limit submitit requeues it (up to ``max_requeues``) and it resumes from its
  checkpoint. ``cluster="local"`` runs the same jobs as local processes (what the tests use where no SLURM runs).

Ray and submitit are imported only by their launchers (``pip install ray`` or ``submitit``); nothing else of the
library touches them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["Launcher", "LocalLauncher", "RayLauncher", "SlurmLauncher", "ENGINES", "make_launcher",
           "EXIT_ENGINE_LOST", "train_into"]

ENGINES = ("local", "ray", "slurm")
# A run the engine lost for good (a Ray task whose retries are spent, a SLURM job cancelled or failed outside the
# run): not one of train_with_exit_code's codes.
EXIT_ENGINE_LOST = 5


def train_into(settings: dict, run_dir: str, log_path: str, backend: Optional[str] = None,
               engine: str = "local") -> int:
    """Trains one run in this process, its output appended to ``log_path``: what a Ray task or a SLURM job runs.

    Args:
        settings: the run's :class:`~keras_implicit.config.RunConfig` as ``config.flags()``.
        run_dir: its run directory (resumed if it holds a checkpoint).
        log_path: the run's log (standard output and error, the C++ libraries' lines too).
        backend: ``KERAS_BACKEND`` for this process (before Keras is imported), or None to leave it.
        engine: what runs it, for the log's first line (``[ray] process 1234 on host trains ...``).

    Returns:
        :func:`keras_implicit.training.train_with_exit_code`'s exit code.
    """
    if backend:
        os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"[{engine}] process {os.getpid()} on {socket.gethostname()} trains {run_dir}\n")
        log.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            from keras_implicit.config import RunConfig
            from keras_implicit.training import train_with_exit_code  # deferred: the worker only (Keras)

            return train_with_exit_code(RunConfig(**settings), run_dir, progress=False, stdout=sys.stdout,
                                        stderr=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class Launcher:
    """Starts runs somewhere and follows them. ``start`` returns a handle that the other methods take."""

    name = "launcher"

    def start(self, job, log_path: Path) -> Any:
        """Starts ``job`` (a :class:`keras_implicit.sweep.Job`), its output appended to ``log_path``."""
        raise NotImplementedError

    def start_many(self, jobs: Sequence, log_paths: Sequence[Path]) -> list:
        """Starts several at once (SLURM submits them as one array); by default one :meth:`start` each."""
        return [self.start(job, log_path) for job, log_path in zip(jobs, log_paths)]

    def poll(self, handle) -> Optional[int]:
        """The run's exit code once it has ended, else None."""
        raise NotImplementedError

    def interrupt(self, handle) -> None:
        """Asks the run to stop at its next batch, keeping its last checkpoint (Ctrl-C)."""
        raise NotImplementedError

    def describe(self, handle) -> str:
        """Where it runs, for the sweep's lines (``pid 1234``, ``ray task ...``, ``slurm job 12``)."""
        return ""

    def close(self) -> None:
        """Lets go of the engine (after the sweep)."""


class LocalLauncher(Launcher):
    """One process per run on this machine: ``job.command`` (``python -m keras_implicit.sweep ...`` or run.py)."""

    name = "local"

    def start(self, job, log_path: Path):
        with open(log_path, "a") as log:  # the child keeps its own descriptor
            return subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT)

    def poll(self, handle) -> Optional[int]:
        return handle.poll()

    def interrupt(self, handle) -> None:
        if handle.poll() is None:
            handle.send_signal(signal.SIGINT)

    def describe(self, handle) -> str:
        return f"pid {handle.pid}"


def _settings(job) -> dict:
    if job.config is None:
        raise ValueError(f"{job.name}: this engine trains a RunConfig (keras_implicit.sweep.plan's jobs), and this "
                         "job has none")
    return job.config.flags()


def _lost(log_path: Path, engine: str, error: BaseException) -> int:
    with open(log_path, "a") as log:
        log.write(f"[{engine}] the run was lost: {type(error).__name__}: {error}\n")
    return EXIT_ENGINE_LOST


class RayLauncher(Launcher):
    """Each run a Ray task calling :func:`train_into` in a fresh worker process (``max_calls=1``).

    Args:
        address: the cluster (``"auto"``, ``"127.0.0.1:6379"``, ``"ray://..."``); None starts a local one.
        num_cpus, num_gpus: what each run asks of a node.
        max_retries: how many times Ray restarts a run whose worker process or node died (the run resumes from
            its last checkpoint); a run that ends with an exit code, even a failing one, is never retried.
        backend: ``KERAS_BACKEND`` of the runs (default: this process's, else Keras' default).
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, num_cpus: float = 1, num_gpus: float = 0,
                 max_retries: int = 3, backend: Optional[str] = None):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.address, self.num_cpus, self.num_gpus, self.max_retries = address, num_cpus, num_gpus, max_retries
        self.backend = backend or os.environ.get("KERAS_BACKEND")
        self._remote = None

    def _ray(self):
        import ray  # deferred: this engine only

        if self._remote is None:
            if not ray.is_initialized():
                ray.init(address=self.address, log_to_driver=False, include_dashboard=False)
            self._remote = ray.remote(max_calls=1)(train_into)
        return ray

    def start(self, job, log_path: Path):
        settings = _settings(job)
        self._ray()
        ref = self._remote.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries,
                                   retry_exceptions=False, name=job.name).remote(
            settings, os.path.abspath(job.run_dir), os.path.abspath(log_path), self.backend, "ray")
        return (ref, Path(log_path))

    def poll(self, handle) -> Optional[int]:
        ray = self._ray()
        ref, log_path = handle
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return None
        try:
            return int(ray.get(ref))
        except (ray.exceptions.RayError, KeyboardInterrupt) as error:
            if isinstance(error, ray.exceptions.TaskCancelledError):
                return 130  # Ctrl-C: cancelled before it started, or stopped by it
            return _lost(log_path, "ray", error)

    def interrupt(self, handle) -> None:
        self._ray().cancel(handle[0])  # a KeyboardInterrupt in the task: the run stops at its next batch

    def describe(self, handle) -> str:
        return f"ray task {handle[0].task_id().hex()[:12]}"

    def close(self) -> None:
        import ray  # deferred: this engine only

        if self._remote is not None and ray.is_initialized():
            ray.shutdown()
        self._remote = None


class _RequeuedRun:
    """A SLURM job's callable: :func:`train_into`, and on preemption or timeout (submitit's ``checkpoint``) the same
    call again, which resumes from the run directory's last checkpoint."""

    def __init__(self, settings: dict, run_dir: str, log_path: str, backend: Optional[str]):
        self.arguments = (settings, run_dir, log_path, backend)

    def __call__(self) -> int:
        return train_into(*self.arguments, engine="slurm")

    def checkpoint(self):
        import submitit  # deferred: this engine only

        return submitit.helpers.DelayedSubmission(self)


class SlurmLauncher(Launcher):
    """Each run a job of ``submitit.AutoExecutor``, in arrays when several start at once.

    Args:
        folder: where submitit keeps its job files and logs (the runs' own logs go to the sweep's ``logs/``).
        cluster: None (SLURM if ``sbatch`` is on the PATH, else local processes), ``"slurm"``, ``"local"``.
        partition, time_minutes, cpus_per_task, gpus_per_node: the jobs' SLURM resources.
        max_requeues: how many times a preempted or timed-out job is requeued (submitit's ``max_num_timeout``).
        backend: ``KERAS_BACKEND`` of the runs (default: this process's).
    """

    name = "slurm"

    def __init__(self, folder, cluster: Optional[str] = None, partition: Optional[str] = None,
                 time_minutes: int = 60, cpus_per_task: int = 1, gpus_per_node: int = 0, max_requeues: int = 3,
                 backend: Optional[str] = None):
        import submitit  # deferred: this engine only

        if cluster not in (None, "slurm", "local"):
            raise ValueError(f"cluster must be None, 'slurm' or 'local', got {cluster!r}")
        self.executor = submitit.AutoExecutor(folder=os.fspath(folder), cluster=cluster,
                                              slurm_max_num_timeout=max_requeues)
        parameters = dict(timeout_min=int(time_minutes), cpus_per_task=int(cpus_per_task), nodes=1,
                          tasks_per_node=1)
        if gpus_per_node:
            parameters["gpus_per_node"] = int(gpus_per_node)
        if partition and self.executor.cluster == "slurm":
            parameters["slurm_partition"] = partition
        if self.executor.cluster == "slurm":
            parameters["slurm_additional_parameters"] = {"requeue": True}
        self.executor.update_parameters(**parameters)
        self.backend = backend or os.environ.get("KERAS_BACKEND")

    def _callable(self, job, log_path: Path):
        return _RequeuedRun(_settings(job), os.path.abspath(job.run_dir), os.path.abspath(log_path), self.backend)

    def start(self, job, log_path: Path):
        return (self.executor.submit(self._callable(job, log_path)), Path(log_path))

    def start_many(self, jobs: Sequence, log_paths: Sequence[Path]) -> list:
        callables = [self._callable(job, log_path) for job, log_path in zip(jobs, log_paths)]
        submitted = []
        with self.executor.batch():  # one array
            for function in callables:
                submitted.append(self.executor.submit(function))
        return list(zip(submitted, (Path(p) for p in log_paths)))

    def poll(self, handle) -> Optional[int]:
        job, log_path = handle
        if not job.done():
            return None
        try:
            return int(job.result())
        except Exception as error:  # submitit raises its own FailedJobState / UncompletedJobError, and the job's
            return _lost(log_path, "slurm", error)

    def interrupt(self, handle) -> None:
        handle[0].cancel(check=False)

    def describe(self, handle) -> str:
        return f"{self.executor.cluster} job {handle[0].job_id}"


def make_launcher(engine: str, runs_dir, **options) -> Launcher:
    """The launcher of an engine name (:data:`ENGINES`); ``options`` are its constructor's (SLURM's ``folder``
    defaults to ``runs_dir/submitit``)."""
    if engine == "local":
        if options:
            raise ValueError(f"the local engine takes no options, got {sorted(options)}")
        return LocalLauncher()
    if engine == "ray":
        return RayLauncher(**options)
    if engine == "slurm":
        options.setdefault("folder", Path(runs_dir) / "submitit")
        return SlurmLauncher(**options)
    raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
