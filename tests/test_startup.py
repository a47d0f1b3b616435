"""keras_implicit._startup: TensorFlow's "no CUDA driver" lines are held back on a machine without an NVIDIA
driver, every other line of standard error passes, and nothing is held back where a driver is (or is asked for)."""

import os
import subprocess
import sys

import pytest

from keras_implicit import _startup

_START = """
import os, sys
from keras_implicit._startup import quiet_cuda_probe
with quiet_cuda_probe():
    os.write(2, b"a line of the user's own\\n")
    import tensorflow as tf
    tf.config.list_physical_devices()
    print("printed through sys.stderr", file=sys.stderr)
print("after", file=sys.stderr)
"""


def _stderr(env):
    done = subprocess.run([sys.executable, "-c", _START], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


@pytest.mark.skipif(_startup.nvidia_driver_present(), reason="this machine has an NVIDIA driver: nothing is held")
def test_without_a_driver_only_the_cuda_lines_are_held_back():
    shown = _stderr({"KERAS_IMPLICIT_SHOW_CUDA_PROBE": "1"})
    # What TensorFlow 2.21's GPU build prints here: the lines exist, so the test below is not vacuous.
    assert "Could not find cuda drivers on your machine" in shown and "failed call to cuInit" in shown
    quiet = _stderr({})
    assert "cuda drivers" not in quiet and "cuInit" not in quiet
    lines = quiet.splitlines()
    assert "a line of the user's own" in lines and "printed through sys.stderr" in lines and lines[-1] == "after"
    assert lines.index("a line of the user's own") < lines.index("printed through sys.stderr")


def test_with_a_driver_nothing_is_held(monkeypatch, capfd):
    monkeypatch.setattr(_startup, "nvidia_driver_present", lambda: True)
    with _startup.quiet_cuda_probe():
        os.write(2, b"failed call to cuInit: shown where a GPU may be at stake\n")
        assert "cuInit" in capfd.readouterr().err  # written through at once, not held


def test_lines_written_before_an_exception_are_not_lost(monkeypatch, capfd):
    monkeypatch.setattr(_startup, "nvidia_driver_present", lambda: False)
    monkeypatch.delenv("KERAS_IMPLICIT_SHOW_CUDA_PROBE", raising=False)
    with pytest.raises(ImportError):
        with _startup.quiet_cuda_probe():
            os.write(2, b"why it failed\n")
            os.write(2, b"E0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
            raise ImportError("no module")
    err = capfd.readouterr().err
    assert err == "why it failed\n"
