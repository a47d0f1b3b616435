"""Run a grid of training runs in parallel and summarize them at equal training loss.

    python experiments/sweep.py --runs-dir runs/sweep --models fc6 --datasets fashion_mnist \\
        --lrs 0.1 0.001 --batch-sizes 256 16384 --seeds 0 1 2 --jobs 2 --epochs 30 --target-train-loss 0.3

The grid is models × datasets × learning rates × batch sizes × seeds; each point is one
``experiments/run.py`` process writing ``RUNS_DIR/<run name>/`` (the name of
``keras_implicit.training.default_run_name``), its output going to ``RUNS_DIR/logs/<run name>.log``.
At most ``--jobs`` processes run at once. A run whose status.json says "finished" or "diverged" is
skipped; any other run is started again and run.py resumes it from its last checkpoint.

When every process has ended, the sweep writes ``RUNS_DIR/summary.md`` and ``RUNS_DIR/summary.csv``
(each run's values at one training-CE level, seed means ± std, and the crossovers between the grid's
extremes; see ``keras_implicit.analysis``) and logs the runs to TensorBoard's hparams dashboard under
``RUNS_DIR/hparams/`` (``tensorboard --logdir RUNS_DIR/hparams``); ``--summary-dir`` puts these elsewhere.
``--level`` fixes the level; by default it is the lowest training CE that every finished run reaches.
``--summary-only`` skips training.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keras_implicit import analysis  # noqa: E402

RUN_SCRIPT = Path(__file__).resolve().parent / "run.py"
TERMINAL_STATES = ("finished", "diverged")


@dataclasses.dataclass(frozen=True)
class GridPoint:
    model: str
    dataset: str
    lr: float
    batch_size: int
    seed: int

    @property
    def name(self) -> str:
        # The same name run.py gives by default (keras_implicit.training.default_run_name), computed
        # here so that the sweep needs no TensorFlow to plan.
        return f"{self.dataset}-{self.model}-ce-sgd-lr{self.lr:g}-b{self.batch_size}-s{self.seed}"


def grid(models, datasets, lrs, batch_sizes, seeds) -> list[GridPoint]:
    """Every combination, in the order models, datasets, learning rates, batch sizes, seeds."""
    points = [GridPoint(m, d, float(lr), int(b), int(s))
              for m, d, lr, b, s in itertools.product(models, datasets, lrs, batch_sizes, seeds)]
    if len({p.name for p in points}) != len(points):
        raise ValueError("the grid repeats a point (a value given twice?)")
    return points


def run_name(point: GridPoint, ghost_batch_size: int, train_subset: int | None) -> str:
    """``point.name`` with ``-g<ghost>`` and ``-n<subset>`` before the seed when not default, as run.py."""
    extra = (f"-g{ghost_batch_size}" if ghost_batch_size != 256 else "") + (
        f"-n{train_subset}" if train_subset is not None else "")
    return f"{point.dataset}-{point.model}-ce-sgd-lr{point.lr:g}-b{point.batch_size}{extra}-s{point.seed}"


def command(point: GridPoint, run_dir: Path, args, run_script: Path = RUN_SCRIPT) -> list[str]:
    """The run.py command line of one grid point."""
    cmd = [sys.executable, str(run_script), "--model", point.model, "--dataset", point.dataset,
           "--lr", repr(point.lr), "--batch-size", str(point.batch_size), "--seed", str(point.seed),
           "--ghost-batch-size", str(args.ghost_batch_size), "--out", str(run_dir), "--no-progress"]
    for flag in ("epochs", "train_subset", "track_every", "track_schedule", "target_train_loss", "data_dir"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    return cmd + list(args.run_args)


def state_of(run_dir: Path) -> str:
    """"missing", or the state in status.json ("running" for a run killed while running)."""
    try:
        import json

        return str(json.loads((run_dir / "status.json").read_text()).get("state", "unknown"))
    except FileNotFoundError:
        return "missing"
    except ValueError:
        return "unreadable"


def run_grid(jobs: list[tuple[str, list[str], Path]], parallel: int, logs_dir: Path, poll: float = 0.5,
             stream=None) -> dict[str, int]:
    """Runs ``(name, command, run_dir)`` jobs, at most ``parallel`` at a time; skips a run_dir whose
    state is terminal. Returns each name's exit code (None when skipped)."""
    if parallel < 1:
        raise ValueError(f"--jobs must be >= 1, got {parallel}")
    stream = stream or sys.stdout
    logs_dir.mkdir(parents=True, exist_ok=True)
    pending = []
    codes: dict[str, int | None] = {}
    for name, cmd, run_dir in jobs:
        state = state_of(run_dir)
        if state in TERMINAL_STATES:
            print(f"[sweep] skip {name}: {state}", file=stream, flush=True)
            codes[name] = None
        else:
            pending.append((name, cmd, run_dir, state))
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, run_dir, state = pending.pop(0)
            log = open(logs_dir / f"{name}.log", "a")
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            verb = "resume" if state != "missing" else "start"
            print(f"[sweep] {verb} {name} (log: {logs_dir / (name + '.log')})", file=stream, flush=True)
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
    return codes


def write_hparams(records: list[dict], log_dir: Path) -> None:
    """TensorBoard's hparams dashboard: one session per run (needs TensorFlow)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    keys = sorted({k for r in records for k in r["hparams"]})
    hparams = []
    for key in keys:
        values = sorted({r["hparams"][key] for r in records if key in r["hparams"]}, key=str)
        hparams.append(hp.HParam(key, hp.Discrete(values)))
    metric_names = sorted({k for r in records for k in r["metrics"]})
    with tf.summary.create_file_writer(str(log_dir)).as_default():
        hp.hparams_config(hparams=hparams, metrics=[hp.Metric(m, display_name=m) for m in metric_names])
    for record in records:
        with tf.summary.create_file_writer(str(log_dir / record["run"])).as_default():
            hp.hparams({h: record["hparams"][h.name] for h in hparams if h.name in record["hparams"]},
                       trial_id=record["run"])
            for name, value in record["metrics"].items():
                tf.summary.scalar(name, value, step=0)


def summarize(run_dirs: list[Path], out_dir: Path, level: float | None, hparams: bool = True,
              stream=None) -> float | None:
    """Writes summary.md, summary.csv (and the hparams logs) for the run directories that exist."""
    stream = stream or sys.stdout
    existing = [d for d in run_dirs if (d / "metrics.jsonl").exists()]
    if not existing:
        print("[sweep] no run has written metrics yet: no summary", file=stream)
        return None
    runs = [analysis.load_run(d) for d in existing]
    if level is None:
        # Runs still going (or stopped early) would drag the level up: use the finished ones when any.
        finished = [r for r in runs if r.state == "finished"] or runs
        level = analysis.common_level(finished)
    (out_dir / "summary.md").write_text(analysis.summary_markdown(runs, level))
    (out_dir / "summary.csv").write_text(analysis.summary_csv(analysis.summary_rows(runs, level)))
    if hparams:
        write_hparams(analysis.hparams_records(runs, level), out_dir / "hparams")
    print(f"[sweep] summary at training CE {level:.4g}: {out_dir / 'summary.md'}, {out_dir / 'summary.csv'}",
          file=stream)
    return level


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/sweep"), help="where the run directories go")
    parser.add_argument("--models", nargs="+", default=["fc6"])
    parser.add_argument("--datasets", nargs="+", default=["fashion_mnist"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.1, 0.001])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ghost-batch-size", type=int, default=256, help="micro-batch of large batches")
    parser.add_argument("--jobs", type=int, default=1, help="processes at once (each uses every core TF sees)")
    parser.add_argument("--epochs", type=int, help="passed to run.py")
    parser.add_argument("--train-subset", type=int, help="passed to run.py")
    parser.add_argument("--track-every", type=int, help="passed to run.py")
    parser.add_argument("--track-schedule", choices=["epoch", "log"], help="passed to run.py")
    parser.add_argument("--target-train-loss", type=float, help="passed to run.py: stop at this training CE")
    parser.add_argument("--data-dir", help="passed to run.py")
    parser.add_argument("--level", type=float, help="training CE of the summary (default: lowest common level)")
    parser.add_argument("--summary-only", action="store_true", help="do not train, summarize what exists")
    parser.add_argument("--summary-dir", type=Path, help="where summary.md, summary.csv and hparams/ go "
                        "(default: --runs-dir)")
    parser.add_argument("--no-hparams", action="store_true", help="skip the TensorBoard hparams logs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--run-script", type=Path, default=RUN_SCRIPT, help=argparse.SUPPRESS)
    parser.add_argument("run_args", nargs=argparse.REMAINDER,
                        help="after --: more flags for every run.py process")
    args = parser.parse_args(argv)
    if args.run_args and args.run_args[0] == "--":
        args.run_args = args.run_args[1:]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    points = grid(args.models, args.datasets, args.lrs, args.batch_sizes, args.seeds)
    jobs = []
    for point in points:
        run_dir = args.runs_dir / run_name(point, args.ghost_batch_size, args.train_subset)
        jobs.append((run_dir.name, command(point, run_dir, args, args.run_script), run_dir))
    if args.dry_run:
        for _, cmd, _ in jobs:
            print(shlex.join(cmd))
        return 0
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.summary_only:
        codes = run_grid(jobs, args.jobs, args.runs_dir / "logs")
        # run.py exits 3 for a diverged run: a result, not a failure.
        failed = [name for name, code in codes.items() if code not in (None, 0, 3)]
    summary_dir = args.summary_dir or args.runs_dir
    summary_dir.mkdir(parents=True, exist_ok=True)
    summarize([run_dir for _, _, run_dir in jobs], summary_dir, args.level, hparams=not args.no_hparams)
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed)} (see {args.runs_dir / 'logs'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
