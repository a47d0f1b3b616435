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


def kill_9_after_the_first_epoch(process, run_dir, timeout: float) -> None:
    """Waits until the run's status says epoch >= 1 (a checkpoint is written), lets it go on into the next epoch
    (records after the checkpoint are being written), then SIGKILLs it; fails if it finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            status = read_json(run_dir, "status.json")
        except (FileNotFoundError, json.JSONDecodeError):
            status = None
        if status and status["state"] == "running" and status["epoch"] >= 1:
            time.sleep(0.2)
            break
        time.sleep(0.02)
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


def assert_refused_before_tensorflow(script, argv, cwd, message: str) -> None:
    """``script argv`` exits 2 with exactly one ``<script>: error: ...`` line holding ``message``, before
    TensorFlow or Keras was imported (a fresh interpreter; nothing is timed)."""
    result = subprocess.run([sys.executable, "-c", _SCRIPT_AND_MODULES, str(script), json.dumps(argv)],
                            capture_output=True, text=True, timeout=120, cwd=cwd)
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    prefix = f"{os.path.basename(str(script))}: error: "
    assert len(errors) == 1 and errors[0].startswith(prefix) and message in errors[0], result.stderr
    assert not {"tensorflow", "keras"} & set(report["modules"])
