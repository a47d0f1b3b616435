"""What TensorFlow prints when it starts on a machine without an NVIDIA driver, kept out of a run's output.

TensorFlow's GPU build looks for CUDA when it is imported and when it first lists devices, and on a machine with no
NVIDIA driver prints ``Could not find cuda drivers on your machine, GPU will not be used`` and ``E0000 ...
failed call to cuInit: ... UNKNOWN ERROR (303)``: an error line on the first run of a healthy CPU machine. Neither
``TF_CPP_MIN_LOG_LEVEL`` nor ``CUDA_VISIBLE_DEVICES`` silences them (TF 2.21). :func:`quiet_cuda_probe` holds
the process's standard error while TensorFlow starts and passes every other line on when it is done.

It does nothing where an NVIDIA driver is present (``/proc/driver/nvidia``, a ``/dev/nvidia*`` device or a
``libcuda`` the loader finds): there the same lines say why a GPU the user has is not used, and they must be
seen. ``KERAS_IMPLICIT_SHOW_CUDA_PROBE=1`` shows them everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import glob
import os
import sys
import tempfile

__all__ = ["nvidia_driver_present", "quiet_cuda_probe", "HARMLESS_WITHOUT_DRIVER"]

# Substrings of the lines TensorFlow prints only because no NVIDIA driver is installed.
HARMLESS_WITHOUT_DRIVER = ("Could not find cuda drivers on your machine", "failed call to cuInit")


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver that TensorFlow could use (then nothing is held back)."""
    return (os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))
            or ctypes.util.find_library("cuda") is not None)


@contextlib.contextmanager
def quiet_cuda_probe():
    """Inside, file descriptor 2 goes to a temporary file; on leaving (an exception included), its lines are
    written to the real standard error, less those in :data:`HARMLESS_WITHOUT_DRIVER`. A no-op where an NVIDIA
    driver is present or ``KERAS_IMPLICIT_SHOW_CUDA_PROBE=1``. Use it around the synchronous start of TensorFlow
    (``import keras``, the first device listing) only: what a crash inside would print is held until then."""
    if os.environ.get("KERAS_IMPLICIT_SHOW_CUDA_PROBE") == "1" or nvidia_driver_present():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 (an embedded interpreter): nothing to filter
        yield
        return
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held:
                if not any(marker.encode() in line for marker in HARMLESS_WITHOUT_DRIVER):
                    os.write(2, line)
            held.close()
