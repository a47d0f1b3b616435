"""Helpers for the tests that run experiments/run.py in child processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest


def read_records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def read_json(run_dir, name: str):
    with open(os.path.join(run_dir, name)) as handle:
        return json.load(handle)


def tensorboard_points(run_dir) -> list[tuple]:
    """Sorted (tag, step, value) of every scalar in the run's event files under ``tb/`` (a point written twice
    shows twice): tf.summary's tensor summaries (TensorFlow) and tensorboardX's simple values (other backends)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    points = []
    tb = os.path.join(run_dir, "tb")
    for name in sorted(os.listdir(tb)):
        for event in EventFileLoader(os.path.join(tb, name)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    points.append((value.tag, event.step, value.simple_value))
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    points.append((value.tag, event.step, float(make_ndarray(value.tensor))))
    return sorted(points)


def kill_9_after_the_first_epoch(process, run_dir, timeout: float) -> None:
    """Waits until the run's status says epoch >= 1 (a checkpoint is written), then until metrics.jsonl has grown
    past what it held then (the next epoch's records are being written, after the checkpoint), then SIGKILLs
    it; fails if it finished first. No fixed sleep: a small model on JAX trains an epoch in 0.1 s here."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    checkpointed_size = None
    while time.time() < deadline and process.poll() is None:
        if checkpointed_size is None:
            try:
                status = read_json(run_dir, "status.json")
            except (FileNotFoundError, json.JSONDecodeError):
                status = None
            if status and status["state"] == "running" and status["epoch"] >= 1:
                checkpointed_size = os.path.getsize(metrics)
        elif os.path.getsize(metrics) > checkpointed_size:
            break
        time.sleep(0.002)
    if process.poll() is not None:
        pytest.fail("the run finished before it could be killed; make the fixture run longer")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_json(run_dir, "status.json")["state"] == "running"


# A script's main in a fresh interpreter, then its exit code and every module it imported (the last line).
_SCRIPT_AND_MODULES = """
import json, runpy, sys
sys.argv = [sys.argv[1], *json.loads(sys.argv[2])]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exited:
    code = exited.code
else:
    code = None
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def assert_refused_before_tensorflow(script, argv, cwd, message: str, env=None) -> None:
    """``script argv`` exits 2 with exactly one ``<script>: error: ...`` line holding ``message``, before
    TensorFlow or Keras was imported (a fresh interpreter, with ``env`` added to the environment; nothing is
    timed)."""
    result = subprocess.run([sys.executable, "-c", _SCRIPT_AND_MODULES, str(script), json.dumps(argv)],
                            capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, **(env or {})})
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    prefix = f"{os.path.basename(str(script))}: error: "
    assert len(errors) == 1 and errors[0].startswith(prefix) and message in errors[0], result.stderr
    assert not {"tensorflow", "keras"} & set(report["modules"])
