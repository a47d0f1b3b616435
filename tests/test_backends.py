"""The protocol on the JAX backend: run.py end to end, kill -9 and resume, ghost batches, no TensorFlow.

Keras picks its backend once per process, so each case runs in a child process with KERAS_BACKEND=jax (the
formula, panel, metric and tracker tests themselves run on JAX in a second pytest session: see .ci/run).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

from tests.runs import kill_9_after_the_first_epoch, read_json, read_records, tensorboard_points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "run.py")

# run.py's main in a child where TensorFlow cannot be imported (as on the GPU machines, which have JAX but
# no TensorFlow; Keras' own set_random_seed imports TensorFlow whenever it is installed), then whether
# anything imported it (a REPORT line); for each list of flags in the JSON list argv[2], one run after another.
RUN_AND_REPORT = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, NoTensorFlow())
    spec = importlib.util.spec_from_file_location("run", sys.argv[1])
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    for args in json.loads(sys.argv[2]):
        code = run.main(args)
        print("REPORT " + json.dumps({"code": code, "tensorflow": "tensorflow" in sys.modules}), flush=True)
    """
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT, **extra}


def _run_each(*arg_lists, timeout=300):
    """run.py's main on each of ``arg_lists`` in turn, in one child: [(report, the lines it printed), ...]."""
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, SCRIPT, json.dumps(arg_lists)],
                          capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results, lines = [], []
    for line in done.stdout.splitlines():
        if line.startswith("REPORT "):
            results.append((json.loads(line[len("REPORT "):]), lines))
            lines = []
        else:
            lines.append(line)
    assert len(results) == len(arg_lists) and not lines, done.stdout[-3000:]
    return results


def _run(args, timeout=300):
    return _run_each(args, timeout=timeout)[0]


def test_run_py_on_jax_end_to_end_without_tensorflow(idx_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    args = ["--backend", "jax", "--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "2", "--batch-size", "128",
            "--ghost-batch-size", "64", "--no-progress", "--out", out]
    report, lines = _run(args)
    assert report == {"code": 0, "tensorflow": False}
    assert [line.split(" | ")[0] for line in lines[:3]] == ["epoch 0/2", "epoch 1/2", "epoch 2/2"]
    assert "train ce" in lines[2] and "test ce" in lines[2] and lines[-1].startswith(f"finished {out}")
    assert read_json(out, "status.json") == {"state": "finished", "epoch": 2, "step": 18, "message": "2 epochs"}
    records = read_records(out)
    assert [r["step"] for r in records] == [0, 0, 9, 9, 18, 18]
    assert records[-2]["ce"] < records[0]["ce"]  # it learned
    versions = read_json(out, "config.json")["versions"]
    assert versions["backend"] == "jax" and versions["jax"] and "tensorflow" not in versions
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(out, "tb")))

    # The same directory on another backend is refused with one line, before anything is trained: run.py's
    # main in this process when this process runs Keras on TensorFlow (the main test session: no interpreter to
    # start for it), else in a child with KERAS_BACKEND=tensorflow.
    if keras.backend.backend() == "tensorflow":
        spec = importlib.util.spec_from_file_location("experiments_run", SCRIPT)
        run_script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run_script)
        monkeypatch.setenv("KERAS_BACKEND", "tensorflow")  # as the child had it; restored after the test
        capsys.readouterr()
        code, stderr = run_script.main(args[2:]), capsys.readouterr().err
    else:
        done = subprocess.run([sys.executable, SCRIPT, *args[2:]], capture_output=True, text=True, timeout=300,
                              env=_env(KERAS_BACKEND="tensorflow"), cwd=ROOT)
        code, stderr = done.returncode, done.stderr
    assert code == 1 and "was trained on the jax backend" in stderr
    assert len(read_records(out)) == 6


def test_kill_9_and_resume_on_jax_equals_an_uninterrupted_run(idx_dir, tmp_path):
    # 640 of the fixture's examples, 3 epochs of 20 steps: killed in epoch 2, resumed for two epochs.
    args = ["--backend", "jax", "--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "3", "--batch-size", "32",
            "--ghost-batch-size", "32", "--train-subset", "640", "--track-every", "5", "--deterministic",
            "--no-progress"]
    killed = str(tmp_path / "killed")
    process = subprocess.Popen([sys.executable, SCRIPT, *args, "--out", killed], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    kill_9_after_the_first_epoch(process, killed, timeout=240)
    before = read_records(killed)

    # The resume, then the uninterrupted run, in one child (as tests/test_run.py runs both in its process): the
    # second run reuses the first one's JAX compilations instead of starting a third interpreter.
    whole = str(tmp_path / "whole")
    (report, lines), (whole_report, _) = _run_each([*args, "--out", killed], [*args, "--out", whole])
    assert report["code"] == 0 and lines[0].startswith(f"resuming {killed} from epoch ")
    after = read_records(killed)
    assert len(before) < len(after)
    steps = [(r["step"], r["split"]) for r in after]
    assert len(steps) == len(set(steps))  # nothing logged twice
    assert whole_report["code"] == 0
    assert after == read_records(whole)  # bit for bit
    # tensorboardX's events, cut back to the checkpoint on resume: every point once, none lost.
    points = tensorboard_points(killed)
    assert points and points == tensorboard_points(whole)


# Ghost batches on JAX: tests/test_ghost.py, which .ci/run runs on the JAX backend too.


def test_gpu_script_rehearses_on_cpu(tmp_path):
    """benchmarks/gpu/measure.py (run by benchmarks/gpu/run.sh on a GPU machine) in its --quick mode on the CPU."""
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "measure.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env=_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"]["platform"] == "cpu" and results["quick"] is True
    assert [(r["batch_size"], r["ghost_batch_size"]) for r in results["fc6"]] == [(256, 256), (256, 256), (1024, 256)]
    assert all(r["steps_per_second"] > 0 for r in results["fc6"] + results["c1"])
    assert results["tracking"]["seconds_min"] > 0
    assert results["run_py"]["final"]["train"]["ce"] < 2.31 and len(results["run_py"]["summary"]) == 4


# A user's model with the panel (the data, fc6, SGD, the panel's metrics), made once a distribution is set.
USERS_MODEL = textwrap.dedent(
    """
    import keras_implicit as ki
    from keras_implicit.models import make_model
    rng = np.random.default_rng(0)
    x = rng.random((512, 8, 8, 1)).astype(np.float32)
    y = (np.arange(512) % 4).astype(np.int32)
    x[np.arange(512), y, y, 0] += 1.5
    model = make_model("fc6", (8, 8, 1), 4, seed=1)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=ki.alt_loss_panel(sigmas=[0.5, 2], temperatures=[1, 4], margins=[1]))
    """
)

# That model under keras.distribution.DataParallel over the CPU split into N devices (XLA_FLAGS, before JAX
# starts): the panel's logged metrics and the tracker's records, as JSON.
DATA_PARALLEL = textwrap.dedent(
    """
    import json, os, sys
    devices = int(sys.argv[1])
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import jax, keras, numpy as np
    if devices > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    """
) + USERS_MODEL + textwrap.dedent(
    """
    tracker = ki.AltLossTracker((x, y), (x[:128], y[:128]), sigmas=[0.5, 2], temperatures=[1, 4], margins=[1],
                                track_every=4)
    history = model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0, callbacks=[tracker])
    print("RESULT " + json.dumps({"devices": len(jax.devices()), "records": tracker.records,
                                  "history": {k: [float(v) for v in values] for k, values in history.history.items()}}))
    """
)


def test_panel_and_tracker_under_keras_distribution_data_parallel_equal_one_devices():
    """The same training on one device and under DataParallel over 2: the panel's metrics and the tracker's
    records agree. At step 0 (the same weights) to float32 rounding; later the two trajectories drift apart by the
    order of the gradient's reduction over devices, so within 1e-3 relative and one example of the error."""
    results = {}
    for devices in (1, 2):
        result = subprocess.run([sys.executable, "-c", DATA_PARALLEL, str(devices)], capture_output=True, text=True,
                                timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        assert result.returncode == 0, result.stderr[-3000:]
        line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1]
        results[devices] = json.loads(line[len("RESULT "):])
    one, two = results[1], results[2]
    assert (one["devices"], two["devices"]) == (1, 2)
    assert one["history"].keys() == two["history"].keys() >= {"gcdf@0.5", "gcdf@2", "tce@4", "hinge@1", "error"}
    for name, values in one["history"].items():
        np.testing.assert_allclose(two["history"][name][0], values[0], rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(two["history"][name], values, rtol=1e-3, atol=2 / 512, err_msg=name)
    assert [(r["step"], r["split"]) for r in one["records"]] == [(r["step"], r["split"]) for r in two["records"]]
    for a, b in zip(one["records"], two["records"]):
        rtol = 1e-6 if a["step"] == 0 else 1e-3
        for name, value in a.items():
            if name in ("step", "split", "epoch"):
                continue
            atol = 2 / 512 if name == "error" else 1e-7
            np.testing.assert_allclose(b[name], value, rtol=rtol, atol=atol, err_msg=f"{name} at step {a['step']}")


def test_run_py_data_parallel_on_jax_equals_one_device(idx_dir, tmp_path):
    """``--strategy data-parallel --cpu-replicas 2`` (keras.distribution over the CPU split in two) trains the run
    one device trains: the same tracked steps, the values within the drift of the gradient's reduction order."""
    common = ["--backend", "jax", "--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "2", "--batch-size",
              "128", "--ghost-batch-size", "64", "--track-every", "3", "--no-progress"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert _run([*common, "--out", one])[0] == {"code": 0, "tensorflow": False}
    report, lines = _run([*common, "--strategy", "data-parallel", "--cpu-replicas", "2", "--out", two])
    assert report == {"code": 0, "tensorflow": False}, lines
    a, b = read_records(one), read_records(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b):
        for name, value in x.items():
            if name in ("step", "split", "epoch"):
                continue
            np.testing.assert_allclose(y[name], value, rtol=1e-6 if x["step"] == 0 else 2e-3,
                                       atol=2 / 200 if name == "error" else 1e-6, err_msg=f"{name} at {x['step']}")
    assert read_json(two, "config.json")["strategy"] == "data-parallel"
    # On TensorFlow, refused in one line before anything loads.
    done = subprocess.run([sys.executable, SCRIPT, *common[2:], "--strategy", "data-parallel", "--out",
                           str(tmp_path / "tf")], capture_output=True, text=True, timeout=300,
                          env=_env(KERAS_BACKEND="tensorflow"), cwd=ROOT)
    assert done.returncode == 2 and "--strategy data-parallel is keras.distribution's DataParallel: it needs " \
                                   "--backend jax, not tensorflow" in done.stderr, done.stderr[-2000:]


# Two JAX processes on the loopback address (jax.distributed through keras.distribution.initialize, gloo's CPU
# collectives), DataParallel over their devices, each feeding its half of every global batch of 64.
MULTI_HOST = textwrap.dedent(
    """
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_PLATFORMS"] = "cpu"
    process, port = int(sys.argv[1]), sys.argv[2]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras, numpy as np
    keras.distribution.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    distribution.auto_shard_dataset = False  # each process gives its own shard below
    keras.distribution.set_distribution(distribution)
    """
) + USERS_MODEL + textwrap.dedent(
    """
    mine = np.concatenate([np.arange(b * 64 + process * 32, b * 64 + process * 32 + 32) for b in range(8)])
    history = model.fit(x[mine], y[mine], batch_size=32, epochs=2, shuffle=False, verbose=0)
    print("RESULT " + json.dumps({"processes": jax.process_count(), "devices": len(jax.devices()),
                                  "history": {k: [float(v) for v in values] for k, values in history.history.items()}}))
    """
)


def test_panel_under_multi_host_jax_equals_one_device():
    """keras.distribution over two processes (multi-host JAX on one machine): both log the panel's metrics of the
    one-device run of the same global batches, to the drift of the gradient's reduction order. The tracker and
    run.py are not wired for several processes (docs/backends.md)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": ROOT}
    children = [subprocess.Popen([sys.executable, "-c", MULTI_HOST, str(index), port], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for index in (0, 1)]
    outputs = [child.communicate(timeout=600) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    results = [json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])
               for out, _ in outputs]
    single = subprocess.run([sys.executable, "-c", DATA_PARALLEL, "1"], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads([line for line in single.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    for result in results:
        assert (result["processes"], result["devices"]) == (2, 2)
        for name in ("gcdf@0.5", "gcdf@2", "tce@1", "tce@4", "hinge@1", "error"):
            np.testing.assert_allclose(result["history"][name], one["history"][name], rtol=1e-5, atol=2 / 512,
                                       err_msg=name)
    assert results[0]["history"] == results[1]["history"]  # every process logs the same global values
