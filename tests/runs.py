"""Helpers for the tests that run experiments/run.py in child processes."""

import json
import os
import signal
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
