"""Run a grid of training runs in parallel and summarize them at equal training loss.

    python experiments/sweep.py --runs-dir runs/sweep --models fc6 --datasets fashion_mnist \\
        --lrs 0.1 0.001 --batch-sizes 256 16384 --seeds 0 1 2 --jobs 2 --epochs 30 --target-train-loss 0.3

The grid is models × datasets × learning rates × batch sizes × seeds; each point is one
``experiments/run.py`` process writing ``RUNS_DIR/<run name>/`` (the name run.py gives by default,
``keras_implicit.training.default_run_name``, so ``-- --loss gcdf@1`` or ``-- --optimizer adam`` show in it),
its output going to ``RUNS_DIR/logs/<run name>.log``. Every point's command line is parsed with run.py's own
parser and validated before any process starts (bad flags: exit code 2, nothing started or written).
At most ``--jobs`` processes run at once. A run whose status.json says "finished" or "diverged" is
skipped when its config.json holds the settings asked now (``keras_implicit.training.stored_differences``);
any other run is started again and run.py resumes it from its last checkpoint, continues a finished run asked for
more ``--epochs`` or a lower ``--target-train-loss``, and refuses (exit code 1, in the run's log) a run directory
made with other settings. Ctrl-C stops the runs at their next batch (each keeps its last checkpoint) and the
sweep with exit code 130: rerun the same command to go on.

When every process has ended, the sweep writes ``RUNS_DIR/summary.md`` and ``RUNS_DIR/summary.csv``
(each run's values at one training-CE level, seed means ± std, and the crossovers between the grid's
extremes; see ``keras_implicit.analysis``) and logs the runs to TensorBoard's hparams dashboard under
``RUNS_DIR/hparams/`` (``tensorboard --logdir RUNS_DIR/hparams``); ``--summary-dir`` puts these elsewhere.
``--level`` fixes the level; by default it is the lowest training CE that every finished run reaches.
The grid points left out of the summary (no run directory, no metrics yet) are listed on one line.
``--summary-only`` skips training and summarizes the grid's runs that exist: the grid flags name the run
directories, so they must be the ones the runs were made with; when none of the grid's runs has metrics, the
sweep says which run directories ``RUNS_DIR`` does hold and exits with code 1 (as when a run failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import itertools
import shlex
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keras_implicit import analysis  # noqa: E402
from keras_implicit.training import (  # noqa: E402
    DATASETS,
    MODELS,
    SCHEDULES,
    RunConfig,
    default_run_name,
    stored_differences,
)

RUN_SCRIPT = Path(__file__).resolve().parent / "run.py"
TERMINAL_STATES = ("finished", "diverged")


@functools.cache
def run_py():
    """``experiments/run.py`` as a module: its parser and ``config_from_args`` (no TensorFlow import)."""
    spec = importlib.util.spec_from_file_location("_sweep_run_py", RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Job(typing.NamedTuple):
    """One grid point's run: its name, run.py command line, run directory and the configuration run.py builds."""

    name: str
    command: list[str]
    run_dir: Path
    config: RunConfig | None = None


@dataclasses.dataclass(frozen=True)
class GridPoint:
    model: str
    dataset: str
    lr: float
    batch_size: int
    seed: int

    def __str__(self) -> str:
        return f"{self.model} {self.dataset} lr={self.lr:g} batch={self.batch_size} seed={self.seed}"


def grid(models, datasets, lrs, batch_sizes, seeds) -> list[GridPoint]:
    """Every combination, in the order models, datasets, learning rates, batch sizes, seeds."""
    points = [GridPoint(m, d, float(lr), int(b), int(s))
              for m, d, lr, b, s in itertools.product(models, datasets, lrs, batch_sizes, seeds)]
    if len(set(points)) != len(points):
        raise ValueError("the grid repeats a point (a value given twice?)")
    return points


def run_flags(point: GridPoint, args) -> list[str]:
    """The run.py flags of one grid point, but for ``--out`` and ``--no-progress``: the point, the sweep's
    flags that are passed on, then the flags after ``--``."""
    flags = ["--model", point.model, "--dataset", point.dataset, "--lr", repr(point.lr),
             "--batch-size", str(point.batch_size), "--seed", str(point.seed),
             "--ghost-batch-size", str(args.ghost_batch_size)]
    for flag in ("epochs", "train_subset", "track_every", "track_schedule", "target_train_loss", "data_dir"):
        value = getattr(args, flag)
        if value is not None:
            flags += [f"--{flag.replace('_', '-')}", str(value)]
    return flags + list(args.run_args)


def run_config(point: GridPoint, args) -> RunConfig:
    """The validated RunConfig that run.py builds from this point's flags (its own parser and
    ``config_from_args``). Raises ValueError with run.py's message for a flag it would refuse."""
    run = run_py()
    parser = run.build_parser()

    def refuse(message):
        raise ValueError(f"run.py: {message}")

    parser.error = refuse  # argparse reports every parse error through error(): raise instead of exiting
    parsed = parser.parse_args(run_flags(point, args))
    if parsed.out is not None:
        raise ValueError("--out cannot be passed on: the sweep names each run's directory")
    if parsed.strategy == "multiworker":
        raise ValueError("--strategy multiworker cannot be passed on: each worker of a cluster runs run.py with "
                         "its own TF_CONFIG (README, \"More than one GPU or machine\"); --strategy mirrored can")
    try:
        return run.config_from_args(parsed).validate()
    except ValueError as error:
        raise ValueError(run.as_flags(str(error))) from None  # in flags' words, as run.py says it


def plan(points: list[GridPoint], args) -> list[Job]:
    """The :class:`Job` (run name, run.py command, run directory, configuration) of every point; every
    configuration is validated first.

    The name is :func:`keras_implicit.training.default_run_name` of the configuration run.py will build,
    so the loss, optimizer, ghost batch and subset passed on are in it. Raises ValueError (naming the point)
    for a bad flag, or when two points would share a directory.
    """
    jobs, seen = [], {}
    for point in points:
        try:
            config = run_config(point, args)
            name = default_run_name(config)
        except ValueError as error:
            raise ValueError(f"grid point {point}: {error}") from None
        if name in seen:
            raise ValueError(f"grid points {seen[name]} and {point} are the same run {name} (do flags after -- "
                             "override the grid?)")
        seen[name] = point
        run_dir = args.runs_dir / name
        jobs.append(Job(name, command(point, run_dir, args, args.run_script), run_dir, config))
    return jobs


def command(point: GridPoint, run_dir: Path, args, run_script: Path = RUN_SCRIPT) -> list[str]:
    """The run.py command line of one grid point."""
    return [sys.executable, str(run_script), "--out", str(run_dir), "--no-progress", *run_flags(point, args)]


def state_of(run_dir: Path) -> str:
    """"missing", or the state in status.json ("running" for a run killed while running)."""
    try:
        import json

        return str(json.loads((run_dir / "status.json").read_text()).get("state", "unknown"))
    except FileNotFoundError:
        return "missing"
    except ValueError:
        return "unreadable"


def run_grid(jobs: list[Job], parallel: int, logs_dir: Path, poll: float = 0.5, stream=None,
             interrupt_grace: float = 120.0) -> dict[str, int]:
    """Runs the jobs' run.py processes, at most ``parallel`` at a time. A run directory whose state is
    terminal is skipped when its ``config.json`` holds the job's configuration (or a job has none); otherwise
    run.py is started and continues (more epochs, a new target) or refuses (other settings) it. Returns each name's
    exit code (None when skipped).

    On KeyboardInterrupt the running processes get SIGINT (run.py stops at its next batch, keeping its last
    checkpoint), are waited for up to ``interrupt_grace`` seconds, and the KeyboardInterrupt goes on."""
    if parallel < 1:
        raise ValueError(f"--jobs must be >= 1, got {parallel}")
    stream = stream or sys.stdout
    logs_dir.mkdir(parents=True, exist_ok=True)
    pending = []
    codes: dict[str, int | None] = {}
    for name, cmd, run_dir, config in jobs:
        state = state_of(run_dir)
        verb, detail = ("start" if state == "missing" else "resume"), ""
        if state in TERMINAL_STATES:
            changes = stored_differences(run_dir, config) if config is not None else None
            if not changes:
                print(f"[sweep] skip {name}: {state}", file=stream, flush=True)
                codes[name] = None
                continue
            verb, detail = "continue", f"{state}, asked with " + ", ".join(
                f"--{k.replace('_', '-')} {asked} (was {stored})" for k, (stored, asked) in changes.items()) + "; "
        pending.append((name, cmd, verb, detail))
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, cmd, verb, detail = pending.pop(0)
                log = open(logs_dir / f"{name}.log", "a")
                log.write(f"$ {shlex.join(cmd)}\n")
                log.flush()
                print(f"[sweep] {verb} {name} ({detail}log: {logs_dir / (name + '.log')})", file=stream, flush=True)
                running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time())
            time.sleep(poll)
            for name in list(running):
                process, log, started = running[name]
                if process.poll() is not None:
                    log.close()
                    codes[name] = process.returncode
                    print(f"[sweep] done  {name}: exit {process.returncode} after {time.time() - started:.0f} s",
                          file=stream, flush=True)
                    del running[name]
    except KeyboardInterrupt:
        # A Ctrl-C in a terminal reaches the runs too; a SIGINT sent to this process alone does not.
        for process, _, _ in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.time() + interrupt_grace
        for name, (process, log, _) in running.items():
            try:
                code = process.wait(timeout=max(deadline - time.time(), 0.1))
                print(f"[sweep] stopped {name}: exit {code}", file=stream, flush=True)
            except subprocess.TimeoutExpired:
                print(f"[sweep] {name} is still running (pid {process.pid})", file=stream, flush=True)
            log.close()
        raise
    return codes


def write_hparams(records: list[dict], log_dir: Path, level: float | None = None) -> None:
    """TensorBoard's hparams dashboard: one session per run (needs TensorFlow). ``log_dir`` is replaced as a whole,
    so that a summary at another level (named in the metrics' display names) never sits beside an older one."""
    import shutil

    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    final, log_dir = log_dir, log_dir.with_name(f".{log_dir.name}.writing")
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


# Folders that the sweep itself writes under --runs-dir (not run directories).
OWN_FOLDERS = ("logs", "hparams")


def _names(paths, most: int | None = None) -> str:
    names = [getattr(p, "name", p) for p in paths]
    if most is None or len(names) <= most:
        return ", ".join(names)
    return ", ".join(names[:most]) + f" and {len(names) - most} more"


def _other_runs(runs_dir: Path, grid_dirs: list[Path]) -> list[Path]:
    """The run directories under ``runs_dir`` (those with a metrics.jsonl) that are not the grid's."""
    if not runs_dir.is_dir():
        return []
    ours = {d.resolve() for d in grid_dirs}
    return sorted(d for d in runs_dir.iterdir() if d.is_dir() and d.name not in OWN_FOLDERS
                  and (d / "metrics.jsonl").exists() and d.resolve() not in ours)


def summarize(run_dirs: list[Path], out_dir: Path, level: float | None, hparams: bool = True,
              stream=None, runs_dir: Path | None = None, error_stream=None) -> float | None:
    """Writes summary.md, summary.csv (and the hparams logs) for the grid's run directories that hold metrics;
    returns the level, or None when nothing was summarized.

    The grid points left out (no run directory, no metrics.jsonl yet, unreadable) are named on one line of
    ``stream``, with the run directories of ``runs_dir`` outside the grid. When none of the grid's runs can be
    summarized (or they cannot be compared), one ``[sweep] error:`` line on ``error_stream`` says why, naming
    the run directories that ``runs_dir`` does hold: the grid flags name the runs, so they must be the ones the
    runs were made with."""
    stream, error_stream = stream or sys.stdout, error_stream or sys.stderr
    runs_dir = runs_dir if runs_dir is not None else (run_dirs[0].parent if run_dirs else Path("."))
    missing = {"no run directory": [], "no metrics.jsonl yet": [], "unreadable": []}
    runs = []
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            missing["no run directory"].append(run_dir.name)
        elif not (run_dir / "metrics.jsonl").exists():
            missing["no metrics.jsonl yet"].append(run_dir.name)
        else:
            try:
                runs.append(analysis.load_run(run_dir))
            except analysis.RunDirectoryError as error:
                missing["unreadable"].append(f"{run_dir.name} ({error})")
    left_out = "; ".join(f"{why}: {_names(names)}" for why, names in missing.items() if names)
    others = _other_runs(runs_dir, run_dirs)
    if not runs:
        left_out = "; ".join(f"{why}: {_names(names, most=4)}" for why, names in missing.items() if names)
        held = (f"{runs_dir} holds {len(others)} other run director{'y' if len(others) == 1 else 'ies'}: "
                f"{_names(others, most=8)}" if others else f"{runs_dir} holds no other run directory")
        print(f"[sweep] error: nothing to summarize: none of the grid's {len(run_dirs)} run(s) has metrics in "
              f"{runs_dir} ({left_out}). {held}. The grid flags (--models, --datasets, --lrs, --batch-sizes, --seeds, "
              "--ghost-batch-size, --train-subset and the run.py flags after --) name the run directories: they must "
              "be the ones the runs were made with", file=error_stream, flush=True)
        return None
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
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(markdown)
    (out_dir / "summary.csv").write_text(table)
    if hparams:
        write_hparams(analysis.hparams_records(runs, level), out_dir / "hparams", level)
    print(f"[sweep] summary at training CE {level:.4g}: {out_dir / 'summary.md'}, {out_dir / 'summary.csv'}",
          file=stream)
    return level


def build_parser() -> argparse.ArgumentParser:
    run = run_py()  # the same checks as run.py for the values passed on
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def listed(values):
        return " ".join(str(v) for v in values)

    parser.add_argument("--runs-dir", type=Path, default=Path("runs/sweep"),
                        help="where the run directories go (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=["fc6"],
                        help=f"of {', '.join(MODELS)} (default: {listed(['fc6'])})")
    parser.add_argument("--datasets", nargs="+", default=["fashion_mnist"],
                        help=f"of {', '.join(DATASETS)} (default: {listed(['fashion_mnist'])})")
    parser.add_argument("--lrs", nargs="+", type=run._positive_float, default=[0.1, 0.001],
                        help=f"learning rates (default: {listed([0.1, 0.001])})")
    parser.add_argument("--batch-sizes", nargs="+", type=run._positive_int, default=[256],
                        help=f"examples per optimizer step (default: {listed([256])})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help=f"initialization and shuffling seeds (default: {listed([0, 1, 2])})")
    parser.add_argument("--ghost-batch-size", type=run._positive_int, default=RunConfig.ghost_batch_size,
                        help="micro-batch of large batches (default: %(default)s)")
    parser.add_argument("--jobs", type=run._positive_int, default=1,
                        help="processes at once, each using every core TF sees (default: %(default)s)")
    parser.add_argument("--epochs", type=run._positive_int, help="passed to run.py (default: run.py's)")
    parser.add_argument("--train-subset", type=run._positive_int, help="passed to run.py (default: all)")
    parser.add_argument("--track-every", type=run._positive_int, help="passed to run.py")
    parser.add_argument("--track-schedule", choices=SCHEDULES, help="passed to run.py (default: run.py's)")
    parser.add_argument("--target-train-loss", type=run._positive_float,
                        help="passed to run.py: stop at this training CE")
    parser.add_argument("--data-dir", help="passed to run.py")
    parser.add_argument("--level", type=run._positive_float,
                        help="training CE of the summary (default: the lowest level every finished run reaches)")
    parser.add_argument("--summary-only", action="store_true", help="do not train, summarize what exists")
    parser.add_argument("--summary-dir", type=Path, help="where summary.md, summary.csv and hparams/ go "
                        "(default: --runs-dir)")
    parser.add_argument("--no-hparams", action="store_true", help="skip the TensorBoard hparams logs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--run-script", type=Path, default=RUN_SCRIPT, help=argparse.SUPPRESS)
    parser.add_argument("run_args", nargs=argparse.REMAINDER,
                        help="run.py flags for every run, after a -- (e.g. sweep.py -- --loss gcdf@1 --optimizer "
                             "adam); the run names show them")
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None):
    args = (parser or build_parser()).parse_args(argv)
    if args.run_args and args.run_args[0] == "--":
        args.run_args = args.run_args[1:]
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        # Every point's configuration is checked (without TensorFlow) before any process starts.
        jobs = plan(grid(args.models, args.datasets, args.lrs, args.batch_sizes, args.seeds), args)
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        for job in jobs:
            print(shlex.join(job.command))
        return 0
    failed = []
    if not args.summary_only:
        args.runs_dir.mkdir(parents=True, exist_ok=True)
        try:
            codes = run_grid(jobs, args.jobs, args.runs_dir / "logs")
        except KeyboardInterrupt:
            print(f"[sweep] interrupted: rerun the same command to go on (finished runs are skipped, the others "
                  f"resume from their last checkpoint; logs in {args.runs_dir / 'logs'})", file=sys.stderr)
            return 130
        # run.py exits 3 for a diverged run: a result, not a failure.
        failed = [name for name, code in codes.items() if code not in (None, 0, 3)]
    elif not args.runs_dir.is_dir():
        print(f"[sweep] error: nothing to summarize: {args.runs_dir} does not exist (--runs-dir names the folder "
              "of the run directories)", file=sys.stderr)
        return 1
    level = summarize([job.run_dir for job in jobs], args.summary_dir or args.runs_dir, args.level,
                      hparams=not args.no_hparams, runs_dir=args.runs_dir)
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed)} (see {args.runs_dir / 'logs'})",
              file=sys.stderr)
    # Nothing summarized (nothing of the grid has metrics, or the runs cannot be compared) is a failure too.
    return 1 if failed or level is None else 0


if __name__ == "__main__":
    sys.exit(main())
