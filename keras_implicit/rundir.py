"""The run-directory format, with one owner: its file names, its errors, atomic writes, checkpoint I/O, and the
readers of ``config.json``, ``status.json`` and ``metrics.jsonl`` that training, the tracker, the analysis and the
sweep all use. Standard library and NumPy only.

A run directory holds:

- ``config.json``: every setting of :class:`keras_implicit.config.RunConfig`, the panel's grids (``sigmas``,
  ``temperatures``, ``margins``), ``versions`` and ``git_commit`` (a user's own loop writes what it has,
  :class:`keras_implicit.callbacks.AltLossTracker`'s ``config``);
- ``status.json``: ``{"state": "running" | "finished" | "diverged", "epoch", "step", "message"}``;
- ``metrics.jsonl``: one record per tracking point and split (``epoch``, ``step``, ``split`` and the tracked
  columns);
- ``tb/``: TensorBoard scalars and the custom-scalars layout;
- ``checkpoint.npz`` and ``checkpoint.prev.npz``: weights, optimizer state, epoch, step, the length of
  ``metrics.jsonl`` and of the TensorBoard event files at that point, and a copy of ``config.json``;
- ``.lock``: held (``fcntl.flock``) by the process that trains it.

Example:
    >>> with RunDirectory("runs/fc6-lr0.1") as run:   # locked until the block ends
    ...     records = run.read_metrics()
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = [
    "RunError",
    "RunLockedError",
    "UnreadableFileError",
    "RunDirectory",
    "CONFIG",
    "STATUS",
    "METRICS",
    "CHECKPOINT",
    "PREVIOUS_CHECKPOINT",
    "TENSORBOARD",
    "LOCK",
    "atomic_write",
    "read_json_object",
    "read_config_quietly",
    "read_state",
    "parse_metrics",
    "restore_config",
    "read_status",
    "warn",
]

# The format's file names.
CONFIG, STATUS, METRICS, CHECKPOINT, TENSORBOARD, LOCK = (
    "config.json", "status.json", "metrics.jsonl", "checkpoint.npz", "tb", ".lock")
PREVIOUS_CHECKPOINT = "checkpoint.prev.npz"


class RunError(RuntimeError):
    """A run cannot start: bad configuration, locked or mismatching run directory, missing data."""


class RunLockedError(RunError):
    """Another process holds the run directory."""


def _write_synced(path: str, data: bytes):
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: str):
    """Flushes a file or a directory (its entries: renames) to disk; a no-op where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _listed(names, most: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def atomic_write(path: str, data: bytes):
    """Writes ``data`` to ``path`` through a temporary file beside it, fsync'd and renamed: a reader sees the old
    file or the new one, never a part."""
    tmp = f"{path}.tmp"
    _write_synced(tmp, data)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


class UnreadableFileError(RunError):
    """A file of a run directory that cannot be parsed: truncated, overwritten, or not what it should hold.

    ``problem`` is the one-line diagnosis (``<path> is unreadable (<reason>)``); the message adds what to do.
    """

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        self.problem = f"{path} is unreadable ({reason})"
        super().__init__(f"{self.problem}: restore it or rerun with overwrite=True to start again")


def _problem(error: BaseException) -> str:
    """What a parser tripped on, in a few words."""
    if isinstance(error, json.JSONDecodeError):
        return f"JSON error at line {error.lineno} column {error.colno}: {error.msg}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text at byte {error.start}"
    return f"{type(error).__name__}: {error}"


def _read_checkpoint(path: str) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint file, read whole (so a damaged member is found now, not half-way
    through restoring); :class:`UnreadableFileError` for anything that is not a complete checkpoint."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":  # np.savez writes a zip archive; np.load would try pickle
                raise UnreadableFileError(path, "not a checkpoint: it does not start as an .npz (zip) archive")
        with np.load(path, allow_pickle=False) as content:
            arrays = {key: content[key] for key in content.files}
        if "meta" not in arrays:
            raise UnreadableFileError(path, "not a checkpoint: it holds no meta")
        meta = json.loads(bytes(arrays.pop("meta")).decode("utf-8"))
        if not isinstance(meta, dict):
            raise UnreadableFileError(path, "its meta is not a JSON object")
    except UnreadableFileError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the parser trips on, the file is damaged
        raise UnreadableFileError(path, _problem(error)) from None
    return meta, arrays


def warn(text: str):
    """One line on stderr: a damaged file of a run directory was worked around and the run goes on."""
    sys.stderr.write(f"warning: {text}\n")
    sys.stderr.flush()


class RunDirectory:
    """One run's directory: lock, config, status, metrics and checkpoint.

    Use it as a context manager (``with RunDirectory(path) as run: ...``): entering takes an exclusive
    ``fcntl.flock`` on ``path/.lock`` (released on exit, and by the system if the process dies);
    a second process gets :class:`RunLockedError`.

    A file that cannot be parsed raises a :class:`RunError` naming it and saying what to do; the
    checkpoint it replaces is kept as ``checkpoint.prev.npz``, the fallback when ``checkpoint.npz`` is
    missing or damaged (:meth:`restore_checkpoint`).
    """

    CONFIG, STATUS, METRICS, CHECKPOINT, TENSORBOARD, LOCK = CONFIG, STATUS, METRICS, CHECKPOINT, TENSORBOARD, LOCK
    PREVIOUS_CHECKPOINT = PREVIOUS_CHECKPOINT

    def __init__(self, path):
        self.path = os.fspath(path)
        self._lock_handle = None
        # Set when restore_checkpoint fell back on the previous checkpoint: the next save then replaces the
        # damaged latest instead of rotating it over the good previous one.
        self._latest_checkpoint_damaged = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def metrics_path(self):
        return self.file(self.METRICS)

    @property
    def tensorboard_dir(self):
        return self.file(self.TENSORBOARD)

    # locking
    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, *exc):
        self.unlock()

    def lock(self):
        os.makedirs(self.path, exist_ok=True)
        handle = open(self.file(self.LOCK), "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockedError(
                    f"{self.path} is in use by another process (it holds {self.file(self.LOCK)})") from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def unlock(self):
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    # files
    def read_json(self, name):
        """The JSON object in ``name``; None if the file is missing; a :class:`RunError` naming it (and
        what to do) if it is not a JSON object (truncated, overwritten)."""
        return read_json_object(self.file(name))

    def write_json(self, name, content):
        atomic_write(self.file(name), (json.dumps(content, indent=2) + "\n").encode())

    def config(self):
        return self.read_json(self.CONFIG)

    def status(self):
        return self.read_json(self.STATUS)

    def write_status(self, state, epoch, step, message=None):
        status = {"state": state, "epoch": int(epoch), "step": int(step)}
        if message:
            status["message"] = message
        self.write_json(self.STATUS, status)

    def contents(self):
        return sorted(n for n in os.listdir(self.path) if n != self.LOCK) if os.path.isdir(self.path) else []

    def format_names(self) -> tuple:
        """The names this format writes into a run directory (a ``.tmp`` beside a file is an atomic write that
        a crash interrupted)."""
        return (self.CONFIG, self.STATUS, self.METRICS, self.CHECKPOINT, self.PREVIOUS_CHECKPOINT,
                self.TENSORBOARD, self.LOCK)

    def foreign_contents(self) -> list:
        """What the directory holds that the run-directory format never writes: nothing a run may delete."""
        owned = set(self.format_names())
        owned |= {f"{name}.tmp" for name in owned}
        foreign = []
        for name in self.contents():
            target = self.file(name)
            if name not in owned or (name == self.TENSORBOARD and (os.path.islink(target)
                                                                  or not os.path.isdir(target))):
                foreign.append(name + ("/" if os.path.isdir(target) and not os.path.islink(target) else ""))
        return foreign

    def discard(self):
        """Removes the lock file and the directory, which must hold nothing else (a run that could not start in
        a directory it created); the lock stays held until :meth:`unlock`."""
        try:
            os.remove(self.file(self.LOCK))
            os.rmdir(self.path)
        except OSError:  # something else appeared in it meanwhile: leave it
            pass

    def check_empty(self):
        """A :class:`RunError` unless the directory is empty or missing (a run without ``config.json`` starts only
        there): naming what it holds, and suggesting ``overwrite`` only for a run's own files."""
        foreign = self.foreign_contents()
        if foreign:
            raise RunError(f"{self.path} is not a run directory (it holds {_listed(foreign)}): use another run_dir")
        if self.contents():
            raise RunError(f"{self.path} holds a run's files but no config.json ({_listed(self.contents())}); use "
                           "overwrite=True to replace them or another run_dir")

    def clear(self):
        """Removes the run's files but the lock (``overwrite=True``). A :class:`RunError` naming them, with
        nothing removed, if the directory holds anything the run-directory format does not write (a slip such as
        ``run_dir="."`` must not empty a working or home directory)."""
        foreign = self.foreign_contents()
        if foreign:
            raise RunError(f"{self.path} holds files that are not a run's ({_listed(foreign)}): nothing was "
                           "removed; use another run_dir")
        for name in self.contents():
            target = self.file(name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.remove(target)

    def read_metrics(self):
        """The records of ``metrics.jsonl`` (a list of dicts); a :class:`RunError` naming a line that is not
        a JSON object (call it after :meth:`truncate_metrics`, which cuts a torn last line away)."""
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path, "rb") as handle:
            lines = handle.read().split(b"\n")
        records = []
        for number, record, problem in parse_metrics(lines):
            if problem is not None:
                raise UnreadableFileError(f"{self.metrics_path}:{number}", problem)
            records.append(record)
        return records

    def truncate_metrics(self, size: int):
        """Cuts ``metrics.jsonl`` back to ``size`` bytes (a checkpoint's ``metrics_bytes``): what was written
        after the checkpoint, a torn last line included, goes. A :class:`RunError` if it holds fewer bytes
        (records the checkpoint counted were lost)."""
        held = self.metrics_size()
        if held < size:
            raise RunError(
                f"{self.metrics_path} holds {held} bytes, fewer than the {size} its checkpoint counted: tracking "
                "points were lost; restore it or rerun with overwrite=True to start again")
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, "r+b") as handle:
                handle.truncate(size)
                handle.flush()
                os.fsync(handle.fileno())

    def metrics_size(self) -> int:
        return os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0

    # checkpoints
    def save_checkpoint(self, model, optimizer, meta: dict):
        """Weights, optimizer variables and ``meta`` in one file, written atomically (a temporary file,
        fsync'd, renamed). The checkpoint it replaces becomes ``checkpoint.prev.npz`` (by rename, so both
        are always whole files) and ``metrics.jsonl`` is fsync'd first: the records a checkpoint counts are
        on disk before it."""
        arrays = {f"model_{i}": np.asarray(v) for i, v in enumerate(model.weights)}
        arrays.update({f"optimizer_{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        if os.path.exists(self.metrics_path):
            _fsync(self.metrics_path)
        latest = self.file(self.CHECKPOINT)
        _write_synced(f"{latest}.tmp", buffer.getvalue())
        if os.path.exists(latest) and not self._latest_checkpoint_damaged:
            os.replace(latest, self.file(self.PREVIOUS_CHECKPOINT))
        os.replace(f"{latest}.tmp", latest)
        _fsync(os.path.abspath(self.path))
        self._latest_checkpoint_damaged = False

    def load_checkpoint(self, model=None, optimizer=None, name: Optional[str] = None) -> Optional[dict]:
        """Restores weights and optimizer state (both must be built) from ``name`` (default
        ``checkpoint.npz``); returns the meta dict, or None if there is no such file.

        Raises:
            RunError: the file is damaged (nothing is restored then), or holds other variables than the
                model's or optimizer's (another model: a different count or shape).
        """
        path = self.file(name or self.CHECKPOINT)
        if not os.path.exists(path):
            return None
        meta, content = _read_checkpoint(path)
        assignments = []
        for prefix, variables in (("model", model.weights if model is not None else None),
                                  ("optimizer", optimizer.variables if optimizer is not None else None)):
            if variables is None:
                continue
            stored = sorted((k for k in content if k.startswith(prefix + "_") and k[len(prefix) + 1:].isdigit()),
                            key=lambda k: int(k[len(prefix) + 1:]))
            if len(stored) != len(variables):
                raise RunError(f"{path}: holds {len(stored)} {prefix} variables, the {prefix} has {len(variables)}")
            for key, variable in zip(stored, variables):
                value = content[key]
                if tuple(value.shape) != tuple(variable.shape):
                    raise RunError(
                        f"{path}: {key} has shape {value.shape}, {variable.path} {tuple(variable.shape)}")
                assignments.append((variable, value))
        for variable, value in assignments:
            variable.assign(value)
        return meta

    def restore_checkpoint(self, model, optimizer, required=("epoch", "step", "metrics_bytes")) -> Optional[dict]:
        """Restores the newest readable checkpoint: ``checkpoint.npz``, or ``checkpoint.prev.npz`` (one
        epoch older) with a warning on stderr when the latest is missing or damaged.

        A checkpoint whose meta lacks an integer in one of ``required`` counts as damaged.

        Returns:
            Its meta dict, or None when there is neither file (a fresh run).

        Raises:
            RunError: no checkpoint can be read (one clear line naming both files: rerun with
                ``overwrite=True``), or one holds another model's variables.
        """
        latest, previous = self.file(self.CHECKPOINT), self.file(self.PREVIOUS_CHECKPOINT)

        def load(name):
            meta = self.load_checkpoint(model, optimizer, name)
            missing = [k for k in required if meta is not None and not isinstance(meta.get(k), int)]
            if missing:
                raise UnreadableFileError(self.file(name), f"its meta has no {', '.join(missing)}")
            return meta

        try:
            meta = load(self.CHECKPOINT)
            if meta is not None:
                return meta
            latest_problem = "missing"
        except UnreadableFileError as error:
            latest_problem = error.reason
        try:
            meta = load(self.PREVIOUS_CHECKPOINT)
        except UnreadableFileError as error:
            raise RunError(
                f"{self.path}: no checkpoint can be read ({self.CHECKPOINT}: {latest_problem}; "
                f"{self.PREVIOUS_CHECKPOINT}: {error.reason}): rerun with overwrite=True to start again") from None
        if meta is None:
            if latest_problem == "missing":
                return None
            raise RunError(f"{latest} is unreadable ({latest_problem}) and there is no {self.PREVIOUS_CHECKPOINT} "
                           "to fall back on: rerun with overwrite=True to start again")
        self._latest_checkpoint_damaged = latest_problem != "missing"
        warn(f"{latest} is " + ("missing" if latest_problem == "missing" else f"unreadable ({latest_problem})")
              + f": resuming from {previous} (epoch {meta['epoch']}, step {meta['step']}); the epoch after it is "
              "trained again")
        return meta

    def config_from_checkpoint(self) -> tuple[Optional[dict], Optional[str]]:
        """(the copy of ``config.json`` in the newest readable checkpoint, that checkpoint's path), or
        (None, None) when no checkpoint holds one (checkpoints written before copies were kept hold none)."""
        for name in (self.CHECKPOINT, self.PREVIOUS_CHECKPOINT):
            path = self.file(name)
            if not os.path.exists(path):
                continue
            try:
                meta, _ = _read_checkpoint(path)
            except UnreadableFileError:
                continue
            if isinstance(meta.get("config"), dict):
                return meta["config"], path
        return None, None

    # TensorBoard
    def tensorboard_sizes(self) -> dict:
        """``{path relative to tb/: size in bytes}`` of the files under ``tb/`` (kept in a checkpoint's meta)."""
        sizes = {}
        for root, _, names in os.walk(self.tensorboard_dir):
            for name in names:
                path = os.path.join(root, name)
                sizes[os.path.relpath(path, self.tensorboard_dir)] = os.path.getsize(path)
        return sizes

    def truncate_tensorboard(self, sizes: dict):
        """Cuts the event files under ``tb/`` back to ``sizes`` (:meth:`tensorboard_sizes` at a checkpoint) and
        removes the event files started after it, so that a run resumed from that checkpoint writes no point
        twice (an event file is a sequence of records: a prefix is a valid file)."""
        for relative, size in self.tensorboard_sizes().items():
            path = os.path.join(self.tensorboard_dir, relative)
            if relative in sizes:
                if size > sizes[relative]:
                    with open(path, "r+b") as handle:
                        handle.truncate(sizes[relative])
            elif os.path.basename(relative).startswith("events.out.tfevents"):
                os.remove(path)


def restore_config(run: RunDirectory) -> Optional[dict]:
    """``config.json``; if it is damaged (or missing beside a checkpoint), the copy the newest readable
    checkpoint holds, written back with a warning. A damaged one without a copy is a RunError."""
    try:
        content = run.config()
        if content is not None:
            return content
        problem = f"{run.file(run.CONFIG)} is missing"
        damaged = None
    except UnreadableFileError as error:
        problem, damaged = error.problem, error
    copy, source = run.config_from_checkpoint()
    if copy is None:
        if damaged is not None:
            raise damaged  # "<path> is unreadable (<reason>): restore it or rerun with overwrite=True ..."
        return None
    warn(f"{problem}: restored from the copy in {source}")
    run.write_json(run.CONFIG, copy)
    return copy


def read_status(run: RunDirectory) -> dict:
    """``status.json``, or {} (state unknown: resume from the checkpoint) with a warning if it is damaged."""
    try:
        return run.status() or {}
    except UnreadableFileError as error:
        warn(f"{error.problem}: it only summarizes the run; resuming from the checkpoint, which rewrites it")
        return {}




def parse_metrics(lines):
    """The one parser of ``metrics.jsonl``: ``(line number, record, None)`` for each non-blank line that is a
    JSON object, ``(line number, None, what is wrong)`` for one that is not. ``lines``: the file's lines (bytes or
    str, without their newlines)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            yield number, None, _problem(error)
            continue
        if not isinstance(record, dict):
            yield number, None, "not a JSON object"
            continue
        yield number, record, None


def read_json_object(path) -> Optional[dict]:
    """The JSON object in a file of a run directory; None when the file is missing; an
    :class:`UnreadableFileError` naming it when it cannot be read or is not a JSON object."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UnreadableFileError(path, error.strerror or str(error)) from None
    try:
        content = json.loads(raw.decode("utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise UnreadableFileError(path, _problem(error)) from None
    if not isinstance(content, dict):
        raise UnreadableFileError(path, f"a JSON {type(content).__name__}, not an object")
    return content


def read_config_quietly(run_dir) -> Optional[dict]:
    """``config.json`` of ``run_dir`` without locking or changing anything; None when it is missing or cannot be
    read (a scheduler then lets the run itself restore or refuse it)."""
    try:
        return read_json_object(Path(run_dir) / CONFIG)
    except UnreadableFileError:
        return None


def read_state(run_dir) -> str:
    """A run's state from its ``status.json``: ``"running"``, ``"finished"``, ``"diverged"``; ``"missing"`` when the
    file is not there, ``"unreadable"`` when it cannot be read, ``"unknown"`` when it names no state."""
    try:
        status = read_json_object(Path(run_dir) / STATUS)
    except UnreadableFileError:
        return "unreadable"
    if status is None:
        return "missing"
    return str(status.get("state", "unknown"))
