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
sweep with exit code 130: rerun the same command to go on. Everything but the flags is ``keras_implicit.sweep``
(``grid``, ``plan``, ``run_jobs``, ``summarize``), which a user scheduling runs from Python calls directly.

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
import functools
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keras_implicit import config as run_settings  # noqa: E402  (no TensorFlow)
from keras_implicit import launchers, sweep  # noqa: E402
from keras_implicit.config import RunConfig  # noqa: E402
from keras_implicit.names import DATASETS, MODELS  # noqa: E402

RUN_SCRIPT = Path(__file__).resolve().parent / "run.py"
GRID_NAMING = ("the grid flags (--models, --datasets, --lrs, --batch-sizes, --seeds, --ghost-batch-size, "
               "--train-subset and the run.py flags after --)")
# The grid's flags and their attributes.
GRID_FLAGS = {"--models": "models", "--datasets": "datasets", "--lrs": "lrs", "--batch-sizes": "batch_sizes",
              "--seeds": "seeds"}
# The sweep's flags passed on to every run as they are.
PASSED_ON = ("ghost_batch_size", "epochs", "train_subset", "track_every", "track_schedule", "target_train_loss",
             "data_dir")
# What the flags after -- cannot set: the grid sets them, the sweep names the run directories.
NOT_PASSED_ON = {"model": "--models", "dataset": "--datasets", "lr": "--lrs", "batch_size": "--batch-sizes",
                 "seed": "--seeds", "out": "the sweep names each run's directory (--runs-dir)"}


def _run_parser() -> argparse.ArgumentParser:
    """run.py's parser (:func:`keras_implicit.config.add_run_arguments`), raising ValueError (``run.py: ...``)
    instead of exiting."""
    parser = argparse.ArgumentParser(prog="run.py", add_help=False)
    run_settings.add_run_arguments(parser)

    def refuse(message):
        raise ValueError(f"run.py: {message}")

    parser.error = refuse  # argparse reports every parse error through error(): raise instead of exiting
    return parser


def shared_flags(args) -> list[str]:
    """The run.py flags of every run: the sweep's flags that are passed on, then the flags after ``--``."""
    flags = []
    for flag in PASSED_ON:
        value = getattr(args, flag)
        if value is not None:
            flags += [f"--{flag.replace('_', '-')}", str(value)]
    return flags + list(args.run_args)


def base_config(args) -> RunConfig:
    """The configuration shared by the grid's runs: what run.py builds from :func:`shared_flags` (its own parser
    and ``config_from_args``), not yet validated. Raises ValueError with run.py's message for a flag it would
    refuse, or for a flag after ``--`` that the sweep sets itself."""
    after = _run_parser().parse_args(list(args.run_args))  # run.py's refusals of a bad flag after --, in its words
    explicit = run_settings.explicit_settings(args.run_args) | ({"out"} if after.out is not None else set())
    for dest, instead in NOT_PASSED_ON.items():
        if dest in explicit:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} cannot be passed on after --: " + (
                f"the grid sets it ({instead})" if instead.startswith("--") else instead))
    parsed = _run_parser().parse_args(shared_flags(args))
    if parsed.strategy == "multiworker":
        raise ValueError("--strategy multiworker cannot be passed on: each worker of a cluster runs run.py with "
                         "its own TF_CONFIG (docs/backends.md, \"More than one GPU or machine\"); --strategy "
                         "mirrored can")
    return run_settings.config_from_arguments(parsed)


def point_label(config: RunConfig) -> str:
    return (f"grid point {config.model} {config.dataset} lr={config.lr:g} batch={config.batch_size} "
            f"seed={config.seed}")


def command(config: RunConfig, run_dir: Path, args) -> list[str]:
    """The run.py command line of one grid point."""
    return [sys.executable, str(args.run_script), "--out", str(run_dir), "--no-progress",
            "--model", config.model, "--dataset", config.dataset, "--lr", repr(config.lr),
            "--batch-size", str(config.batch_size), "--seed", str(config.seed), *shared_flags(args)]


def plan(args) -> list[sweep.Job]:
    """The :class:`keras_implicit.sweep.Job` of every grid point, each configuration validated (no TensorFlow).
    Raises ValueError, in run.py's flags, for a bad flag or when two points would be the same run."""
    for flag, attribute in GRID_FLAGS.items():
        values = getattr(args, attribute)
        if len(set(values)) != len(values):
            raise ValueError(f"{flag} repeats a value: {' '.join(str(v) for v in values)}")
    configs = sweep.grid(base_config(args), model=args.models, dataset=args.datasets, lr=args.lrs,
                         batch_size=args.batch_sizes, seed=args.seeds)
    try:
        return sweep.plan(configs, args.runs_dir, command=functools.partial(command, args=args),
                          labels=[point_label(config) for config in configs])
    except ValueError as error:
        raise ValueError(run_settings.in_flag_words(str(error))) from None  # in flags' words, as run.py says it


def as_flag_changes(changes: dict) -> str:
    """``--epochs 8 (was 6)``: the settings in which a finished run differs from what is asked now, as flags."""
    return ", ".join(f"--{setting.replace('_', '-')} {asked} (was {stored})"
                     for setting, (stored, asked) in changes.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = run_settings  # the same checks as run.py for the values passed on

    def listed(values):
        return " ".join(str(v) for v in values)

    parser.add_argument("--runs-dir", type=Path, default=Path("runs/sweep"),
                        help="where the run directories go (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=["fc6"],
                        help=f"of {', '.join(MODELS)} (default: {listed(['fc6'])})")
    parser.add_argument("--datasets", nargs="+", default=["fashion_mnist"],
                        help=f"of {', '.join(DATASETS)} (default: {listed(['fashion_mnist'])})")
    parser.add_argument("--lrs", nargs="+", type=kinds.positive_float, default=[0.1, 0.001],
                        help=f"learning rates (default: {listed([0.1, 0.001])})")
    parser.add_argument("--batch-sizes", nargs="+", type=kinds.positive_int, default=[256],
                        help=f"examples per optimizer step (default: {listed([256])})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help=f"initialization and shuffling seeds (default: {listed([0, 1, 2])})")
    parser.add_argument("--jobs", type=kinds.positive_int, default=1,
                        help="runs at once, each using every core TF sees (default: %(default)s); on ray and "
                             "slurm, runs submitted at once (the engine queues them on its resources)")
    engines = parser.add_argument_group("engines", "where the runs run (README, \"Sweeps on a cluster\"); the run "
                                        "directories must be on a filesystem every node shares")
    engines.add_argument("--engine", choices=launchers.ENGINES, default="local",
                         help="local processes (default), Ray tasks, or SLURM jobs through submitit")
    engines.add_argument("--ray-address", default=None,
                         help="the Ray cluster (e.g. auto, 10.0.0.1:6379); default: a local one")
    engines.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs a run asks of a Ray node (default 1)")
    engines.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs a run asks of a Ray node (default 0)")
    engines.add_argument("--max-retries", type=int, default=3,
                         help="times a run whose Ray worker or node died, or whose SLURM job was preempted, is "
                              "started again from its checkpoint (default 3)")
    engines.add_argument("--slurm-partition", default=None, help="the SLURM partition")
    engines.add_argument("--slurm-time", type=kinds.positive_int, default=60,
                         help="minutes a SLURM job may run before it is requeued (default 60)")
    engines.add_argument("--slurm-cpus", type=kinds.positive_int, default=1, help="CPUs a SLURM job asks (default 1)")
    engines.add_argument("--slurm-gpus", type=int, default=0, help="GPUs a SLURM job asks (default 0)")
    engines.add_argument("--slurm-cluster", choices=("slurm", "local"), default=None,
                         help="submitit's cluster: slurm (default where sbatch is found) or local processes")
    # The settings passed on to every run as they are: run.py's flags, with its help. The micro-batch always (its
    # default is part of every run's command line); the others only when given (else run.py's default).
    run_settings.add_arguments(parser, ["ghost_batch_size"])
    run_settings.add_arguments(parser, [name for name in PASSED_ON if name != "ghost_batch_size"], unset=True)
    parser.add_argument("--level", type=kinds.positive_float,
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


def make_launcher(args) -> launchers.Launcher:
    """The engine of ``--engine`` with its flags (:func:`keras_implicit.launchers.make_launcher`)."""
    if args.engine == "ray":
        return launchers.make_launcher("ray", args.runs_dir, address=args.ray_address, num_cpus=args.ray_cpus,
                                       num_gpus=args.ray_gpus, max_retries=args.max_retries)
    if args.engine == "slurm":
        return launchers.make_launcher("slurm", args.runs_dir, cluster=args.slurm_cluster,
                                       partition=args.slurm_partition, time_minutes=args.slurm_time,
                                       cpus_per_task=args.slurm_cpus, gpus_per_node=args.slurm_gpus,
                                       max_requeues=args.max_retries)
    return launchers.make_launcher("local", args.runs_dir)


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        jobs = plan(args)  # every point's configuration is checked (without TensorFlow) before any process starts
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        for job in jobs:
            print(shlex.join(job.command))
        return 0
    failed = []
    if not args.summary_only:
        args.runs_dir.mkdir(parents=True, exist_ok=True)
        launcher = make_launcher(args)
        try:
            codes = sweep.run_jobs(jobs, args.jobs, args.runs_dir / "logs", describe=as_flag_changes,
                                   launcher=launcher)
        except KeyboardInterrupt:
            print(f"[sweep] interrupted: rerun the same command to go on (finished runs are skipped, the others "
                  f"resume from their last checkpoint; logs in {args.runs_dir / 'logs'})", file=sys.stderr)
            return 130
        finally:
            launcher.close()
        # run.py exits 3 for a diverged run: a result, not a failure.
        failed = [name for name, code in codes.items() if code not in (None, 0, 3)]
    elif not args.runs_dir.is_dir():
        print(f"[sweep] error: nothing to summarize: {args.runs_dir} does not exist (--runs-dir names the folder "
              "of the run directories)", file=sys.stderr)
        return 1
    level = sweep.summarize([job.run_dir for job in jobs], args.summary_dir or args.runs_dir, args.level,
                            hparams=not args.no_hparams, runs_dir=args.runs_dir, naming=GRID_NAMING)
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed)} (see {args.runs_dir / 'logs'})",
              file=sys.stderr)
    # Nothing summarized (nothing of the grid has metrics, or the runs cannot be compared) is a failure too.
    return 1 if failed or level is None else 0


if __name__ == "__main__":
    sys.exit(main())
