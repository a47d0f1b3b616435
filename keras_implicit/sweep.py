"""Grids of runs in parallel processes, and their summary at equal training loss.

What ``experiments/sweep.py`` does, for a user scheduling runs from Python::

    from keras_implicit import sweep
    from keras_implicit.config import RunConfig

    configs = sweep.grid(RunConfig(epochs=30, target_train_loss=0.3),
                         lr=[0.1, 0.001], batch_size=[256, 16384], seed=[0, 1, 2])
    jobs = sweep.plan(configs, "runs/sweep")          # names, commands, run directories; all validated
    codes = sweep.run_jobs(jobs, parallel=2, logs_dir="runs/sweep/logs")
    sweep.summarize([job.run_dir for job in jobs], "runs/sweep")   # summary.md, summary.csv, hparams/

Each job is one process (:func:`train_command`: ``python -m keras_implicit.sweep``, which calls
:func:`keras_implicit.training.train_with_exit_code`, so a run behaves and exits as ``experiments/run.py`` does)
writing its run directory, its output going to ``logs_dir/<name>.log``. :func:`run_jobs` skips a run whose
``status.json`` says "finished" or "diverged" when its ``config.json`` holds the job's settings
(:func:`keras_implicit.training.stored_differences`); any other is started, and the run resumes from its last
checkpoint, continues (more ``epochs``, a lower ``target_train_loss``) or refuses a directory made with other
settings (exit code 1, in its log). On KeyboardInterrupt the runs get SIGINT and stop at their next batch, each
keeping its last checkpoint.

:func:`summarize` and :func:`write_hparams` read run directories; only the hparams logs need TensorFlow (through
TensorBoard's summary writer), and this module imports none at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import shlex
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Callable, Optional, Sequence

from keras_implicit import analysis
from keras_implicit.config import RunConfig, default_run_name, stored_differences
from keras_implicit.launchers import Launcher, LocalLauncher
from keras_implicit.rundir import CONFIG, METRICS, STATUS, parse_metrics, read_state

__all__ = [
    "TERMINAL_STATES",
    "Job",
    "grid",
    "plan",
    "train_command",
    "run_state",
    "run_jobs",
    "last_train_record",
    "progress_line",
    "export_run",
    "EXPORTED_FILES",
    "summarize",
    "write_hparams",
]

TERMINAL_STATES = ("finished", "diverged")
# Folders that a sweep writes beside its run directories.
OWN_FOLDERS = ("logs", "hparams")


class Job(typing.NamedTuple):
    """One run of a sweep: its name, command line, run directory and configuration (None: the command's own, not
    known here; :func:`run_jobs` then never skips the run, and the command decides)."""

    name: str
    command: list[str]
    run_dir: Path
    config: Optional[RunConfig] = None


def grid(base: RunConfig, **axes: Sequence) -> list[RunConfig]:
    """Every combination of the ``axes``' values on top of ``base``, the first axis varying slowest.

    Args:
        base: the settings shared by every run.
        **axes: a :class:`~keras_implicit.training.RunConfig` field name and its values, e.g.
            ``lr=[0.1, 0.001], seed=[0, 1, 2]``.

    Returns:
        A list of ``prod(len(values))`` configurations (not yet validated: :func:`plan` does).

    Raises:
        ValueError: an unknown field, an axis without values, or a value given twice.

    Example:
        >>> [c.lr for c in grid(RunConfig(), lr=[0.1, 0.001], seed=[0, 1])]
        [0.1, 0.1, 0.001, 0.001]
    """
    fields = {field.name for field in dataclasses.fields(RunConfig)}
    for name, values in axes.items():
        if name not in fields:
            raise ValueError(f"unknown RunConfig setting {name!r}: choose among {', '.join(sorted(fields))}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"{name} must be a non-empty list of values, got {values!r}")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} repeats a value: {list(values)}")
    names = list(axes)
    return [dataclasses.replace(base, **dict(zip(names, values)))
            for values in itertools.product(*(axes[name] for name in names))]


def train_command(config: RunConfig, run_dir) -> list[str]:
    """The command line of a process that trains ``config`` into ``run_dir`` as ``experiments/run.py`` would, without
    a progress bar: ``python -m keras_implicit.sweep --out RUN_DIR --config JSON``. Its exit code is run.py's (see
    :func:`keras_implicit.training.train_with_exit_code`)."""
    return [sys.executable, "-m", "keras_implicit.sweep", "--out", os.fspath(run_dir),
            "--config", json.dumps(config.flags(), sort_keys=True)]


def plan(configs: Sequence[RunConfig], runs_dir, command: Callable[[RunConfig, Path], list[str]] = train_command,
         labels: Optional[Sequence[str]] = None) -> list[Job]:
    """The :class:`Job` of every configuration: named by :func:`keras_implicit.training.default_run_name`, in
    ``runs_dir/<name>``, run by ``command(config, run_dir)``.

    Args:
        configs: the runs' configurations; each is validated (no TensorFlow is imported).
        runs_dir: the folder of the run directories.
        command: the command line of one run (default :func:`train_command`; ``experiments/sweep.py`` gives
            run.py's).
        labels: what errors call each configuration (default ``configuration 1``, ``configuration 2``, ...).

    Raises:
        ValueError: a bad setting (naming the configuration), or two configurations with one run name.
    """
    labels = list(labels) if labels is not None else [f"configuration {i + 1}" for i in range(len(configs))]
    if len(labels) != len(configs):
        raise ValueError(f"{len(labels)} labels for {len(configs)} configurations")
    runs_dir = Path(runs_dir)
    jobs, seen = [], {}
    for config, label in zip(configs, labels):
        try:
            config.validate()
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        name = default_run_name(config)
        if name in seen:
            raise ValueError(f"{seen[name]} and {label} are the same run {name} (its name holds dataset, model, "
                             "loss, optimizer, lr, batch_size, ghost_batch_size, train_subset and seed)")
        seen[name] = label
        run_dir = runs_dir / name
        jobs.append(Job(name, list(command(config, run_dir)), run_dir, config))
    return jobs


def run_state(run_dir) -> str:
    """``"missing"`` (no ``status.json``), ``"unreadable"``, or the state ``status.json`` holds (``"running"`` for a
    run killed while running): :func:`keras_implicit.rundir.read_state`."""
    return read_state(run_dir)


def _asked(changes: dict) -> str:
    return ", ".join(f"{setting} {asked} (was {stored})" for setting, (stored, asked) in changes.items())


def last_train_record(run_dir) -> Optional[dict]:
    """The last whole ``split == "train"`` record of ``run_dir/metrics.jsonl`` (read from the file's end), or None."""
    path = Path(run_dir) / METRICS
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            lines = handle.read().splitlines()
    except OSError:
        return None
    # The format's one parser; a torn last line, or the first one cut by the seek, is a problem and is passed over.
    for _, record, problem in reversed(list(parse_metrics(lines))):
        if problem is None and record.get("split") == "train":
            return record
    return None


def progress_line(done: Sequence[str], running: Sequence[tuple[str, Path]], left: int) -> str:
    """``3 done, 2 running (NAME: epoch 12, train CE 0.153; ...), 7 left``: what a person coming back reads."""
    parts = []
    for name, run_dir in running:
        record = last_train_record(run_dir)
        parts.append(f"{name}: " + ("starting" if record is None else
                                    f"epoch {record['epoch']:.4g}, train CE {record['ce']:.4g}"))
    return (f"{len(done)} done, {len(running)} running" + (f" ({'; '.join(parts)})" if parts else "")
            + f", {left} left")


def run_jobs(jobs: Sequence[Job], parallel: int, logs_dir, stream=None, poll: float = 0.5,
             interrupt_grace: float = 120.0, describe: Callable[[dict], str] = _asked,
             progress_every: Optional[float] = None,
             on_done: Optional[Callable[[Job, int], None]] = None,
             launcher: Optional[Launcher] = None) -> dict[str, Optional[int]]:
    """Runs the jobs, at most ``parallel`` at a time, and returns each name's exit code (None: skipped).

    Where they run is ``launcher``'s (:mod:`keras_implicit.launchers`): local processes by default, Ray tasks or
    SLURM jobs; what runs, skips and continues is decided here, the same on every engine.

    A run directory whose state is terminal (:data:`TERMINAL_STATES`) is skipped when its ``config.json`` holds
    the job's configuration; otherwise the process is started and the line says why (``continue NAME (finished,
    asked with epochs 8 (was 6); ...)``, the changes worded by ``describe``). Each process's output is appended to
    ``logs_dir/<name>.log`` after a ``$ command`` line. One line per start, skip and end goes to ``stream``
    (default ``sys.stdout``), each beginning ``[sweep]``.

    With ``progress_every`` (seconds), a ``[sweep] progress:`` line (:func:`progress_line`: runs done, running
    with their epoch and last training CE, and left) goes to ``stream`` that often, and after each run's end.

    ``on_done(job, exit_code)`` is called as each started process ends (:func:`export_run` keeps a finished run's
    records, say).

    On KeyboardInterrupt the running runs are interrupted (local processes get SIGINT, Ray tasks are cancelled,
    SLURM jobs cancelled; a run stops at its next batch, keeping its last checkpoint) and are waited for up to
    ``interrupt_grace`` seconds; then the KeyboardInterrupt goes on.

    Raises:
        ValueError: ``parallel`` below 1, or two jobs with one name or one run directory.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    for what, values in (("name", [job.name for job in jobs]),
                         ("run directory", [Path(job.run_dir).resolve() for job in jobs])):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"two jobs share a {what}: {', '.join(repeated)} (one process per run directory)")
    stream = stream or sys.stdout
    logs_dir = Path(logs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)

    def say(text):
        print(f"[sweep] {text}", file=stream, flush=True)

    pending = []
    codes: dict[str, Optional[int]] = {}
    for name, command, run_dir, config in jobs:
        state = run_state(run_dir)
        verb, detail = ("start" if state == "missing" else "resume"), ""
        if state in TERMINAL_STATES:
            changes = stored_differences(run_dir, config) if config is not None else None
            if changes == {}:  # a config.json that holds the job's settings (None: unknown, or unreadable)
                say(f"skip {name}: {state}")
                codes[name] = None
                continue
            verb, detail = "continue", (f"{state}, asked with {describe(changes)}; " if changes else f"{state}; ")
        pending.append((name, command, verb, detail))
    launcher = launcher or LocalLauncher()
    running: dict[str, tuple[object, float]] = {}
    by_name = {job.name: job for job in jobs}
    last_progress = time.time()

    def progress():
        say("progress: " + progress_line(list(codes), [(name, Path(by_name[name].run_dir)) for name in running],
                                         len(pending)))

    try:
        while pending or running:
            starting = []
            while pending and len(running) + len(starting) < parallel:
                name, command, verb, detail = pending.pop(0)
                log_path = logs_dir / f"{name}.log"
                with open(log_path, "a") as log:
                    log.write(f"$ {shlex.join(command)}\n")
                starting.append((name, verb, detail, log_path))
            if starting:
                handles = launcher.start_many([by_name[name] for name, *_ in starting],
                                              [log_path for *_, log_path in starting])
                for (name, verb, detail, log_path), handle in zip(starting, handles):
                    where = launcher.describe(handle)
                    say(f"{verb} {name} ({detail}log: {log_path})" + (f" as {where}" if where else ""))
                    running[name] = (handle, time.time())
            time.sleep(poll)
            for name in list(running):
                handle, started = running[name]
                code = launcher.poll(handle)
                if code is not None:
                    codes[name] = code
                    say(f"done  {name}: exit {code} after {time.time() - started:.0f} s")
                    del running[name]
                    if on_done is not None:
                        on_done(by_name[name], code)
                    if progress_every is not None:
                        progress()
                        last_progress = time.time()
            if progress_every is not None and running and time.time() - last_progress >= progress_every:
                progress()
                last_progress = time.time()
    except KeyboardInterrupt:
        # A Ctrl-C in a terminal reaches local runs too; a SIGINT sent to this process alone does not.
        for handle, _ in running.values():
            launcher.interrupt(handle)
        deadline = time.time() + interrupt_grace
        for name, (handle, _) in running.items():
            code = launcher.poll(handle)
            while code is None and time.time() < deadline:
                time.sleep(min(poll, 0.2))
                code = launcher.poll(handle)
            say(f"stopped {name}: exit {code}" if code is not None else
                f"{name} is still running ({launcher.describe(handle)})")
        raise
    return codes


# What export_run keeps of a run directory: its settings and its records, not its checkpoints or TensorBoard files.
EXPORTED_FILES = (CONFIG, STATUS, METRICS)


def export_run(run_dir, out_dir) -> Optional[Path]:
    """Copies a finished or diverged run's ``config.json``, ``status.json`` and ``metrics.jsonl`` to
    ``out_dir/<its name>/`` (written atomically, replacing an older copy): a run directory that
    :mod:`keras_implicit.analysis` reads, small enough to commit (no checkpoints, no TensorBoard files). Returns
    the copy, or None (and copies nothing) for a run that has not ended."""
    run_dir = Path(run_dir)
    if run_state(run_dir) not in TERMINAL_STATES:
        return None
    target = Path(out_dir) / run_dir.name
    staging = target.with_name(f".{target.name}.writing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in EXPORTED_FILES:
        shutil.copy2(run_dir / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def write_hparams(records: list[dict], log_dir, level: Optional[float] = None) -> None:
    """TensorBoard's hparams dashboard from :func:`keras_implicit.analysis.hparams_records`: one session per run
    (needs TensorFlow). ``log_dir`` is replaced as a whole, so that a summary at another level (named in the
    metrics' display names) never sits beside an older one."""
    import tensorflow as tf  # deferred: this backend only
    from tensorboard.plugins.hparams import api as hp  # deferred: this writer only

    final = Path(log_dir)
    log_dir = final.with_name(f".{final.name}.writing")
    shutil.rmtree(log_dir, ignore_errors=True)

    keys = sorted({k for r in records for k in r["hparams"]})
    hparams = []
    for key in keys:
        values = sorted({r["hparams"][key] for r in records if key in r["hparams"]}, key=str)
        hparams.append(hp.HParam(key, hp.Discrete(values)))
    metric_names = sorted({k for r in records for k in r["metrics"]})
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        at = "" if level is None else f" (train CE {level:.4g})"
        hp.hparams_config(hparams=hparams, metrics=[hp.Metric(m, display_name=m + at) for m in metric_names])
    writer.close()
    for record in records:
        writer = tf.summary.create_file_writer(str(log_dir / record["run"]))
        with writer.as_default():
            hp.hparams({h: record["hparams"][h.name] for h in hparams if h.name in record["hparams"]},
                       trial_id=record["run"])
            for name, value in record["metrics"].items():
                tf.summary.scalar(name, value, step=0)
        writer.close()
    shutil.rmtree(final, ignore_errors=True)
    log_dir.rename(final)


def _names(paths, most: Optional[int] = None) -> str:
    names = [getattr(p, "name", p) for p in paths]
    if most is None or len(names) <= most:
        return ", ".join(names)
    return ", ".join(names[:most]) + f" and {len(names) - most} more"


def _other_runs(runs_dir: Path, run_dirs: Sequence[Path]) -> list[Path]:
    """The run directories under ``runs_dir`` (those with a metrics.jsonl) that are not among ``run_dirs``."""
    if not runs_dir.is_dir():
        return []
    ours = {Path(d).resolve() for d in run_dirs}
    return sorted(d for d in runs_dir.iterdir() if d.is_dir() and d.name not in OWN_FOLDERS
                  and (d / METRICS).exists() and d.resolve() not in ours)


def summarize(run_dirs: Sequence, out_dir, level: Optional[float] = None, hparams: bool = True, stream=None,
              runs_dir=None, error_stream=None,
              naming: str = "the configurations") -> Optional[float]:
    """Writes ``summary.md`` and ``summary.csv`` (:func:`keras_implicit.analysis.summary_markdown`,
    :func:`~keras_implicit.analysis.summary_csv`) and, with ``hparams``, the hparams logs (:func:`write_hparams`)
    into ``out_dir`` for the run directories that hold metrics.

    Args:
        run_dirs: the sweep's run directories (some may not exist yet).
        out_dir: where the files go (created).
        level: the training CE of the summary; None: the lowest level that every finished run reaches (every run
            when none has finished; :func:`keras_implicit.analysis.common_level`).
        hparams: also write ``out_dir/hparams`` (needs TensorFlow; without it, one line says they were not
            written).
        stream: where the progress lines go (default ``sys.stdout``).
        runs_dir: the folder of the run directories, whose other runs are named (default: the first one's parent).
        error_stream: where the error line goes (default ``sys.stderr``).
        naming: what names the run directories, said when none of them has metrics (``experiments/sweep.py``: its
            grid flags).

    Returns:
        The level, or None when nothing was summarized: one ``[sweep] error:`` line on ``error_stream`` then says
        why (none has metrics: naming the run directories ``runs_dir`` does hold; or they cannot be compared).
        The run directories left out (none, no metrics yet, unreadable) are named on one line of ``stream``.
    """
    stream, error_stream = stream or sys.stdout, error_stream or sys.stderr
    run_dirs = [Path(d) for d in run_dirs]
    runs_dir = Path(runs_dir) if runs_dir is not None else (run_dirs[0].parent if run_dirs else Path("."))
    missing = {"no run directory": [], "no metrics.jsonl yet": [], "unreadable": []}
    runs = []
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            missing["no run directory"].append(run_dir.name)
        elif not (run_dir / METRICS).exists():
            missing["no metrics.jsonl yet"].append(run_dir.name)
        else:
            try:
                runs.append(analysis.load_run(run_dir))
            except analysis.RunDirectoryError as error:
                missing["unreadable"].append(f"{run_dir.name} ({error})")
    others = _other_runs(runs_dir, run_dirs)
    if not runs:
        left_out = "; ".join(f"{why}: {_names(names, most=4)}" for why, names in missing.items() if names)
        held = (f"{runs_dir} holds {len(others)} other run director{'y' if len(others) == 1 else 'ies'}: "
                f"{_names(others, most=8)}" if others else f"{runs_dir} holds no other run directory")
        print(f"[sweep] error: nothing to summarize: none of the grid's {len(run_dirs)} run(s) has metrics in "
              f"{runs_dir} ({left_out}). {held}. {naming[0].upper() + naming[1:]} name the run directories: they "
              "must be the ones the runs were made with", file=error_stream, flush=True)
        return None
    left_out = "; ".join(f"{why}: {_names(names)}" for why, names in missing.items() if names)
    if left_out:
        count = sum(len(names) for names in missing.values())
        outside = (f"; {runs_dir} also holds {len(others)} run(s) outside this grid ({_names(others, most=8)}), "
                   "left out too" if others else "")
        print(f"[sweep] {count} of the grid's {len(run_dirs)} points are not in the summary ({left_out}){outside}",
              file=stream, flush=True)
    try:
        if level is None:
            # Runs still going (or stopped early) would drag the level up: use the finished ones when any.
            finished = [r for r in runs if r.state == "finished"] or runs
            level = analysis.common_level(finished)
        markdown = analysis.summary_markdown(runs, level)
        table = analysis.summary_csv(analysis.summary_rows(runs, level))
    except ValueError as error:  # LevelNotReachedError, GridMismatchError: one line, not a traceback
        print(f"[sweep] error: cannot summarize the grid's {len(runs)} run(s) with metrics: {error}",
              file=error_stream, flush=True)
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(markdown)
    (out_dir / "summary.csv").write_text(table)
    if hparams and importlib.util.find_spec("tensorflow") is None:
        print("[sweep] hparams logs not written: TensorBoard's hparams summaries need TensorFlow (pip install "
              "tensorflow)", file=stream, flush=True)
    elif hparams:
        write_hparams(analysis.hparams_records(runs, level), out_dir / "hparams", level)
    print(f"[sweep] summary at training CE {level:.4g}: {out_dir / 'summary.md'}, {out_dir / 'summary.csv'}",
          file=stream)
    return level


def _train_main(argv=None) -> int:
    """``python -m keras_implicit.sweep --out RUN_DIR --config JSON``: one run of :func:`train_command`."""

    parser = argparse.ArgumentParser(prog="python -m keras_implicit.sweep",
                                     description="Train one RunConfig (given as JSON) into a run directory.")
    parser.add_argument("--out", required=True, help="the run directory")
    parser.add_argument("--config", required=True, help="the RunConfig's settings as a JSON object")
    args = parser.parse_args(argv)
    try:
        settings = json.loads(args.config)
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
        unknown = sorted(set(settings) - {field.name for field in dataclasses.fields(RunConfig)})
        if unknown:
            raise ValueError(f"unknown setting {', '.join(unknown)}")
        config = RunConfig(**settings)
    except ValueError as error:
        parser.error(f"--config: {error}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_implicit.training import train_with_exit_code  # deferred: the worker process only (Keras)

    return train_with_exit_code(config, args.out, progress=False)


if __name__ == "__main__":
    sys.exit(_train_main())
