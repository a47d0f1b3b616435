"""keras_implicit.sweep and experiments/sweep.py over it: the grid, parallel processes, skip/resume, summary and
hparams logs.

Most tests drive the sweep with a stand-in for run.py (``fake_run.py``, written below) that accepts
run.py's flags and writes a synthetic run directory at once; one test trains for real through the library's own
command (``python -m keras_implicit.sweep``), and one slow test runs the real run.py.
"""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keras_implicit import analysis, sweep
from keras_implicit.training import RunConfig, default_run_name
from tests.runs import assert_refused_before_tensorflow

ROOT = Path(__file__).resolve().parent.parent


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


script = load_script("sweep")

FAKE_RUN = textwrap.dedent('''
    import argparse, json, math, os, sys, time
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--dataset", "--out", "--track-schedule", "--data-dir"):
        parser.add_argument(flag)
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--optimizer", default="sgd")
    for flag in ("--lr", "--target-train-loss"):
        parser.add_argument(flag, type=float)
    for flag in ("--batch-size", "--ghost-batch-size", "--seed", "--epochs", "--train-subset", "--track-every"):
        parser.add_argument(flag, type=int)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--deterministic", action="store_true")
    args = parser.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "invocations.jsonl"), "a") as f:
        f.write(json.dumps({"start": time.time(), "argv": sys.argv[1:]}) + "\\n")
    time.sleep(float(os.environ.get("FAKE_RUN_SECONDS", "0")))
    if args.seed == 99:
        sys.exit(1)
    sigmas, temperatures, margins = [0.5, 1.0, 8.0], [1.0, 4.0], [1.0, 4.0]
    # Every setting that defines a run, as run.py's config.json holds them.
    config = {"model": args.model, "dataset": args.dataset, "lr": args.lr, "batch_size": args.batch_size,
              "ghost_batch_size": args.ghost_batch_size, "seed": args.seed, "epochs": args.epochs,
              "optimizer": args.optimizer, "loss": args.loss, "train_subset": args.train_subset,
              "track_every": args.track_every, "track_schedule": args.track_schedule or "epoch",
              "target_train_loss": args.target_train_loss, "data_dir": args.data_dir,
              "deterministic": args.deterministic, "noisy_error_draws": 0,
              "sigmas": sigmas, "temperatures": temperatures, "margins": margins}
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    sign = 1.0 if (args.lr > 0.01 and args.batch_size < 1000) else -1.0
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for k in range(args.epochs + 1):
            ce = 2.3 * math.exp(-(0.7 + 0.02 * args.seed) * k)
            record = {"epoch": float(k), "step": k * 10, "split": "train", "ce": ce, "error": ce / 3}
            for fam, grid in (("gcdf", sigmas), ("tce", temperatures), ("hinge", margins)):
                for p in grid:
                    name = f"{fam}@{p:g}"
                    record[name] = (5 + math.log(ce)) * p * (1 - sign * 0.2 * math.log(p))
            f.write(json.dumps(record) + "\\n")
    json.dump({"state": "finished", "epoch": args.epochs, "step": args.epochs * 10},
              open(os.path.join(out, "status.json"), "w"))
    with open(os.path.join(out, "invocations.jsonl"), "a") as f:
        f.write(json.dumps({"end": time.time()}) + "\\n")
''')


@pytest.fixture
def fake_run(tmp_path):
    path = tmp_path / "fake_run.py"
    path.write_text(FAKE_RUN)
    return path


def invocations(run_dir):
    path = run_dir / "invocations.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def plan_names(*argv):
    return [job.name for job in script.plan(script.parse_args(["--runs-dir", "r", *argv]))]


def test_grid_and_names():
    configs = sweep.grid(RunConfig(epochs=3), model=["fc6", "c1"], lr=[0.1, 0.001], batch_size=[256, 16384],
                         seed=[0, 1, 2])
    assert len(configs) == 2 * 2 * 2 * 3
    assert configs[0] == RunConfig(epochs=3, model="fc6", lr=0.1, batch_size=256, seed=0)
    assert configs[1] == RunConfig(epochs=3, model="fc6", lr=0.1, batch_size=256, seed=1)
    assert configs[-1] == RunConfig(epochs=3, model="c1", lr=0.001, batch_size=16384, seed=2)
    assert sweep.grid(RunConfig(seed=4)) == [RunConfig(seed=4)]
    assert plan_names("--lrs", "0.1", "--seeds", "0")[0] == "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0"
    assert plan_names("--lrs", "0.1", "--seeds", "0", "--ghost-batch-size", "128", "--train-subset", "8192") == [
        "fashion_mnist-fc6-ce-sgd-lr0.1-b256-g128-n8192-s0"]


@pytest.mark.parametrize("axes, message", [
    ({"lr": [0.1, 0.1]}, r"lr repeats a value: \[0.1, 0.1\]"),
    ({"learning_rate": [0.1]}, "unknown RunConfig setting 'learning_rate'"),
    ({"seed": []}, "seed must be a non-empty list"),
    ({"model": "fc6"}, "model must be a non-empty list of values, got 'fc6'"),
])
def test_grid_refuses(axes, message):
    with pytest.raises(ValueError, match=message):
        sweep.grid(RunConfig(), **axes)


def test_plan_names_validates_and_refuses_one_name_twice(tmp_path):
    configs = sweep.grid(RunConfig(epochs=2), lr=[0.1, 0.001], seed=[0, 1])
    jobs = sweep.plan(configs, tmp_path)
    assert [job.name for job in jobs] == [default_run_name(c) for c in configs]
    assert [job.run_dir for job in jobs] == [tmp_path / default_run_name(c) for c in configs]
    assert [job.config for job in jobs] == configs
    assert jobs[0].command == sweep.train_command(configs[0], tmp_path / jobs[0].name)
    with pytest.raises(ValueError, match=r"^configuration 2: seed must be an integer from 0 to 4294967295"):
        sweep.plan([RunConfig(), RunConfig(seed=-1)], tmp_path)
    with pytest.raises(ValueError, match="^point b: unknown model 'resnet'"):
        sweep.plan([RunConfig(), RunConfig(model="resnet")], tmp_path, labels=["point a", "point b"])
    # lr 0.1 and 0.1000001 print alike (lr{:g}) in the name: one directory for two runs.
    with pytest.raises(ValueError, match="^configuration 1 and configuration 2 are the same run "
                                         "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0"):
        sweep.plan([RunConfig(lr=0.1), RunConfig(lr=0.1000001)], tmp_path)
    with pytest.raises(ValueError, match="2 labels for 1 configurations"):
        sweep.plan([RunConfig()], tmp_path, labels=["a", "b"])


def test_run_state(tmp_path):
    assert sweep.run_state(tmp_path / "none") == "missing"
    (tmp_path / "status.json").write_text('{"state": "diverged", "epoch": 1}')
    assert sweep.run_state(tmp_path) == "diverged"
    (tmp_path / "status.json").write_text('{"state": "runn')
    assert sweep.run_state(tmp_path) == "unreadable"
    (tmp_path / "status.json").write_text("[1, 2]")
    assert sweep.run_state(tmp_path) == "unreadable"
    (tmp_path / "status.json").write_text("{}")
    assert sweep.run_state(tmp_path) == "unknown"


def test_run_jobs_without_configuration_never_skips(tmp_path, capsys):
    # A job whose configuration is not known (a command of the user's own) is started even on a finished run:
    # its command decides. One whose config.json cannot be read is started too (run.py restores it or refuses).
    run_dir = tmp_path / "runs" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text('{"state": "finished"}')
    marker = tmp_path / "ran"
    job = sweep.Job("mine", [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"], run_dir)
    assert sweep.run_jobs([job], 1, tmp_path / "logs", poll=0.05) == {"mine": 0}
    assert marker.read_text() == "x"
    assert "[sweep] continue mine (finished; log: " in capsys.readouterr().out
    (run_dir / "config.json").write_text("{not json")
    assert sweep.run_jobs([job._replace(config=RunConfig())], 1, tmp_path / "logs", poll=0.05) == {"mine": 0}
    assert marker.read_text() == "xx"
    with pytest.raises(ValueError, match="parallel must be >= 1, got 0"):
        sweep.run_jobs([job], 0, tmp_path / "logs")
    with pytest.raises(ValueError, match="two jobs share a name: mine"):
        sweep.run_jobs([job, job._replace(run_dir=tmp_path / "other")], 1, tmp_path / "logs")
    with pytest.raises(ValueError, match="two jobs share a run directory: .*mine"):
        sweep.run_jobs([job, job._replace(name="yours", run_dir=tmp_path / "runs" / ".." / "runs" / "mine")], 1,
                       tmp_path / "logs")
    assert marker.read_text() == "xx"  # nothing was started


def test_progress_lines_say_what_is_done_running_and_left(tmp_path, capsys):
    """Jobs that write records as a run does: the progress lines name each running run's epoch and last training
    CE (torn lines and test records skipped), then the counts as runs end."""
    writer = ("import json, sys, time\n"
              "path = sys.argv[1] + '/metrics.jsonl'\n"
              "for step, ce in ((0, 2.5), (10, 0.75)):\n"
              "    with open(path, 'a') as f:\n"
              "        f.write(json.dumps({'epoch': step / 5, 'step': step, 'split': 'train', 'ce': ce}) + '\\n')\n"
              "        f.write(json.dumps({'epoch': step / 5, 'step': step, 'split': 'test', 'ce': 9.0}) + '\\n')\n"
              "with open(path, 'a') as f:\n"
              "    f.write('{\"epoch\": 3, \"spl')\n"
              "time.sleep(float(sys.argv[2]))\n")
    jobs = []
    for name, seconds in (("a", "2.0"), ("b", "1.2"), ("c", "0.1")):
        run_dir = tmp_path / name
        run_dir.mkdir()
        jobs.append(sweep.Job(name, [sys.executable, "-c", writer, str(run_dir), seconds], run_dir))
    assert sweep.run_jobs(jobs, 2, tmp_path / "logs", poll=0.05, progress_every=0.5) == {"a": 0, "b": 0, "c": 0}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sweep] progress: ")]
    assert "[sweep] progress: 0 done, 2 running (a: epoch 2, train CE 0.75; b: epoch 2, train CE 0.75), 1 left" in lines
    assert lines[-1] == "[sweep] progress: 3 done, 0 running, 0 left"
    assert sweep.last_train_record(tmp_path / "a")["ce"] == 0.75
    assert sweep.last_train_record(tmp_path / "missing") is None
    assert sweep.progress_line([], [("x", tmp_path / "missing")], 4) == "0 done, 1 running (x: starting), 4 left"


@pytest.mark.parametrize("extra, config", [
    ((), {}),
    (("--ghost-batch-size", "128", "--train-subset", "32768"), {"ghost_batch_size": 128, "train_subset": 32768}),
    (("--", "--loss", "gcdf@1"), {"loss": "gcdf@1"}),
    (("--", "--optimizer", "adam", "--loss", "hinge@0.5"), {"optimizer": "adam", "loss": "hinge@0.5"}),
])
def test_names_are_run_py_default_names(extra, config):
    # The sweep's configuration of a point is the one run.py builds from the same command line.
    args = script.parse_args(["--lrs", "0.001", "--batch-sizes", "16384", "--seeds", "2", *extra])
    expected = RunConfig(lr=0.001, batch_size=16384, seed=2, **config)
    (name, cmd, run_dir, planned), = script.plan(args)
    assert planned == expected
    assert name == default_run_name(expected) and run_dir.name == name
    run = load_script("run")
    assert run.config_from_args(run.build_parser().parse_args(cmd[2:])) == expected


def test_commands_parse_with_run_py(tmp_path):
    run = load_script("run")
    args = script.parse_args(["--epochs", "7", "--train-subset", "8192", "--target-train-loss", "0.3",
                              "--track-schedule", "log", "--", "--deterministic"])
    config = RunConfig(lr=0.001, batch_size=16384, seed=2)
    cmd = script.command(config, tmp_path / "r", args)
    assert cmd[:2] == [sys.executable, str(ROOT / "experiments" / "run.py")]
    parsed = run.build_parser().parse_args(cmd[2:])
    assert (parsed.model, parsed.lr, parsed.batch_size, parsed.ghost_batch_size, parsed.seed) == (
        "fc6", 0.001, 16384, 256, 2)
    assert (parsed.epochs, parsed.train_subset, parsed.target_train_loss, parsed.track_schedule) == (
        7, 8192, 0.3, "log")
    assert parsed.out == str(tmp_path / "r") and parsed.deterministic and parsed.no_progress


@pytest.mark.parametrize("flags, message", [
    (["--models", "resnet50"], "unknown model 'resnet50'"),
    (["--datasets", "imagenet"], "unknown dataset 'imagenet'"),
    (["--batch-sizes", "1000"], "--batch-size 1000 is not a multiple of --ghost-batch-size 256"),
    (["--lrs", "0.1", "-1"], "argument --lrs: must be a finite number > 0, got -1"),
    (["--jobs", "0"], "argument --jobs: must be a positive integer"),
    (["--train-subset", "100"], "smaller than one batch"),
    (["--train-subset", "100000"], "--train-subset 100000 is larger than fashion_mnist's training set (60000 "
                                   "examples) (--train-subset must be from 256 to 60000"),
    (["--seeds", "0", "-1"], "grid point fc6 fashion_mnist lr=0.1 batch=256 seed=-1: --seed must be an integer from 0 "
                             "to 4294967295"),
    (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data does not exist"),
    (["--", "--loss", "mse"], "unknown loss 'mse'"),
    (["--", "--loss", "gcdf@0"], "gradient is zero almost everywhere"),
    (["--", "--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--", "--learning-rate", "0.1"], "run.py: unrecognized arguments: --learning-rate 0.1"),
    (["--", "--out", "elsewhere"], "--out cannot be passed on"),
    (["--", "--strategy", "multiworker"], "--strategy multiworker cannot be passed on"),
    (["--", "--lr", "0.5"], "--lr cannot be passed on after --: the grid sets it (--lrs)"),
    (["--", "--se", "3"], "--seed cannot be passed on after --: the grid sets it (--seeds)"),
    (["--lrs", "0.1", "0.1"], "--lrs repeats a value: 0.1 0.1"),
])
def test_bad_flags_are_refused_before_tensorflow_or_any_process(flags, message, tmp_path, fake_run):
    runs = tmp_path / "runs"
    argv = ["--runs-dir", str(runs), "--seeds", "0", "--run-script", str(fake_run), *flags]
    assert_refused_before_tensorflow(ROOT / "experiments" / "sweep.py", argv, tmp_path, message)
    assert not runs.exists()  # no run directory, no log: nothing started


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    out = capsys.readouterr().out
    # The docstring as written (not re-wrapped), then each flag's default.
    assert "\n    python experiments/sweep.py --runs-dir runs/sweep --models fc6 --datasets fashion_mnist \\\n" in out
    text = " ".join(out.split())
    for default in ("(default: runs/sweep)", "(default: fc6)", "(default: fashion_mnist)", "(default: 0.1 0.001)",
                    "(default: 256)", "(default: 0 1 2)", "(default: 1)"):
        assert default in text
    assert "(default: None)" not in text


def test_dry_run_prints_every_command(capsys):
    assert script.main(["--lrs", "0.1", "0.001", "--batch-sizes", "256", "16384", "--seeds", "0", "1",
                       "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8
    assert all("experiments/run.py" in line for line in lines)


def run_sweep(tmp_path, fake_run, *extra, jobs=1):
    argv = ["--runs-dir", str(tmp_path / "runs"), "--lrs", "0.1", "0.001", "--seeds", "0", "1",
            "--epochs", "6", "--jobs", str(jobs), "--run-script", str(fake_run), *extra]
    return script.main(argv)


def test_sweep_runs_skips_and_resumes(tmp_path, fake_run, capsys):
    runs = tmp_path / "runs"
    finished = runs / "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0"
    finished.mkdir(parents=True)
    (finished / "status.json").write_text(json.dumps({"state": "finished", "epoch": 6, "step": 60}))
    (finished / "config.json").write_text(json.dumps(RunConfig(lr=0.1, seed=0, epochs=6).flags()))
    killed = runs / "fashion_mnist-fc6-ce-sgd-lr0.001-b256-s1"
    killed.mkdir(parents=True)
    (killed / "status.json").write_text(json.dumps({"state": "running", "epoch": 2, "step": 20}))
    # The finished one holds the settings asked and no metrics: it must be skipped, not run (and the summary leaves
    # it out).
    assert run_sweep(tmp_path, fake_run, "--no-hparams") == 0
    out = capsys.readouterr().out
    assert "skip fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0: finished" in out
    assert "resume fashion_mnist-fc6-ce-sgd-lr0.001-b256-s1" in out
    assert invocations(finished) == []
    for name in ("lr0.1-b256-s1", "lr0.001-b256-s0", "lr0.001-b256-s1"):
        assert len([i for i in invocations(runs / f"fashion_mnist-fc6-ce-sgd-{name}") if "start" in i]) == 1
    # A second sweep skips everything.
    assert run_sweep(tmp_path, fake_run, "--no-hparams") == 0
    assert capsys.readouterr().out.count("skip ") == 4
    assert len([i for i in invocations(runs / "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s1") if "start" in i]) == 1
    assert (runs / "logs" / "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s1.log").read_text().startswith("$ ")


def test_loss_and_optimizer_passed_on_name_and_group_the_runs(tmp_path, fake_run):
    runs = tmp_path / "runs"
    assert run_sweep(tmp_path, fake_run, "--no-hparams") == 0
    assert run_sweep(tmp_path, fake_run, "--no-hparams", "--summary-dir", str(tmp_path / "gcdf"),
                     "--", "--loss", "gcdf@1", "--optimizer", "adam") == 0
    settings = {"ce-sgd": ("ce", "sgd"), "gcdf1-adam": ("gcdf@1", "adam")}
    expected = {f"fashion_mnist-fc6-{setting}-lr{lr}-b256-s{seed}"
                for setting in settings for lr in ("0.1", "0.001") for seed in (0, 1)}
    assert {p.name for p in runs.glob("fashion_mnist-*")} == expected
    for name in expected:
        config = json.loads((runs / name / "config.json").read_text())
        assert (config["loss"], config["optimizer"]) == settings["gcdf1-adam" if "gcdf1-adam" in name else "ce-sgd"]
        # The gcdf/adam sweep ran its own runs: it neither skipped nor resumed a CE/SGD one.
        assert len([i for i in invocations(runs / name) if "start" in i]) == 1
    # The second sweep's summary holds its four runs: two seeds per learning rate.
    rows = list(csv.DictReader((tmp_path / "gcdf" / "summary.csv").open()))
    assert sorted(r["run"] for r in rows) == sorted(n for n in expected if "gcdf1-adam" in n)
    assert {(r["loss"], r["optimizer"]) for r in rows} == {("gcdf@1", "adam")}
    markdown = (tmp_path / "gcdf" / "summary.md").read_text()
    assert "| lr=0.1 | 2 |" in markdown and "| lr=0.001 | 2 |" in markdown
    # All eight summarized together: four groups of two seeds, and lrs compared within a loss and optimizer.
    everything = analysis.load_runs([runs])
    groups = analysis.group_runs(everything)
    assert sorted((g.label, g.seeds) for g in groups) == [
        ("adam gcdf@1 lr=0.001", [0, 1]), ("adam gcdf@1 lr=0.1", [0, 1]),
        ("sgd ce lr=0.001", [0, 1]), ("sgd ce lr=0.1", [0, 1])]
    pairs = analysis.extreme_pairs(groups)
    assert sorted(what for _, _, what in pairs) == [
        "fc6 fashion_mnist adam gcdf@1 batch=256: lr 0.1 vs 0.001",
        "fc6 fashion_mnist sgd ce batch=256: lr 0.1 vs 0.001"]
    for a, b, _ in pairs:
        assert (a.config["loss"], a.config["optimizer"]) == (b.config["loss"], b.config["optimizer"])
        assert (a.config["lr"], b.config["lr"]) == (0.1, 0.001)
    markdown = analysis.summary_markdown(everything, 0.5)
    assert "| adam gcdf@1 lr=0.1 | 2 |" in markdown and "| sgd ce lr=0.1 | 2 |" in markdown


def test_parallel_jobs_overlap_but_never_exceed(tmp_path, fake_run, monkeypatch):
    monkeypatch.setenv("FAKE_RUN_SECONDS", "1.5")
    assert run_sweep(tmp_path, fake_run, "--no-hparams", "--summary-only") == 1  # nothing run yet: nothing to summarize
    assert not any((tmp_path / "runs").glob("*/invocations.jsonl"))
    assert run_sweep(tmp_path, fake_run, "--no-hparams", jobs=2) == 0
    spans = []
    for run_dir in (tmp_path / "runs").glob("fashion_mnist-*"):
        calls = invocations(run_dir)
        spans.append((calls[0]["start"], calls[-1]["end"]))
    assert len(spans) == 4
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level, peak = 0, 0
    for _, change in events:
        level += change
        peak = max(peak, level)
    assert peak == 2


def test_a_finished_run_asked_with_other_settings_goes_to_run_py(tmp_path, fake_run, capsys):
    runs = tmp_path / "runs"
    assert run_sweep(tmp_path, fake_run, "--no-hparams") == 0
    capsys.readouterr()
    # More epochs: run.py (which continues such a run) is started for every run, and the sweep says why.
    assert run_sweep(tmp_path, fake_run, "--no-hparams", "--epochs", "8") == 0
    out = capsys.readouterr().out
    name = "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0"
    assert (f"[sweep] continue {name} (finished, asked with --epochs 8 (was 6); log: {runs / 'logs' / name}.log)"
            in out)
    assert out.count("[sweep] continue ") == 4 and "skip " not in out
    assert len([i for i in invocations(runs / name) if "start" in i]) == 2
    # The settings asked now are those stored: skipped. A setting that defines the run: run.py is started (the
    # real one refuses the directory, which the sweep reports as a failed run).
    assert run_sweep(tmp_path, fake_run, "--no-hparams", "--epochs", "8") == 0
    assert capsys.readouterr().out.count("skip ") == 4
    assert run_sweep(tmp_path, fake_run, "--no-hparams", "--epochs", "8", "--track-schedule", "log") == 0
    assert "asked with --track-schedule log (was epoch)" in capsys.readouterr().out


def test_ctrl_c_stops_the_runs_and_the_sweep_with_one_line(tmp_path, fake_run):
    import signal
    import time

    runs = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--runs-dir", str(runs), "--lrs", "0.1", "0.001",
         "--seeds", "0", "--jobs", "2", "--epochs", "3", "--run-script", str(fake_run), "--no-hparams"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "FAKE_RUN_SECONDS": "60"})
    deadline = time.time() + 60
    while time.time() < deadline and len(list(runs.glob("*/invocations.jsonl"))) < 2:
        time.sleep(0.1)
    assert len(list(runs.glob("*/invocations.jsonl"))) == 2, "the runs did not start"
    started = time.time()
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the sweep and its runs
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and time.time() - started < 30
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"[sweep] interrupted: rerun the same command to go on (finished runs are skipped, the others resume from "
        f"their last checkpoint; logs in {runs / 'logs'})"]
    assert out.count("[sweep] stopped ") == 2


def test_summary_csv_markdown_and_hparams(tmp_path, fake_run):
    assert run_sweep(tmp_path, fake_run, "--batch-sizes", "256", "4096", "--level", "0.5") == 0
    runs = tmp_path / "runs"
    rows = list(csv.DictReader((runs / "summary.csv").open()))
    assert len(rows) == 8 and all(r["reached"] == "True" for r in rows)
    row = next(r for r in rows if r["run"] == "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0")
    # ce(epoch) = 2.3 exp(-0.7 epoch): 0.5 is crossed at epoch log(4.6) / 0.7.
    assert float(row["epoch_at_level"]) == pytest.approx(math.log(4.6) / 0.7, rel=1e-9)
    # The summary's values are analysis.at_level's (whose interpolation tests/test_analysis.py checks).
    point = analysis.at_level(analysis.load_run(runs / row["run"]), 0.5)
    assert float(row["gcdf@8"]) == pytest.approx(point.values["gcdf@8"], rel=1e-9)
    markdown = (runs / "summary.md").read_text()
    assert "# Sweep summary at training CE = 0.5" in markdown
    # lr 0.1 at batch 256 is lower at large sigma, higher at small: a crossover at sigma = 1 exactly.
    for what in ("batch=256: lr 0.1 vs 0.001", "lr=0.1: batch 256 vs 4096"):
        cells = next(x for x in markdown.splitlines() if f"{what} | gcdf" in x).split(" | ")
        assert (cells[2], cells[5], cells[6], cells[9], cells[10], cells[11]) == (
            "σ=0.5", "b", "σ=8", "a", "1", "s0: 1; s1: 1 |")
    # TensorBoard hparams: the experiment config and one session per run with its metrics.
    from tensorboard.backend.event_processing import event_accumulator

    assert list((runs / "hparams").glob("events.out.tfevents.*"))
    session = event_accumulator.EventAccumulator(str(runs / "hparams" / row["run"]),
                                                 size_guidance={event_accumulator.TENSORS: 0})
    session.Reload()
    tags = session.Tags()["tensors"]
    assert "_hparams_/session_start_info" in tags and "at_level/gcdf@8" in tags
    from tensorboard.util import tensor_util

    value = float(tensor_util.make_ndarray(session.Tensors("at_level/gcdf@8")[0].tensor_proto))
    assert value == pytest.approx(float(row["gcdf@8"]), rel=1e-5)
    # A summary at another level of part of the grid replaces the dashboard: no session of the first stays.
    assert script.main(["--runs-dir", str(runs), "--lrs", "0.1", "--seeds", "0", "1", "--batch-sizes", "256",
                       "--epochs", "6", "--summary-only", "--level", "1"]) == 0
    assert sorted(p.name for p in (runs / "hparams").iterdir() if p.is_dir()) == [
        "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0", "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s1"]
    assert len(list((runs / "hparams").glob("events.out.tfevents.*"))) == 1
    config = event_accumulator.EventAccumulator(str(runs / "hparams"), size_guidance={event_accumulator.TENSORS: 0})
    config.Reload()
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData.FromString(
        config.SummaryMetadata("_hparams_/experiment").plugin_data.content)
    names = {m.display_name for m in content.experiment.metric_infos}
    assert "at_level/gcdf@8 (train CE 1)" in names
    assert not (runs / ".hparams.writing").exists()


def test_summary_without_tensorflow_says_the_hparams_are_not_written(tmp_path, fake_run, capsys, monkeypatch):
    assert run_sweep(tmp_path, fake_run, "--no-hparams") == 0
    capsys.readouterr()
    find_spec = sweep.importlib.util.find_spec
    monkeypatch.setattr(sweep.importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow"
                        else find_spec(name, *a))
    run_dirs = sorted((tmp_path / "runs").glob("fashion_mnist-*"))
    assert sweep.summarize(run_dirs, tmp_path / "out", level=0.5) == 0.5
    out = capsys.readouterr().out
    assert "[sweep] hparams logs not written: TensorBoard's hparams summaries need TensorFlow" in out
    assert (tmp_path / "out" / "summary.md").exists() and not (tmp_path / "out" / "hparams").exists()


def test_summary_dir(tmp_path, fake_run):
    assert run_sweep(tmp_path, fake_run, "--no-hparams", "--summary-dir", str(tmp_path / "report")) == 0
    assert (tmp_path / "report" / "summary.md").exists() and (tmp_path / "report" / "summary.csv").exists()
    assert not (tmp_path / "runs" / "summary.md").exists()


def test_summary_only_names_the_grid_points_it_lacks(tmp_path, fake_run, capsys):
    # Runs of lr 0.1 and 0.01; the default grid is lr 0.1 and 0.001: the 0.001 points are named, the 0.01 runs
    # are mentioned as outside the grid, and the lr 0.1 group is summarized.
    assert run_sweep(tmp_path, fake_run, "--no-hparams", "--lrs", "0.1", "0.01") == 0
    capsys.readouterr()
    runs = tmp_path / "runs"
    (runs / "summary.md").unlink()
    assert script.main(["--runs-dir", str(runs), "--seeds", "0", "1", "--summary-only", "--no-hparams"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "[sweep] 2 of the grid's 4 points are not in the summary (no run directory: "
        "fashion_mnist-fc6-ce-sgd-lr0.001-b256-s0, fashion_mnist-fc6-ce-sgd-lr0.001-b256-s1); "
        f"{runs} also holds 2 run(s) outside this grid (fashion_mnist-fc6-ce-sgd-lr0.01-b256-s0, "
        "fashion_mnist-fc6-ce-sgd-lr0.01-b256-s1), left out too")
    assert out[1].startswith("[sweep] summary at training CE ")
    rows = list(csv.DictReader((runs / "summary.csv").open()))
    assert sorted(r["run"] for r in rows) == ["fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0",
                                              "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s1"]


def test_summary_only_with_no_run_of_the_grid_says_what_is_there(tmp_path, fake_run, capsys):
    # Runs made with --train-subset 2048 are named ...-n2048-...: a grid without it names none of them.
    assert run_sweep(tmp_path, fake_run, "--no-hparams", "--train-subset", "2048") == 0
    capsys.readouterr()
    runs = tmp_path / "runs"
    (runs / "summary.md").unlink()
    assert script.main(["--runs-dir", str(runs), "--lrs", "0.1", "0.001", "--seeds", "0", "1", "--summary-only",
                       "--no-hparams"]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(
        f"[sweep] error: nothing to summarize: none of the grid's 4 run(s) has metrics in {runs} (no run directory: "
        "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0, ")
    assert (f"{runs} holds 4 other run directories: fashion_mnist-fc6-ce-sgd-lr0.001-b256-n2048-s0, "
            "fashion_mnist-fc6-ce-sgd-lr0.001-b256-n2048-s1, fashion_mnist-fc6-ce-sgd-lr0.1-b256-n2048-s0, "
            "fashion_mnist-fc6-ce-sgd-lr0.1-b256-n2048-s1.") in errors[0]
    assert "must be the ones the runs were made with" in errors[0]
    assert not (runs / "summary.md").exists()
    # With the flags they were made with, they are summarized.
    assert script.main(["--runs-dir", str(runs), "--lrs", "0.1", "0.001", "--seeds", "0", "1", "--train-subset", "2048",
                       "--summary-only", "--no-hparams"]) == 0
    assert (runs / "summary.md").exists()
    # A --runs-dir that does not exist is said so (and nothing is created).
    assert script.main(["--runs-dir", str(tmp_path / "elsewhere"), "--summary-only"]) == 1
    assert f"{tmp_path / 'elsewhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


def test_summary_at_a_level_no_run_reaches_fails_and_writes_nothing(tmp_path, fake_run, capsys):
    # The fake runs' CE comes down to about 0.03: none reaches 0.001.
    assert run_sweep(tmp_path, fake_run, "--no-hparams") == 0
    runs = tmp_path / "runs"
    lowest = min(analysis.load_run(path).splits["train"]["ce"].min() for path in runs.glob("fashion_mnist-*"))
    (runs / "summary.md").unlink()
    (runs / "summary.csv").unlink()
    capsys.readouterr()
    assert script.main(["--runs-dir", str(runs), "--seeds", "0", "1", "--summary-only", "--level", "0.001"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"[sweep] error: cannot summarize the grid's 4 run(s) with metrics: none of the 4 run(s) "
                      f"reaches a training CE of 0.001 (the lowest any reaches is {lowest:.6g}): "
                      "choose a higher level or train longer"]
    assert not any((runs / name).exists() for name in ("summary.md", "summary.csv", "hparams"))


def test_failed_run_is_reported(tmp_path, fake_run, capsys):
    code = script.main(["--runs-dir", str(tmp_path / "runs"), "--seeds", "99", "--lrs", "0.1", "--epochs", "3",
                       "--run-script", str(fake_run), "--no-hparams"])
    assert code == 1
    assert "1 run(s) failed" in capsys.readouterr().err


def test_library_sweep_trains_skips_and_summarizes(tmp_path, capsys):
    # The library's own command (python -m keras_implicit.sweep) trains for real, as run.py would.
    configs = sweep.grid(RunConfig(epochs=1, train_subset=512), lr=[0.1, 0.01])
    jobs = sweep.plan(configs, tmp_path / "runs")
    assert jobs[0].command[1:3] == ["-m", "keras_implicit.sweep"]
    assert sweep.run_jobs(jobs, 2, tmp_path / "runs" / "logs", poll=0.1) == {job.name: 0 for job in jobs}
    for job in jobs:
        assert sweep.run_state(job.run_dir) == "finished"
        assert json.loads((job.run_dir / "config.json").read_text())["lr"] == job.config.lr
        log = (tmp_path / "runs" / "logs" / f"{job.name}.log").read_text()
        assert log.startswith("$ ") and f"finished {job.run_dir}: " in log
    capsys.readouterr()
    # Asked again: both skipped; asked for another epoch: both continued, and trained to epoch 2.
    assert sweep.run_jobs(jobs, 2, tmp_path / "runs" / "logs", poll=0.1) == {job.name: None for job in jobs}
    assert capsys.readouterr().out.count("[sweep] skip ") == 2
    more = sweep.plan(sweep.grid(RunConfig(epochs=2, train_subset=512), lr=[0.1, 0.01]), tmp_path / "runs")
    assert sweep.run_jobs(more[:1], 1, tmp_path / "runs" / "logs", poll=0.1) == {more[0].name: 0}
    assert "asked with epochs 2 (was 1)" in capsys.readouterr().out
    assert json.loads((more[0].run_dir / "status.json").read_text())["epoch"] == 2
    level = sweep.summarize([job.run_dir for job in jobs], tmp_path / "summary", hparams=False)
    runs = analysis.load_runs([job.run_dir for job in jobs])
    assert level == pytest.approx(analysis.common_level(runs))
    rows = list(csv.DictReader((tmp_path / "summary" / "summary.csv").open()))
    assert sorted(r["run"] for r in rows) == sorted(job.name for job in jobs)


def test_library_worker_refuses_bad_settings(tmp_path):
    for config, message in (('{"lr": -1}', "error: the learning rate must be a finite number > 0, got -1"),
                            ('{"learning_rate": 1}', "--config: unknown setting learning_rate"),
                            ("[1]", "--config: not a JSON object")):
        result = subprocess.run([sys.executable, "-m", "keras_implicit.sweep", "--out", str(tmp_path / "r"),
                                 "--config", config], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_sweep_with_the_real_run_py(tmp_path):
    env = {**os.environ, "KERAS_IMPLICIT_PURE_TF": os.environ.get("KERAS_IMPLICIT_PURE_TF", "0")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--runs-dir", str(tmp_path / "runs"),
         "--lrs", "0.1", "0.01", "--seeds", "0", "--epochs", "2", "--train-subset", "1024", "--jobs", "2",
         "--no-hparams"],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader((tmp_path / "runs" / "summary.csv").open()))
    assert len(rows) == 2 and {r["state"] for r in rows} == {"finished"}


def test_export_run_copies_an_ended_runs_records_and_on_done_hears_each_end(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"lr": 0.1}')
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "split": "train", "ce": 2.0}\n')
    (run_dir / "checkpoint.npz").write_bytes(b"big")
    (run_dir / "status.json").write_text('{"state": "running", "epoch": 1, "step": 3}')
    assert sweep.export_run(run_dir, tmp_path / "data") is None  # not ended: nothing copied
    assert not (tmp_path / "data").exists()
    (run_dir / "status.json").write_text('{"state": "finished", "epoch": 2, "step": 6}')
    copy = sweep.export_run(run_dir, tmp_path / "data")
    assert copy == tmp_path / "data" / "r1" and sorted(p.name for p in copy.iterdir()) == [
        "config.json", "metrics.jsonl", "status.json"]
    assert (copy / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text("")
    sweep.export_run(run_dir, tmp_path / "data")  # replaces the older copy
    assert (copy / "metrics.jsonl").read_text() == ""
    heard = []
    jobs = [sweep.Job(name, [sys.executable, "-c", f"raise SystemExit({code})"], tmp_path / name)
            for name, code in (("ok", 0), ("bad", 3))]
    sweep.run_jobs(jobs, 2, tmp_path / "logs", poll=0.05, on_done=lambda job, code: heard.append((job.name, code)))
    assert sorted(heard) == [("bad", 3), ("ok", 0)]
