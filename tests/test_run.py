"""experiments/run.py: flags, end-to-end runs (IDX fixture, mocked tensorflow-datasets), kill -9 and resume."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from keras_implicit.training import RunDirectory
from tests.runs import assert_refused_before_tensorflow, kill_9_after_the_first_epoch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "run.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("experiments_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_script = _load_script()


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _status(run_dir):
    with open(os.path.join(run_dir, "status.json")) as handle:
        return json.load(handle)


def _cli(args, timeout=240):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--loss", "mse"], "unknown loss 'mse'"),
    (["--loss", "tce@0"], "parameter must be finite and > 0"),
    (["--batch-size", "1000"], "not a multiple of --ghost-batch-size 256"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
    (["--lr", "-0.1"], "--lr: must be a finite number > 0"),
    (["--lr", "fast"], "--lr: 'fast' is not a number"),
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--track-schedule", "cosine"], "unknown tracking schedule 'cosine'"),
    (["--train-subset", "100"], "smaller than one batch"),
    (["--train-subset", "100000"], "--train-subset 100000 is larger than fashion_mnist's training set (60000 "
                                   "examples) (--train-subset must be from 256 to 60000 for fashion_mnist with "
                                   "--batch-size 256)"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295"),
    (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data does not exist"),
    (["--learning-rate", "0.1"], "unrecognized arguments"),
    (["--noisy-error-draws", "1"], "--noisy-error-draws: must be 0 (off) or at least 2"),
    (["--noisy-error-draws", "many"], "--noisy-error-draws: 'many' is not an integer"),
    (["--gradient-penalty", "-0.1"], "--gradient-penalty: must be a finite number >= 0 (0: off)"),
    (["--sam-radius", "inf"], "--sam-radius: must be a finite number >= 0"),
    (["--gradient-penalty", "0.1", "--sam-radius", "0.05"], "--gradient-penalty and --sam-radius are two explicit "
                                                            "regularizers: give one of them"),
    (["--loss", "trh"], "trh is a penalty on the top layer's curvature, not an objective by itself"),
])
def test_bad_flags_fail_before_any_work(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        run_script.main([*flags, "--out", str(out)])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--loss", "mse"], "unknown loss 'mse'"),
    (["--loss", "gcdf@0"], "must be finite and > 0 (σ = 0 counts the classes beating the true one: its gradient "
                           "is zero almost everywhere"),
    (["--loss", "tce@0"], "must be finite and > 0"),
    (["--loss", "hinge@-1"], "must be finite and >= 0"),
    (["--loss", "ce+0.1*"], "loss 'ce+0.1*': an empty term"),
    (["--loss", "ce+lots*gcdf@4"], "the weight 'lots' is not a number"),
    (["--loss", "0.1*trh"], "not an objective by itself: add it to a loss (e.g. ce+0.1*trh)"),
    (["--sam-radius", "-1"], "--sam-radius: must be a finite number >= 0"),
    (["--batch-size", "1000"], "not a multiple of --ghost-batch-size 256"),
    (["--lr", "-1"], "--lr: must be a finite number > 0"),
    (["--track-schedule", "cosine"], "unknown tracking schedule 'cosine'"),
    (["--train-subset", "100"], "smaller than one batch"),
    (["--train-subset", "100000"], "--train-subset 100000 is larger than fashion_mnist's training set"),
    (["--dataset", "mnist", "--train-subset", "60000"], "largest class-balanced subset of mnist's training set "
                                                        "(54215 of its 60000 examples"),
    (["--dataset", "cifar10", "--batch-size", "65536"], "--batch-size 65536 is larger than cifar10's training set"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295 (2**32 - 1, what NumPy and Keras take as a "
                       "seed), got -1"),
    (["--seed", "4294967296"], "got 4294967296"),
    (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data does not exist: give the directory that holds "
                                          "the dataset's files"),
])
def test_bad_flags_are_refused_before_tensorflow_is_imported(flags, message, tmp_path):
    # run.py's main in a fresh interpreter: after the refusal, neither TensorFlow nor Keras has been imported.
    out = tmp_path / "run"
    assert_refused_before_tensorflow(SCRIPT, [*flags, "--out", str(out)], tmp_path, message)
    assert not out.exists()


@pytest.mark.parametrize("flags, env, source", [(["--backend", "torch"], {}, "--backend"),
                                                (["--backend", "numpy"], {}, "--backend"),
                                                ([], {"KERAS_BACKEND": "torch"}, "KERAS_BACKEND")])
def test_an_unsupported_backend_is_refused_in_one_line_before_anything_is_imported(flags, env, source, tmp_path):
    out = tmp_path / "run"
    backend = flags[1] if flags else env["KERAS_BACKEND"]
    assert_refused_before_tensorflow(SCRIPT, [*flags, "--out", str(out)], tmp_path,
                                     f"the Keras backend '{backend}' ({source}) is not supported: keras-implicit runs "
                                     "on tensorflow and jax", env=env)
    assert not out.exists()


def test_overwrite_refuses_a_directory_that_is_not_a_run_and_removes_nothing(tmp_path, capsys):
    """--out DIR --overwrite on a folder of a user's files: refused, nothing removed, and the first refusal
    (without --overwrite) does not suggest --overwrite."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "important.txt").write_text("keep")
    (mine / "sub" / "notes.md").write_text("keep too")
    assert run_script.main(["--out", str(mine), "--epochs", "1"]) == 1
    error = capsys.readouterr().err
    assert f"{mine} is not a run directory (it holds important.txt, sub/): use --out for another directory" \
        in error and "--overwrite" not in error
    assert run_script.main(["--out", str(mine), "--epochs", "1", "--overwrite"]) == 1
    assert "holds files that are not a run's (important.txt, sub/): nothing was removed" in capsys.readouterr().err
    assert (mine / "important.txt").read_text() == "keep" and (mine / "sub" / "notes.md").read_text() == "keep too"


def test_hinge_at_zero_margin_trains(idx_dir, tmp_path, capsys):
    # hinge@0 (the multi-class perceptron loss) is allowed, unlike gcdf@0: its gradient is nonzero on every
    # misclassified example, so training lowers the error (though its minimum is also reached at s = 0).
    # In this process (the command line itself is run in a child by the end-to-end test below).
    out = str(tmp_path / "run")
    code = run_script.main(["--loss", "hinge@0", "--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "2",
                            "--batch-size", "128", "--ghost-batch-size", "128", "--lr", "0.01", "--out", out])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert json.load(open(os.path.join(out, "config.json")))["loss"] == "hinge@0"
    train = [r for r in _records(out) if r["split"] == "train"]
    assert train[-1]["error"] < 0.7 * train[0]["error"]  # measured here: 93 % -> 46 % in 18 steps


def test_end_to_end_on_an_idx_fixture_then_rerun(idx_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "2", "--batch-size", "128",
            "--ghost-batch-size", "64", "--out", out]
    done = _cli(args)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines[:3]] == ["epoch 0/2", "epoch 1/2", "epoch 2/2"]
    assert "train ce" in lines[2] and "test ce" in lines[2] and lines[-1].startswith(f"finished {out}")
    assert _status(out) == {"state": "finished", "epoch": 2, "step": 18, "message": "2 epochs"}
    assert [r["step"] for r in _records(out)] == [0, 0, 9, 9, 18, 18]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["batch_size"] == 128 and config["ghost_batch_size"] == 64 and config["dataset"] == "mnist"

    capsys.readouterr()
    assert run_script.main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(_records(out)) == 6

    # Another configuration in the same directory: the library's error, in the script's words.
    capsys.readouterr()
    assert run_script.main([*args, "--lr", "0.05"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "lr: 0.1 there, 0.05 asked" in error
    assert "use --overwrite to replace it or --out for another directory" in error and "overwrite=True" not in error

    # Fewer epochs than trained: refused, config.json untouched (it still says what metrics.jsonl holds).
    config_before = open(os.path.join(out, "config.json")).read()
    assert run_script.main([*args, "--epochs", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {out} has trained 2 epochs (step 18), more than the 1 asked")
    assert "ask for --epochs 2 or more" in error and "use --overwrite to start again" in error
    assert open(os.path.join(out, "config.json")).read() == config_before

    # A target the records already went below (at step 9): reported there, not at the checkpoint's step 18.
    train_ce = {r["step"]: r["ce"] for r in _records(out) if r["split"] == "train"}
    assert train_ce[0] > train_ce[9] * 1.01
    target = f"{train_ce[9] * 1.01:.6g}"
    assert run_script.main([*args, "--target-train-loss", target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == (f"finished {out}: target train loss {float(target)} reached at step 9 (epoch 1); the run "
                         "goes on to step 18 (epoch 2), trained before this target was asked for")
    assert _status(out)["step"] == 18 and len(_records(out)) == 6


def test_library_settings_read_as_flags():
    assert run_script.as_flags("rerun with overwrite=True to start again") == "rerun with --overwrite to start again"
    assert run_script.as_flags("or another run_dir") == "or --out for another directory"
    assert run_script.as_flags("resume it with KERAS_BACKEND=jax") == "resume it with --backend jax"
    assert run_script.as_flags("ghost_batch_size 256; cpu_replicas") == "--ghost-batch-size 256; --cpu-replicas"
    assert run_script.as_flags("ask for epochs=3 or more") == "ask for --epochs 3 or more"
    assert run_script.as_flags("train_subset 9 (batch_size 8).") == "--train-subset 9 (--batch-size 8)."
    # Not inside a path or a longer name.
    for text in ("/data/data_dir/x holds", "runs/data_dir does", "my_train_subset", "/tmp/test_data_dir_a/empty",
                 "/x/data_dir.bak", "noise_seed must"):
        assert run_script.as_flags(text) == text
    assert run_script.as_flags("data_dir /data/data_dir/x: leave data_dir out") == (
        "--data-dir /data/data_dir/x: leave --data-dir out")


def test_kill_9_and_resume_equals_an_uninterrupted_run(idx_dir, tmp_path, capsys):
    # 640 of the fixture's examples, 3 epochs of 20 steps: killed in epoch 2, resumed for two epochs.
    args = ["--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "3", "--batch-size", "32",
            "--ghost-batch-size", "32", "--train-subset", "640", "--track-every", "5", "--deterministic",
            "--no-progress"]
    killed = str(tmp_path / "killed")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen([sys.executable, SCRIPT, *args, "--out", killed], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    kill_9_after_the_first_epoch(process, killed, timeout=180)
    before = _records(killed)

    capsys.readouterr()
    assert run_script.main([*args, "--out", killed]) == 0
    assert capsys.readouterr().out.startswith(f"resuming {killed} from epoch ")
    after = _records(killed)
    assert len(before) < len(after)
    steps = [(r["step"], r["split"]) for r in after]
    assert len(steps) == len(set(steps))  # nothing logged twice
    assert _status(killed)["state"] == "finished"

    # The uninterrupted run, in this process: the same records bit for bit (with --deterministic).
    whole = str(tmp_path / "whole")
    assert run_script.main([*args, "--out", whole]) == 0
    assert after == _records(whole)


def test_a_damaged_checkpoint_costs_one_epoch_and_a_warning(idx_dir, tmp_path, capsys):
    args = ["--dataset", "mnist", "--data-dir", idx_dir, "--batch-size", "128", "--ghost-batch-size", "64",
            "--track-every", "4", "--deterministic", "--no-progress"]
    out = str(tmp_path / "run")
    assert run_script.main([*args, "--epochs", "2", "--out", out]) == 0
    checkpoint = os.path.join(out, "checkpoint.npz")
    content = open(checkpoint, "rb").read()
    open(checkpoint, "wb").write(content[: len(content) // 2])  # truncated on disk

    done = _cli([*args, "--epochs", "3", "--out", out])
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{checkpoint} is unreadable (BadZipFile" in warnings[0], done.stderr[-2000:]
    assert "resuming from" in warnings[0] and "checkpoint.prev.npz (epoch 1, step 9)" in warnings[0]
    assert "Traceback" not in done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"finished {out}: 3 epochs, step 27")

    whole = str(tmp_path / "whole")
    assert run_script.main([*args, "--epochs", "3", "--out", whole]) == 0
    records = _records(out)
    assert records == _records(whole)
    assert records[-1]["step"] == 27


@pytest.mark.parametrize("dataset, model", [("mnist", "fc6"), ("cifar10", "c1")])
def test_tensorflow_datasets_path_end_to_end(dataset, model, tmp_path, capsys):
    import tensorflow_datasets as tfds

    out = str(tmp_path / "run")
    (tmp_path / "tfds").mkdir()  # a data_dir that is given must exist (tensorflow-datasets downloads into it)
    with tfds.testing.mock_data(num_examples=64):
        code = run_script.main(["--dataset", dataset, "--model", model, "--data-dir", str(tmp_path / "tfds"),
                                "--epochs", "1", "--batch-size", "32", "--ghost-batch-size", "16", "--out", out])
    assert code == 0
    assert _status(out)["state"] == "finished"
    records = _records(out)
    assert [(r["step"], r["split"]) for r in records] == [(0, "train"), (0, "test"), (2, "train"), (2, "test")]
    assert "epoch 1/1" in capsys.readouterr().out
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["dataset"], config["model"], config["batch_size"], config["ghost_batch_size"]) == (
        dataset, model, 32, 16)


def test_a_data_dir_without_the_files_is_refused_before_training(tmp_path, capsys, offline_tfds):
    # Not replaced by /usr/share/datasets/fashion-mnist (config.json would record a data_dir the data did not come
    # from); offline (made so here), tensorflow-datasets cannot download it into the directory either.
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    capsys.readouterr()
    assert run_script.main(["--data-dir", str(empty), "--train-subset", "1024", "--epochs", "1", "--out",
                            str(out)]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: fashion_mnist is not on this machine (--data-dir "
                                                     f"{empty} does not hold fashion_mnist's files")
    assert not out.exists()  # the run could not start: no directory left behind


def test_a_locked_directory_is_refused(idx_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    with RunDirectory(out):
        code = run_script.main(["--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "1", "--out", out])
    assert code == 1
    assert "in use by another process" in capsys.readouterr().err


def test_divergence_exits_non_zero_with_one_line(idx_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    code = run_script.main(["--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "2", "--lr", "1e30",
                            "--out", out])
    assert code == 3
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "diverged in epoch 1" in error_lines[0]
    assert _status(out)["state"] == "diverged"
    assert [r["step"] for r in _records(out)] == [0, 0]


def test_default_output_directory_name(idx_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = run_script.main(["--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "1", "--train-subset", "512",
                            "--no-progress"])
    assert code == 0
    assert os.listdir(tmp_path / "runs") == ["mnist-fc6-ce-sgd-lr0.1-b256-n512-s0"]


@pytest.mark.parametrize("checkpoint", [None, "checkpoint.npz", "checkpoint.prev.npz"])
def test_ctrl_c_promises_a_resume_only_where_there_is_a_checkpoint(checkpoint, tmp_path, monkeypatch, capsys):
    from keras_implicit import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    out = tmp_path / "run"
    if checkpoint:
        out.mkdir()
        (out / checkpoint).write_bytes(b"")
    assert run_script.main(["--out", str(out), "--epochs", "1"]) == 130
    expected = (f"interrupted: rerun the same command to resume {out} from its last completed epoch" if checkpoint
                else f"interrupted before {out} held a checkpoint: rerun the same command to start it")
    assert capsys.readouterr().err.strip().splitlines() == [expected]
