"""Comparison of training runs at equal training loss, the paper's method (section 4.3).

Reads run directories (:func:`load_runs`) without importing TensorFlow, reads every tracked quantity where the
training CE first crosses a level (:func:`at_level`, interpolated in log CE between tracking points), groups runs
over seeds (:func:`group_runs`, :func:`aggregate`) and finds where two settings' ordering flips along a family's
parameter (:func:`crossovers`, :func:`loss_ladder`). The method, with its formulas, is the page docs/comparison.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from keras_implicit import rundir
from keras_implicit.config import ADDED_LATER, effective_moving_statistics, with_added_later
from keras_implicit.names import (  # noqa: F401  (the vocabulary, re-exported where users found it)
    DEFAULT_LADDER,
    FAMILIES,
    FAMILY_GRID,
    FAMILY_PARAMETER,
    FAMILY_TITLE,
    family_names,
    parse_name,
)

__all__ = [
    "RunDirectoryError",
    "GridMismatchError",
    "LevelNotReachedError",
    "Ladder",
    "loss_ladder",
    "ladder_markdown",
    "Run",
    "RunGroup",
    "LevelPoint",
    "Crossover",
    "Aggregate",
    "load_run",
    "load_runs",
    "find_run_dirs",
    "check_same_grids",
    "interpolate",
    "check_level",
    "at_level",
    "curve_at_levels",
    "common_level",
    "crossovers",
    "compare_at_level",
    "group_runs",
    "aggregate",
    "describe_config",
    "summary_rows",
    "summary_csv",
    "summary_markdown",
    "extreme_pairs",
    "hparams_records",
    "BudgetNotReachedError",
    "at_budget",
    "GapClosed",
    "gap_closed",
    "profile_distance",
    "choose_by_profile",
    "choose_by_validation",
]


# Config keys that do not make two runs different experiments.
_BOOKKEEPING = ("seed", "data_dir", "versions", "git_commit", "run_dir", "name", "track_every",
                "track_schedule", "track_levels", "target_train_loss", "epochs", "deterministic", "strategy",
                "cpu_replicas", "noisy_error_draws")
# Config keys that identify an experiment, in the order labels list them.
_LABEL_KEYS = ("model", "dataset", "optimizer", "loss", "lr", "batch_size", "ghost_batch_size", "train_subset",
               "moving_statistics", "gradient_penalty", "sam_radius")
_LABEL_SHORT = {"lr": "lr", "batch_size": "batch", "ghost_batch_size": "ghost", "train_subset": "subset",
                "moving_statistics": "bn", "gradient_penalty": "gp", "sam_radius": "sam"}


class RunDirectoryError(ValueError):
    """A run directory is missing a file or holds one that cannot be read."""


class GridMismatchError(ValueError):
    """Runs to be compared tracked different parameter grids."""


class LevelNotReachedError(ValueError):
    """A run's training CE never comes down to the requested level."""


class BudgetNotReachedError(ValueError):
    """A run was not trained as far as the requested number of epochs or steps."""


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class Run:
    """One run directory, loaded.

    Attributes:
        path: the directory.
        name: its base name.
        config: config.json as a dict.
        status: status.json as a dict ({} when the file is missing or unreadable: state ``"unknown"``).
        splits: ``{"train": {"epoch": array [N], "step": ..., "ce": ..., "gcdf@0.5": ...}, "test": ...}``,
            points sorted by step; a quantity missing at a point is NaN.
    """

    path: Path
    name: str
    config: dict
    status: dict
    splits: dict[str, dict[str, np.ndarray]]

    @property
    def state(self) -> str:
        return str(self.status.get("state", "unknown"))

    @property
    def seed(self):
        return self.config.get("seed")

    def quantities(self, split: str = "train") -> list[str]:
        """The tracked names of a split, in file order, without epoch/step."""
        return [k for k in self.columns(split) if k not in ("epoch", "step")]

    def family(self, family: str, split: str = "train") -> tuple[np.ndarray, list[str]]:
        """Sorted parameters and column names of one family (``"gcdf"``, ``"tce"``, ``"hinge"``)."""
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        return family_names(self.quantities(split), family)

    def series(self, quantity: str, split: str = "train", x: str = "epoch") -> tuple[np.ndarray, np.ndarray]:
        """``(x values, quantity values)`` over the tracking points of a split."""
        columns = self.columns(split)
        if quantity not in columns:
            raise KeyError(
                f"run {self.name!r} did not track {quantity!r} on {split!r}; it has {self.quantities(split)}"
            )
        if x not in columns:
            raise KeyError(f"run {self.name!r} has no {x!r} column on {split!r}")
        return columns[x], columns[quantity]

    def columns(self, split: str = "train") -> dict[str, np.ndarray]:
        """Every tracked column of a split (``epoch``, ``step``, ``ce``, ``gcdf@0.5``, ...) as arrays over
        its tracking points, in file order."""
        if split not in self.splits:
            raise KeyError(f"run {self.name!r} has no {split!r} records in {self.path / 'metrics.jsonl'}")
        return self.splits[split]


def _read_json(path: Path, required: bool) -> dict:
    try:
        value = rundir.read_json_object(path)
    except rundir.UnreadableFileError as error:
        raise RunDirectoryError(error.problem) from None
    if value is None:
        if required:
            raise RunDirectoryError(
                f"{path} is missing: is {path.parent} a run directory? run.py writes one; for a run of your own "
                "loop, AltLossTracker(..., metrics_path=..., config={'lr': ..., 'batch_size': ..., 'seed': ...}) "
                "writes it beside metrics.jsonl")
        return {}
    return value


def _read_records(path: Path, strict: bool) -> list[dict]:
    """``metrics.jsonl`` through the format's one parser (:func:`keras_implicit.rundir.parse_metrics`); a torn last
    line (a killed run leaves one) is dropped with a warning unless ``strict``."""
    if not path.exists():
        raise RunDirectoryError(f"{path} is missing: the run has not written any tracking point")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    last_content = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for number, record, problem in rundir.parse_metrics(lines):
        line = lines[number - 1]
        if problem is not None:
            if number - 1 == last_content and not strict:
                warnings.warn(
                    f"{path}:{number}: dropping a truncated last line (a killed run leaves one): {line[:60]!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            where = "truncated last line" if number - 1 == last_content else "malformed line"
            raise RunDirectoryError(f"{path}:{number}: {where} ({problem}): {line[:80]!r}") from None
        for key in ("epoch", "step", "split"):
            if key not in record:
                raise RunDirectoryError(f"{path}:{number}: the record has no {key!r}: {line[:80]!r}")
        records.append(record)
    if not records:
        raise RunDirectoryError(f"{path} holds no complete tracking point")
    return records


def _columns(records: list[dict], path: Path) -> dict[str, dict[str, np.ndarray]]:
    by_split: dict[str, list[dict]] = {}
    for record in records:
        history = by_split.setdefault(str(record["split"]), [])
        # A resumed run re-tracks from its last checkpoint: a point at a step already seen replaces
        # that point and everything logged after it.
        while history and int(history[-1]["step"]) >= int(record["step"]):
            history.pop()
        history.append(record)
    splits = {}
    for split, history in by_split.items():
        names: list[str] = []
        for record in history:
            for key, value in record.items():
                if key != "split" and key not in names and isinstance(value, (int, float, type(None))):
                    names.append(key)
        columns = {}
        for key in names:
            values = [record.get(key) for record in history]
            columns[key] = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        splits[split] = columns
    if "train" not in splits:
        raise RunDirectoryError(f"{path} has no 'train' records")
    if "ce" not in splits["train"]:
        raise RunDirectoryError(f"{path}: the 'train' records have no 'ce' (the training cross-entropy)")
    return splits


def load_run(path: str | os.PathLike, strict: bool = False) -> Run:
    """Loads one run directory.

    Args:
        path: the run directory (config.json, status.json, metrics.jsonl).
        strict: if true, a truncated last line of metrics.jsonl is an error; by default it is
            dropped with a ``RuntimeWarning`` (a run killed while writing leaves one). A malformed
            line elsewhere is always an error.

    Returns:
        A :class:`Run`. A missing status.json gives ``state == "unknown"``; so does an unreadable one, with a
        ``RuntimeWarning`` (it only summarizes the run: ``run.py`` resumes over it the same way). The config's
        ``moving_statistics`` is the one the run was trained with (:func:`effective_moving_statistics`).

    Raises:
        RunDirectoryError: no such directory (or a file instead of one), config.json or metrics.jsonl missing
            or unreadable, no complete training record, no ``ce``.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunDirectoryError(_not_a_run_directory(path))
    config = _read_json(path / rundir.CONFIG, required=True)
    # As the run was trained: None with one micro-batch per step, "mean" for a config.json from before the setting.
    config["moving_statistics"] = effective_moving_statistics(config)
    try:
        status = _read_json(path / rundir.STATUS, required=False)
    except RunDirectoryError as error:
        # status.json only summarizes the run (run.py resumes over a damaged one and rewrites it).
        warnings.warn(f"{error}: it only summarizes the run; reading the run with its state unknown",
                      RuntimeWarning, stacklevel=2)
        status = {}
    records = _read_records(path / rundir.METRICS, strict)
    return Run(path=path, name=path.name, config=config, status=status, splits=_columns(records, path))


def _not_a_run_directory(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    hint = f" (did you mean {path.parent}?)" if (path.parent / rundir.CONFIG).exists() else ""
    return (f"{path} is a file, not a run directory: give the folder that holds config.json and metrics.jsonl, "
            f"or a folder of such folders{hint}")


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expands each path: a run directory (has config.json) stays, a folder of runs gives its runs (sorted by
    name)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir() and (path / rundir.CONFIG).exists():
            found.append(path)
        elif path.is_dir():
            children = sorted(p for p in path.iterdir() if (p / rundir.CONFIG).exists())
            if not children:
                raise RunDirectoryError(f"{path} is neither a run directory nor a folder of run directories (a "
                                        "run directory holds config.json and metrics.jsonl)")
            found.extend(children)
        else:
            raise RunDirectoryError(_not_a_run_directory(path))
    return found


def load_runs(paths: Iterable[str | os.PathLike], strict: bool = False) -> list[Run]:
    """Loads run directories (or folders of them, see :func:`find_run_dirs`)."""
    return [load_run(p, strict=strict) for p in find_run_dirs(paths)]


def check_same_grids(runs: Sequence[Run], families: Sequence[str] = FAMILIES, split: str = "train") -> None:
    """Raises :class:`GridMismatchError` unless every run tracked the same parameters of each family."""
    if not runs:
        raise ValueError("no runs given")
    for family in families:
        reference = runs[0].family(family, split)[0]
        for run in runs[1:]:
            params = run.family(family, split)[0]
            if params.shape != reference.shape or not np.allclose(params, reference, rtol=1e-9, atol=0):
                raise GridMismatchError(
                    f"runs tracked different {family} grids: {runs[0].name!r} has {reference.tolist()}, "
                    f"{run.name!r} has {params.tolist()}; compare runs tracked with the same grids"
                )


# --------------------------------------------------------------------------- #
# Values at a training-loss level
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class LevelPoint:
    """A run's tracked quantities where its training CE first comes down to ``level``.

    Attributes:
        run: the run's name.
        level: the training CE level.
        epoch, step: of the crossing (interpolated).
        values: every train quantity at the crossing (``"ce"`` equals ``level``).
        test: test quantities read at the crossing's step (:func:`interpolate`, at the fraction of the steps
            between the test points around it), or {} if the test points do not bracket it.
        validation: the same of the validation split (runs with ``validation_size``), or {}.
    """

    run: str
    level: float
    epoch: float
    step: float
    values: dict[str, float]
    test: dict[str, float]
    validation: dict[str, float] = dataclasses.field(default_factory=dict)


def check_level(value, what: str = "the level") -> float:
    """``value`` as a training-CE level (a float), or a ValueError naming it as ``what``: a level must be a finite
    number > 0."""
    try:
        level = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a training CE > 0, got {value!r}") from None
    if not (math.isfinite(level) and level > 0):
        raise ValueError(f"{what} must be a finite training CE > 0, got {value!r}")
    return level


def _crossing(ce: np.ndarray, level: float, run_name: str, state: str = "unknown",
              hold: int = 0) -> tuple[int, float]:
    """(i, t): the crossing is between points i-1 and i at fraction t (t = 1 at point i). With ``hold`` > 0,
    the first crossing after which the CE stays at or below the level for the next ``hold`` points."""
    if int(hold) != hold or hold < 0:
        raise ValueError(f"hold must be a whole number of tracking points >= 0, got {hold!r}")
    level = check_level(level)
    if ce.size == 0:
        raise LevelNotReachedError(f"run {run_name!r} has no training points")
    if not np.isfinite(ce[0]) or ce[0] <= 0:
        raise LevelNotReachedError(f"run {run_name!r} starts at a training CE of {ce[0]}")
    if ce[0] == level and _holds(ce, 0, level, hold):
        return 0, 1.0
    if ce[0] < level:
        raise LevelNotReachedError(
            f"run {run_name!r} starts below the level: training CE {ce[0]:.6g} at its first point < {level:.6g}"
        )
    for i in range(1, ce.size):
        if not np.isfinite(ce[i]):
            break  # diverged: nothing after a NaN counts
        if ce[i] <= level and ce[i - 1] > level and _holds(ce, i, level, hold):
            high, low = math.log(ce[i - 1]), math.log(ce[i]) if ce[i] > 0 else -math.inf
            t = 1.0 if low == -math.inf else (high - math.log(level)) / (high - low)
            return i, t
    finite = ce[np.isfinite(ce)]
    settled = f" and stays there for {hold} more points" if hold and finite.min() <= level else ""
    raise LevelNotReachedError(
        f"run {run_name!r} never reaches a training CE of {level:.6g}{settled}: its lowest is {finite.min():.6g} "
        f"over {ce.size} points (state {state}); choose a higher level or train longer"
    )


def _holds(ce: np.ndarray, i: int, level: float, hold: int) -> bool:
    """The CE stays at or below ``level`` at the ``hold`` points after point ``i`` (those that exist: the end of
    a run counts as holding, a NaN as not)."""
    after = ce[i + 1:i + 1 + hold]
    return bool(np.all(np.isfinite(after)) and np.all(after <= level))


def interpolate(v0, v1, t: float):
    """The value at the fraction ``t`` (0 to 1) of the way from ``v0`` to ``v1``, as :func:`at_level` reads
    every tracked quantity between two tracking points.

    Geometric where both values are > 0 (``exp(log v0 + t (log v1 - log v0))``: exact for a quantity that
    changes exponentially in time between the two points, as the training CE roughly does, and for the CE
    itself at a level), linear where either is 0 or negative (``v0 + t (v1 - v0)``: the error and the hinge
    reach 0). ``t = 0`` gives ``v0`` and ``t = 1`` gives ``v1`` exactly; in between, a NaN endpoint gives NaN.

    Args:
        v0, v1: the values at the two points (numbers or arrays of one shape).
        t: the fraction, 0 <= t <= 1.

    Returns:
        A float for numbers, an array for arrays.

    Example:
        >>> interpolate(1.0, 0.25, 0.5), interpolate(0.0, 0.5, 0.5)
        (0.5, 0.25)
    """
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"the fraction t must lie in [0, 1], got {t!r}")
    a, b = np.asarray(v0, dtype=np.float64), np.asarray(v1, dtype=np.float64)
    if t == 0.0 or t == 1.0:
        out = np.broadcast_to(a if t == 0.0 else b, np.broadcast_shapes(a.shape, b.shape)).copy()
    else:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            positive = (a > 0) & (b > 0) & np.isfinite(a) & np.isfinite(b)
            log_a, log_b = np.log(np.where(positive, a, 1.0)), np.log(np.where(positive, b, 1.0))
            out = np.where(positive, np.exp(log_a + t * (log_b - log_a)), a + t * (b - a))
    return float(out) if out.ndim == 0 else out


def _at_step(steps: np.ndarray, column: np.ndarray, step: float) -> float:
    """``column`` (over tracking points at ``steps``) read at ``step`` with :func:`interpolate`, at the fraction
    of the steps between the two finite points around it; NaN when none are around it."""
    ok = np.isfinite(column) & np.isfinite(steps)
    steps, column = steps[ok], column[ok]
    if steps.size == 0 or not steps[0] <= step <= steps[-1]:
        return math.nan
    j = int(np.searchsorted(steps, step, side="left"))
    if steps[j] == step:
        return float(column[j])
    return interpolate(column[j - 1], column[j], (step - steps[j - 1]) / (steps[j] - steps[j - 1]))


def at_level(run: Run, level: float, hold: int = 0) -> LevelPoint:
    """Every tracked quantity of ``run`` where its training CE first comes down to ``level``.

    The crossing lies at the fraction ``t`` of the way, in log CE, between the two tracking points around
    it: the epoch and step are ``t`` of the way between theirs, and every other quantity is read at that
    fraction with :func:`interpolate` (geometrically where both values are > 0, linearly where one is 0; see
    the module docstring). Test quantities are read the same way at the crossing's step.

    Args:
        run: a loaded run.
        level: the training cross-entropy, > 0.
        hold: 0 for the first crossing; k > 0 for the first crossing after which the training CE stays at or
            below ``level`` for the next k tracking points (a *settled* crossing: a noisy CE that dips below
            the level and comes back up does not count; see the module docstring).

    Returns:
        A :class:`LevelPoint`.

    Raises:
        LevelNotReachedError: the run's CE never comes down to ``level`` (or starts below it).
        ValueError: ``level`` is not a finite number > 0 (:func:`check_level`), or ``hold`` not a whole number >= 0.

    Example:
        >>> point = at_level(load_run("runs/fc6_lr0.1"), level=0.08)
        >>> point.values["gcdf@1"], point.epoch
    """
    train = run.columns("train")
    i, t = _crossing(train["ce"], level, run.name, run.state, hold)
    values = {}
    for key, column in train.items():
        if i == 0:
            values[key] = float(column[0])
        elif key in ("epoch", "step"):  # time: t is the fraction of it
            values[key] = float(column[i - 1] + t * (column[i] - column[i - 1]))
        else:
            values[key] = interpolate(column[i - 1], column[i], t)
    values["ce"] = float(level) if i > 0 else float(train["ce"][0])
    epoch, step = values.pop("epoch"), values.pop("step")
    held_out = {}
    for split in ("test", "validation"):
        held_out[split] = {}
        if split in run.splits:
            columns = run.splits[split]
            steps = columns["step"]
            if steps.size and steps[0] <= step <= steps[-1]:
                held_out[split] = {key: _at_step(steps, column, step) for key, column in columns.items()
                                   if key not in ("epoch", "step")}
    return LevelPoint(run=run.name, level=float(level), epoch=epoch, step=step, values=values,
                      test=held_out["test"], validation=held_out["validation"])


def curve_at_levels(run: Run, quantity: str, levels: Sequence[float]) -> np.ndarray:
    """``quantity`` at the first crossing of each level (NaN where the run does not reach it)."""
    out = np.full(len(levels), np.nan)
    for k, level in enumerate(levels):
        try:
            out[k] = at_level(run, level).values[quantity]
        except LevelNotReachedError:
            pass
    return out


def _lowest_train_ce(run: Run) -> Optional[float]:
    """The lowest training CE before the first non-finite one (at_level stops there); None without any."""
    ce = run.columns("train")["ce"]
    cut = int(np.argmax(~np.isfinite(ce))) if not np.all(np.isfinite(ce)) else ce.size
    return float(np.min(ce[:cut])) if cut else None


def common_level(runs: Sequence[Run]) -> float:
    """The lowest training CE that every run reaches: the largest of the runs' minima.

    Raises LevelNotReachedError if some run's minimum is above another run's starting CE.
    """
    if not runs:
        raise ValueError("no runs given")
    lows, starts = [], []
    for run in runs:
        low = _lowest_train_ce(run)
        if low is None:
            raise LevelNotReachedError(f"run {run.name!r} has no finite training CE")
        lows.append(low)
        starts.append(float(run.columns("train")["ce"][0]))
    level = max(lows)
    if level > min(starts):
        raise LevelNotReachedError(
            f"no training CE level is reached by every run: the lowest common one would be {level:.6g}, "
            f"above the starting CE {min(starts):.6g} of another run"
        )
    return level


# --------------------------------------------------------------------------- #
# Crossovers
# --------------------------------------------------------------------------- #
def crossovers(parameters: Sequence[float], a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Where the ordering of ``a`` and ``b`` along a parameter grid flips, on a log-parameter axis.

    Args:
        parameters: the grid [K], any order; values <= 0 and NaN entries are left out.
        a, b: the two runs' values [K].

    Returns:
        The crossover parameters, ascending (empty if one stays below the other).

    Example:
        >>> crossovers([0.5, 1, 2], [1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
        [1.0]
    """
    p, a, b = (np.asarray(v, dtype=np.float64) for v in (parameters, a, b))
    if not (p.shape == a.shape == b.shape and p.ndim == 1):
        raise ValueError(f"parameters, a and b must be 1-D of one length, got {p.shape}, {a.shape}, {b.shape}")
    keep = (p > 0) & np.isfinite(a) & np.isfinite(b)
    order = np.argsort(p[keep])
    x = np.log(p[keep][order])
    d = (a - b)[keep][order]
    result = []
    sign = np.sign(d)
    k = 0
    while k < len(d) - 1:
        if sign[k] == 0:
            k += 1
            continue
        # Next point with a nonzero difference; zeros in between are where it touches.
        j = k + 1
        while j < len(d) and sign[j] == 0:
            j += 1
        if j == len(d):
            break
        if sign[j] != sign[k]:
            if j > k + 1:  # exactly equal at grid points in between: take their (log) middle
                result.append(float(np.exp(0.5 * (x[k + 1] + x[j - 1]))))
            else:
                result.append(float(np.exp(x[k] + d[k] / (d[k] - d[j]) * (x[j] - x[k]))))
        k = j
    return result


@dataclasses.dataclass
class Crossover:
    """One family of two runs (or seed groups) compared at one level.

    Attributes:
        family: ``"gcdf"``, ``"tce"`` or ``"hinge"``.
        level: the training CE level.
        a, b: the two names (runs or group labels).
        parameters: the grid [K], ascending.
        a_values, b_values: the (seed-mean) values [K] at the level.
        a_std, b_std: the seed standard deviations [K] (NaN for one run).
        crossings: the crossover parameters of the (seed-mean) values (:func:`crossovers`).
        lower_at_smallest, lower_at_largest: ``"a"``, ``"b"`` or ``"tie"`` at the grid's ends.
        seed_crossings: for groups, ``{seed: crossings}`` of run a and run b with that seed, for each
            seed both groups have (the spread of the crossover over seeds); {} for single runs.
    """

    family: str
    level: float
    a: str
    b: str
    parameters: np.ndarray
    a_values: np.ndarray
    b_values: np.ndarray
    crossings: list[float]
    lower_at_smallest: str
    lower_at_largest: str
    a_std: np.ndarray = None
    b_std: np.ndarray = None
    seed_crossings: dict = dataclasses.field(default_factory=dict)


def _lower(x: float, y: float) -> str:
    return "a" if x < y else "b" if y < x else "tie"


def compare_at_level(a, b, family: str, level: float, hold: int = 0) -> Crossover:
    """Compares one family of two runs or two :class:`RunGroup` (seed means) at one level (``hold``: see
    :func:`at_level`).

    Raises GridMismatchError when they tracked different grids of ``family``.
    """
    runs_a = a.runs if isinstance(a, RunGroup) else [a]
    runs_b = b.runs if isinstance(b, RunGroup) else [b]
    check_same_grids([*runs_a, *runs_b], families=[family])
    params, names = runs_a[0].family(family)
    if params.size == 0:
        raise ValueError(f"run {runs_a[0].name!r} tracked no {family} losses")
    agg_a = aggregate(runs_a, level, hold)
    agg_b = aggregate(runs_b, level, hold)
    values_a = np.array([agg_a.mean[n] for n in names])
    values_b = np.array([agg_b.mean[n] for n in names])
    label_a = a.label if isinstance(a, RunGroup) else a.name
    label_b = b.label if isinstance(b, RunGroup) else b.name
    seed_crossings = {}
    if isinstance(a, RunGroup) and isinstance(b, RunGroup):
        by_seed = {run.seed: run for run in runs_b}
        for point_a in agg_a.points:
            run_a = next(r for r in runs_a if r.name == point_a.run)
            if run_a.seed in by_seed:
                point_b = at_level(by_seed[run_a.seed], level, hold)
                seed_crossings[run_a.seed] = crossovers(
                    params, [point_a.values[n] for n in names], [point_b.values[n] for n in names])
    return Crossover(
        family=family,
        level=float(level),
        a=label_a,
        b=label_b,
        parameters=params,
        a_values=values_a,
        b_values=values_b,
        crossings=crossovers(params, values_a, values_b),
        lower_at_smallest=_lower(values_a[0], values_b[0]),
        lower_at_largest=_lower(values_a[-1], values_b[-1]),
        a_std=np.array([agg_a.std[n] for n in names]),
        b_std=np.array([agg_b.std[n] for n in names]),
        seed_crossings=seed_crossings,
    )


# --------------------------------------------------------------------------- #
# The ladder: gaps against the training-loss level
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Ladder:
    """Two seed groups compared at a ladder of training-CE levels (:func:`loss_ladder`).

    Attributes:
        a, b: the two groups' labels.
        levels: the levels [L], descending: those every run of both groups reaches.
        skipped: the asked levels some run does not reach, with the reason.
        hold: the crossing definition (see :func:`at_level`).
        families: ``{family: parameters [K]}``.
        ratio: ``{family: [L, K]}``, the seed means' ratio ``mean_a / mean_b``.
        ratio_std: ``{family: [L, K]}``, the sample standard deviation of the seed-paired ratios ``a_s / b_s``
            (seeds both groups have; NaN with fewer than 2).
        crossings: ``{family: [L lists]}``, the crossovers of the seed means at each level.
        seed_crossings: ``{family: [L dicts {seed: crossings}]}``.
        test_error: ``{"a": [L], "b": [L], "a_std": [L], "b_std": [L]}``, the test error at the crossing (seed
            mean and std; NaN where the test points do not bracket it).
        train_error: the same for the training error.
        epochs: ``{"a": [L], "b": [L]}``, the mean epoch of the crossing.
    """

    a: str
    b: str
    levels: list
    skipped: dict
    hold: int
    families: dict
    ratio: dict
    ratio_std: dict
    crossings: dict
    seed_crossings: dict
    test_error: dict
    train_error: dict
    epochs: dict


def _reached(runs: Sequence[Run], level: float, hold: int) -> Optional[str]:
    for run in runs:
        try:
            at_level(run, level, hold)
        except LevelNotReachedError as error:
            return str(error)
    return None


def loss_ladder(a: RunGroup, b: RunGroup, levels: Sequence[float] = DEFAULT_LADDER,
                families: Sequence[str] = FAMILIES, hold: int = 0) -> Ladder:
    """Every family of two seed groups compared at each training-CE level of ``levels``.

    Args:
        a, b: the two settings, e.g. lr 0.1 and lr 0.001 (:func:`group_runs`).
        levels: the ladder; levels some run does not reach (or starts below) are left out and listed in
            ``Ladder.skipped``.
        families: the families to compare (tracked on the same grids by every run).
        hold: the crossing definition: 0 the first crossing, k the first one that holds for k more points.

    Returns:
        A :class:`Ladder` (the ratio ``a / b``: below 1 where ``a`` is lower).

    Raises:
        LevelNotReachedError: no level of the ladder is reached by every run.
        GridMismatchError: the runs tracked different grids.

    Example:
        >>> large_lr, small_lr = group_runs(load_runs(["runs/"]))
        >>> ladder = loss_ladder(large_lr, small_lr, levels=(1.0, 0.3, 0.08), hold=2)
        >>> ladder.ratio["gcdf"][-1], ladder.crossings["gcdf"][-1]
    """
    runs = [*a.runs, *b.runs]
    check_same_grids(runs, families=families)
    kept, skipped = [], {}
    for level in sorted((float(v) for v in levels), reverse=True):
        problem = _reached(runs, level, hold)
        if problem is None:
            kept.append(level)
        else:
            skipped[level] = problem
    if not kept:
        raise LevelNotReachedError("no level of the ladder is reached by every run: " + "; ".join(
            f"{level:g}: {problem}" for level, problem in skipped.items()))
    params = {family: runs[0].family(family)[0] for family in families}
    names = {family: runs[0].family(family)[1] for family in families}
    ratio = {f: np.full((len(kept), params[f].size), np.nan) for f in families}
    ratio_std = {f: np.full((len(kept), params[f].size), np.nan) for f in families}
    crossings = {f: [] for f in families}
    seed_crossings = {f: [] for f in families}
    errors = {key: {"a": [], "b": [], "a_std": [], "b_std": []} for key in ("test", "train")}
    epochs = {"a": [], "b": []}
    b_by_seed = {run.seed: run for run in b.runs}
    for row, level in enumerate(kept):
        agg_a, agg_b = aggregate(a, level, hold), aggregate(b, level, hold)
        pairs = [(at_level(run, level, hold), at_level(b_by_seed[run.seed], level, hold))
                 for run in a.runs if run.seed in b_by_seed]
        for family in families:
            mean_a = np.array([agg_a.mean[n] for n in names[family]])
            mean_b = np.array([agg_b.mean[n] for n in names[family]])
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio[family][row] = mean_a / mean_b
                paired = (np.array([[pa.values[n] for n in names[family]] for pa, _ in pairs], np.float64)
                          / np.array([[pb.values[n] for n in names[family]] for _, pb in pairs], np.float64))
            if len(pairs) > 1:
                with np.errstate(invalid="ignore", over="ignore"):  # inf ratios (a loss at 0 in b): NaN spread
                    ratio_std[family][row] = np.std(paired, axis=0, ddof=1)
            crossings[family].append(crossovers(params[family], mean_a, mean_b))
            seed_crossings[family].append({
                run_a: crossovers(params[family], [pa.values[n] for n in names[family]],
                                  [pb.values[n] for n in names[family]])
                for run_a, (pa, pb) in zip([r.seed for r in a.runs if r.seed in b_by_seed], pairs)})
        for side, agg in (("a", agg_a), ("b", agg_b)):
            for key in ("test", "train"):
                values = [(p.test if key == "test" else p.values).get("error", math.nan) for p in agg.points]
                mean, std = _mean_std(values)
                errors[key][side].append(mean)
                errors[key][side + "_std"].append(std)
            epochs[side].append(agg.epoch_mean)
    return Ladder(a=a.label, b=b.label, levels=kept, skipped=skipped, hold=int(hold), families=params, ratio=ratio,
                  ratio_std=ratio_std, crossings=crossings, seed_crossings=seed_crossings,
                  test_error=errors["test"], train_error=errors["train"], epochs=epochs)


def _ratio_text(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.3g}"


def ladder_markdown(ladder: Ladder, family: str, parameters: Optional[Sequence[float]] = None) -> str:
    """A Markdown table of one family of a :class:`Ladder`: a row per level with the ratio ``a / b`` (± the
    seed-paired spread) at ``parameters`` (default: the whole grid), the crossover(s) and both test errors."""
    grid = ladder.families[family]
    wanted = grid if parameters is None else [p for p in grid if any(math.isclose(p, q) for q in parameters)]
    columns = [int(np.argmin(np.abs(grid - p))) for p in wanted]
    symbol = FAMILY_PARAMETER.get(family, "p")
    header = (["train CE", "epoch a / b"] + [f"{family} {symbol}={grid[k]:g}" for k in columns]
              + ["crossover", "test error a / b"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, level in enumerate(ladder.levels):
        cells = [f"{level:g}", f"{ladder.epochs['a'][row]:.3g} / {ladder.epochs['b'][row]:.3g}"]
        for k in columns:
            value, spread = ladder.ratio[family][row, k], ladder.ratio_std[family][row, k]
            cells.append(_ratio_text(value) + (f" ± {_ratio_text(spread)}" if math.isfinite(spread) else ""))
        found = ladder.crossings[family][row]
        cells.append(", ".join(f"{c:.3g}" for c in found) if found else "none")
        test = ladder.test_error
        cells.append(f"{100 * test['a'][row]:.2f}% / {100 * test['b'][row]:.2f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Seeds
# --------------------------------------------------------------------------- #
def _experiment_key(config: Mapping) -> str:
    # A setting added after a run was made is absent from its config.json: absent and its default are one setting.
    kept = {k: v for k, v in with_added_later(dict(config)).items()
            if k not in _BOOKKEEPING and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    kept["moving_statistics"] = effective_moving_statistics(config)
    return json.dumps(kept, sort_keys=True, default=str)


def _setting_value(config: Mapping, key: str):
    """``config[key]``, with a setting added after the run was made read as its default (:data:`ADDED_LATER`)."""
    return config.get(key, ADDED_LATER.get(key))


def describe_config(config: Mapping, keys: Sequence[str] = _LABEL_KEYS) -> str:
    """A short label such as ``"fc6 lr=0.1 batch=256"`` from the given config keys."""
    parts = []
    for key in keys:
        value = _setting_value(config, key)
        if value is None:
            continue
        if key in ("model", "dataset", "optimizer", "loss"):
            parts.append(str(value))
        else:
            parts.append(f"{_LABEL_SHORT.get(key, key)}={value:g}" if isinstance(value, (int, float)) else
                         f"{_LABEL_SHORT.get(key, key)}={value}")
    return " ".join(parts)


@dataclasses.dataclass
class RunGroup:
    """Runs of one experiment that differ only by seed.

    Attributes:
        label: what tells this group apart from the others it was grouped with.
        config: the first run's config (seed aside, all runs share it).
        runs: the runs, sorted by seed.
    """

    label: str
    config: dict
    runs: list[Run]

    @property
    def seeds(self) -> list:
        return [run.seed for run in self.runs]


# The order of group_runs: the setting first, then from the fastest (largest lr, smallest batch) to the slowest.
_ORDER_SETTING = ("model", "dataset", "optimizer", "loss", "train_subset")
_ORDER_SPEED = (("lr", True), ("batch_size", False), ("ghost_batch_size", False))


def _order_value(value, descending: bool = False) -> tuple:
    """A sort key for one config value: numbers (descending if asked), then strings, then None."""
    if value is None:
        return (2,)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return (0, -value if descending else value)
    return (1, str(value))


def _group_order(config: Mapping) -> tuple:
    return (*(_order_value(config.get(k)) for k in _ORDER_SETTING),
            *(_order_value(config.get(k), descending) for k, descending in _ORDER_SPEED),
            _experiment_key(config))


def group_runs(runs: Sequence[Run]) -> list[RunGroup]:
    """Groups runs whose configs agree except for the seed and bookkeeping keys.

    Labels name only the config keys (model, dataset, lr, batch size, ...) that differ between
    groups, so two groups that differ by learning rate read ``"lr=0.1"`` and ``"lr=0.001"``.

    The order does not depend on the order of ``runs`` (:func:`load_runs` sorts directory names, in which
    ``lr0.01`` comes before ``lr0.1`` and ``b1024`` before ``b256``). Groups are sorted by

    1. the setting: model, dataset, optimizer, training loss, training subset (numbers ascending, then
       names alphabetically, then unset values);
    2. then from the fastest setting to the slowest: **descending learning rate**, then **ascending batch
       size**, then ascending ghost batch size;
    3. then the rest of the config (its JSON text), so that any two groups have a fixed order.

    Two groups that differ only by learning rate or only by batch size therefore unpack as
    ``fast, slow = group_runs(runs)``: the larger learning rate or the smaller batch first, the setting the
    paper expects to be lower at large σ, T, γ. Within a group runs are sorted by seed (then by name), and
    ``config`` is the first one's.

    Raises:
        ValueError: two runs of one group have the same seed (e.g. the same run in two folders, or trained for
            different numbers of epochs): the seed statistics would count one trajectory twice.
    """
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_experiment_key(run.config), []).append(run)
    members_of = [sorted(members, key=lambda r: (r.seed is None, r.seed if isinstance(r.seed, (int, float)) else 0,
                                                 r.name))
                  for members in groups.values()]
    for members in members_of:
        for first, second in zip(members, members[1:]):
            if first.seed is None or second.seed is None:
                raise ValueError(
                    f"runs {first.path} and {second.path} have the same settings in their config.json and "
                    f"{'no seed' if first.seed is None and second.seed is None else 'a seed in only one'}: they "
                    "cannot be told apart or averaged as seeds; give each config.json its 'seed' and the settings "
                    "that differ (lr, batch_size, ...)")
            if first.seed == second.seed:
                raise ValueError(
                    f"runs {first.path} and {second.path} are the same setting with seed {first.seed}: the seed "
                    "statistics would count it twice; give one of them (another seed is another run)")
    members_of.sort(key=lambda members: _group_order(members[0].config))
    configs = [members[0].config for members in members_of]
    # A key is named where groups differ by it; the moving statistics only where two ways of updating them meet
    # (runs of one micro-batch per step have none).
    differing = [k for k in _LABEL_KEYS
                 if len({json.dumps(_setting_value(c, k), default=str) for c in configs
                         if k != "moving_statistics" or c.get(k) is not None}) > 1]
    result = []
    for members in members_of:
        config = members[0].config
        label = describe_config(config, differing) if differing else describe_config(config)
        result.append(RunGroup(label=label or members[0].name, config=config, runs=members))
    return result


@dataclasses.dataclass
class Aggregate:
    """Seed statistics of every train quantity at one level.

    Attributes:
        level: the training CE level.
        n: the number of runs.
        mean, std: per quantity (std: sample standard deviation, ddof = 1; NaN when n = 1).
        epoch_mean, epoch_std: of the crossing.
        points: the runs' :class:`LevelPoint`.
    """

    level: float
    n: int
    mean: dict[str, float]
    std: dict[str, float]
    epoch_mean: float
    epoch_std: float
    points: list[LevelPoint]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    mean = float(np.mean(array))
    std = float(np.std(array, ddof=1)) if array.size > 1 else math.nan
    return mean, std


def aggregate(runs: Sequence[Run] | RunGroup, level: float, hold: int = 0) -> Aggregate:
    """Mean and standard deviation over seeds of every quantity at ``level``.

    Raises:
        LevelNotReachedError: some run does not reach the level (named in the message).
        GridMismatchError: the runs tracked different quantities.
    """
    runs = runs.runs if isinstance(runs, RunGroup) else list(runs)
    if not runs:
        raise ValueError("no runs given")
    points = [at_level(run, level, hold) for run in runs]
    names = list(points[0].values)
    for point in points[1:]:
        if set(point.values) != set(names):
            raise GridMismatchError(
                f"runs {points[0].run!r} and {point.run!r} tracked different quantities: "
                f"{sorted(set(names) ^ set(point.values))}"
            )
    mean, std = {}, {}
    for name in names:
        mean[name], std[name] = _mean_std([p.values[name] for p in points])
    epoch_mean, epoch_std = _mean_std([p.epoch for p in points])
    return Aggregate(float(level), len(points), mean, std, epoch_mean, epoch_std, points)


# --------------------------------------------------------------------------- #
# Summaries (sweeps)
# --------------------------------------------------------------------------- #
_SUMMARY_KEYS = ("model", "dataset", "optimizer", "loss", "lr", "batch_size", "ghost_batch_size", "train_subset",
                 "gradient_penalty", "sam_radius", "seed")
# Besides model and dataset, the config keys of a setting: extreme_pairs compares learning rates or batch
# sizes only between groups that agree on all of them (a gcdf@1 or Adam run is never set against a CE/SGD one).
_SETTING_KEYS = ("optimizer", "loss", "ghost_batch_size", "train_subset", "gradient_penalty", "sam_radius")


def summary_rows(runs: Sequence[Run], level: float) -> list[dict]:
    """One row per run: its identity, state, and every train quantity at ``level``.

    Runs that do not reach the level get ``reached = False`` and empty values instead of an error.
    """
    rows = []
    for run in runs:
        row = {"run": run.name, **{k: run.config.get(k) for k in _SUMMARY_KEYS}, "state": run.state}
        try:
            point = at_level(run, level)
        except LevelNotReachedError:
            row.update(reached=False, epoch_at_level=None, step_at_level=None)
        else:
            row.update(reached=True, epoch_at_level=point.epoch, step_at_level=point.step)
            row.update({k: v for k, v in point.values.items()})
            row.update({f"test_{k}": v for k, v in point.test.items() if k in ("ce", "error")})
            row.update({f"validation_{k}": v for k, v in point.validation.items() if k in ("ce", "error")})
        rows.append(row)
    return rows


def summary_csv(rows: Sequence[dict]) -> str:
    """Rows of :func:`summary_rows` as CSV text (columns: the union, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def extreme_pairs(groups: Sequence[RunGroup]) -> list[tuple[RunGroup, RunGroup, str]]:
    """Pairs of groups at the grid's extremes: for each setting (model, dataset, optimizer, training loss,
    ghost batch size and training subset) and batch size, the largest learning rate against the smallest;
    for each setting and learning rate, the smallest batch size against the largest. Each pair is
    ``(a, b, what)`` with ``a`` the large-lr or small-batch group (the one the paper expects to win at
    large parameters); ``what`` names the model and dataset, and the other setting keys whose values
    differ between the groups."""
    pairs = []
    setting = ("model", "dataset", *_SETTING_KEYS)
    varying = [k for k in _SETTING_KEYS
               if len({json.dumps(_setting_value(g.config, k), default=str) for g in groups}) > 1]
    label_keys = [k for k in _LABEL_KEYS if k in ("model", "dataset", *varying)]

    def index(*keys):
        table: dict = {}
        for group in groups:
            table.setdefault(json.dumps([_setting_value(group.config, k) for k in (*setting, *keys)], default=str),
                             []).append(group)
        return table.values()

    # Learning rates are compared at one batch size and one way of updating BatchNorm's moving statistics;
    # batch sizes from the smallest to the largest with each way the largest was trained.
    ways = {g.config.get("moving_statistics") for g in groups} - {None}
    for members in index("batch_size", "moving_statistics"):
        name, batch = describe_config(members[0].config, label_keys), members[0].config.get("batch_size")
        if len(ways) > 1 and members[0].config.get("moving_statistics") is not None:
            batch = f"{batch} bn={members[0].config['moving_statistics']}"
        lrs = sorted({g.config.get("lr") for g in members if g.config.get("lr") is not None})
        if len(lrs) >= 2:
            high = next(g for g in members if g.config.get("lr") == lrs[-1])
            low = next(g for g in members if g.config.get("lr") == lrs[0])
            where = " ".join(part for part in (name, None if batch is None else f"batch={batch}") if part)
            pairs.append((high, low, f"{where + ': ' if where else ''}lr {lrs[-1]:g} vs {lrs[0]:g}"))
    for members in index("lr"):
        name, lr = describe_config(members[0].config, label_keys), members[0].config.get("lr")
        batches = sorted({g.config.get("batch_size") for g in members if g.config.get("batch_size") is not None})
        if len(batches) >= 2:
            small = next(g for g in members if g.config.get("batch_size") == batches[0])
            larges = [g for g in members if g.config.get("batch_size") == batches[-1]]
            for large in larges:
                how = f" (bn={large.config['moving_statistics']})" if len(larges) > 1 else ""
                pairs.append((small, large, f"{name} lr={lr:g}: batch {batches[0]} vs {batches[-1]}{how}"))
    return pairs


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}g}" if not math.isfinite(std) else f"{mean:.{digits}g} ± {std:.2g}"


def _digits_apart(x: float, y: float, digits: int = 4) -> int:
    """The fewest significant digits, at least ``digits``, at which ``x`` and ``y`` print differently (17
    always tells two different floats apart); ``digits`` for equal or non-finite values."""
    if x == y or not (math.isfinite(x) and math.isfinite(y)):
        return digits
    while digits < 17 and f"{x:.{digits}g}" == f"{y:.{digits}g}":
        digits += 1
    return digits


def summary_markdown(
    runs: Sequence[Run],
    level: float,
    quantities: Sequence[str] = ("gcdf@0.5", "gcdf@1", "gcdf@8", "tce@4", "hinge@4", "error"),
) -> str:
    """A markdown report: seed means ± std at ``level`` per group, and the crossovers between the
    grid's extremes (:func:`extreme_pairs`) for each family. Runs that do not reach the level are
    listed and left out of the means; :class:`LevelNotReachedError` when none does (an empty table)."""
    lines = [f"# Sweep summary at training CE = {level:.4g}", ""]
    reached, missing = [], []
    for run in runs:
        try:
            at_level(run, level)
            reached.append(run)
        except LevelNotReachedError as error:
            missing.append((run, str(error)))
    if not reached:
        lowest = min((low for low in map(_lowest_train_ce, runs) if low is not None), default=math.nan)
        raise LevelNotReachedError(f"none of the {len(runs)} run(s) reaches a training CE of {level:.6g} (the lowest "
                                   f"any reaches is {lowest:.6g}): choose a higher level or train longer")
    groups = group_runs(reached)
    available = [q for q in quantities if q in reached[0].quantities()]
    lines += ["| " + " | ".join(["group", "seeds", "epoch at level", *available]) + " |",
              "|" + "---|" * (3 + len(available))]
    for group in groups:
        agg = aggregate(group, level)
        cells = [_fmt(agg.mean[q], agg.std[q]) for q in available]
        lines.append(f"| {group.label} | {agg.n} | {_fmt(agg.epoch_mean, agg.epoch_std)} | " + " | ".join(cells) + " |")
    lines.append("")
    pairs = extreme_pairs(groups)
    if pairs:
        lines += ["## Crossovers between the grid's extremes", "",
                  "`a` is the large-lr or small-batch run, `b` the other; values are seed means ± std at the "
                  "grid's smallest and largest parameter (with at least 4 significant digits, more where a and b "
                  "would otherwise print alike), and which is lower. The paper expects `b` lower at "
                  "the smallest, `a` lower at the largest, and a Gcdf crossover near σ = 1. The crossover is "
                  "that of the seed means; per seed: of the runs a and b with the same seed.", "",
                  "| comparison | family | smallest | a | b | lower | largest | a | b | lower | crossover "
                  "| per seed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for a, b, what in pairs:
            for family in FAMILIES:
                if not a.runs[0].family(family)[1]:
                    continue
                r = compare_at_level(a, b, family, level)
                cross = ", ".join(f"{c:.3g}" for c in r.crossings) or "none"
                per_seed = "; ".join(f"s{seed}: " + (", ".join(f"{c:.3g}" for c in cs) or "none")
                                     for seed, cs in sorted(r.seed_crossings.items(), key=lambda kv: str(kv[0])))
                symbol = FAMILY_PARAMETER[family]
                # As many digits as it takes for the shown a and b to agree with the "lower" column.
                small = _digits_apart(r.a_values[0], r.b_values[0])
                large = _digits_apart(r.a_values[-1], r.b_values[-1])
                lines.append(
                    f"| {what} | {family} | {symbol}={r.parameters[0]:g} | {_fmt(r.a_values[0], r.a_std[0], small)} "
                    f"| {_fmt(r.b_values[0], r.b_std[0], small)} | {r.lower_at_smallest} "
                    f"| {symbol}={r.parameters[-1]:g} | {_fmt(r.a_values[-1], r.a_std[-1], large)} "
                    f"| {_fmt(r.b_values[-1], r.b_std[-1], large)} | {r.lower_at_largest} | {cross} "
                    f"| {per_seed or '-'} |")
        lines.append("")
    if missing:
        lines += ["## Runs that do not reach the level", ""]
        lines += [f"- {run.name} ({run.state}): {message}" for run, message in missing]
        lines.append("")
    return "\n".join(lines)


def hparams_records(runs: Sequence[Run], level: float,
                    hparam_keys: Sequence[str] = ("model", "dataset", "loss", "optimizer", "lr", "batch_size",
                                                   "ghost_batch_size", "train_subset", "seed"),
                    quantities: Sequence[str] = ("gcdf@0.5", "gcdf@1", "gcdf@8", "error")) -> list[dict]:
    """For TensorBoard's hparams dashboard: per run ``{"run", "hparams": {...}, "metrics": {...}}``.

    Metrics are named ``at_level/<quantity>`` plus ``at_level/epoch``; runs that do not reach
    the level get only ``final/ce`` (their lowest training CE). Writing them needs TensorFlow and
    is left to the caller (``experiments/sweep.py``).
    """
    records = []
    for run in runs:
        hparams = {k: run.config[k] for k in hparam_keys if run.config.get(k) is not None}
        metrics = {}
        try:
            point = at_level(run, level)
            metrics["at_level/epoch"] = point.epoch
            metrics.update({f"at_level/{q}": point.values[q] for q in quantities if q in point.values})
        except LevelNotReachedError:
            pass
        ce = run.columns("train")["ce"]
        metrics["final/ce"] = float(np.nanmin(ce))
        records.append({"run": run.name, "hparams": hparams, "metrics": metrics})
    return records


# --------------------------------------------------------------------------- #
# At a budget, and judging explicit terms (docs/EXPLICIT.md)
# --------------------------------------------------------------------------- #
def at_budget(run: Run, epoch: Optional[float] = None, step: Optional[float] = None) -> LevelPoint:
    """Every tracked quantity of ``run`` after ``epoch`` epochs or ``step`` optimizer steps (give one): the
    comparison at an equal budget, beside the paper's at an equal training CE (:func:`at_level`).

    Each column of every split is read at the step with :func:`interpolate` between the tracking points around it
    (as :func:`at_level` reads the test split); ``level`` of the result is the training CE there.

    Args:
        run: a loaded run.
        epoch: epochs trained (a batch of 16384 takes 64 times fewer steps per epoch than one of 256).
        step: optimizer steps taken (Hoffer et al.'s "regime adaptation" compares at equal steps).

    Returns:
        A :class:`LevelPoint`.

    Raises:
        BudgetNotReachedError: the run's training points end before that budget.
        ValueError: neither or both of ``epoch`` and ``step``, or a negative one.

    Example:
        >>> point = at_budget(load_run("runs/fc6_b16384"), epoch=150)
        >>> point.level, point.test["error"]
    """
    if (epoch is None) == (step is None):
        raise ValueError("give the budget as epoch= or as step=, one of them")
    what, value = ("epoch", epoch) if epoch is not None else ("step", step)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number >= 0, got {value!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    train = run.columns("train")
    if train["step"].size == 0 or not train[what][-1] >= value:
        last = float(train[what][-1]) if train[what].size else 0.0
        raise BudgetNotReachedError(f"run {run.name!r} was tracked up to {what} {last:g}, not {value:g} "
                                    f"(state {run.state}): train it longer, or ask for a smaller budget")
    # Steps and epochs are proportional (linear between points); the step is what every split is read at.
    step = float(np.interp(value, train["epoch"], train["step"])) if what == "epoch" else value
    read = {}
    for split in ("train", "test", "validation"):
        columns = run.splits.get(split)
        values = {} if columns is None else {key: _at_step(columns["step"], column, step)
                                             for key, column in columns.items() if key not in ("epoch", "step")}
        # A held-out split whose points do not bracket the step gives {} (as in at_level).
        read[split] = values if split == "train" or any(math.isfinite(v) for v in values.values()) else {}
    return LevelPoint(run=run.name, level=read["train"]["ce"], epoch=float(np.interp(step, train["step"],
                                                                                      train["epoch"])),
                      step=step, values=read["train"], test=read["test"], validation=read["validation"])


@dataclasses.dataclass
class GapClosed:
    """How much of the gap between two baselines a treatment closes, over seeds.

    Attributes:
        quantity: what was compared (e.g. ``"test error"``).
        small, large, treated: ``(mean, std)`` over seeds of the small-batch baseline, the large-batch one and
            the large batch with the explicit term (std with ddof = 1; NaN for one seed).
        fraction: ``(large - treated) / (large - small)`` of the means: 0 where the term changes nothing, 1 where
            it reaches the small batch, above 1 past it, below 0 the wrong way; NaN when the baselines are equal.
        gap_beyond_spread: whether the baselines' means differ by more than twice the standard error of their
            difference (``2 sqrt(s_small^2 / n_small + s_large^2 / n_large)``); a fraction of a gap inside the
            seed spread says little.
    """

    quantity: str
    small: tuple[float, float]
    large: tuple[float, float]
    treated: tuple[float, float]
    fraction: float
    gap_beyond_spread: bool


def gap_closed(small: Sequence[float], large: Sequence[float], treated: Sequence[float],
               quantity: str = "") -> GapClosed:
    """The fraction of the gap between the ``large`` and the ``small`` baseline that ``treated`` closes.

    ``fraction = (mean(large) - mean(treated)) / (mean(large) - mean(small))``, as Novack et al. (ICLR 2023) read
    "two thirds of the gap": (89.83 %, 92.64 %) with a treatment at 91.75 % gives 0.68.

    Args:
        small, large, treated: one value per seed each (e.g. the test error at a training CE, from
            :func:`at_level`, or at a budget, from :func:`at_budget`); finite.
        quantity: a name for the result.

    Returns:
        A :class:`GapClosed`.

    Example:
        >>> gap_closed([92.64], [89.83], [91.75]).fraction
        0.6832...
    """
    arrays = {}
    for name, values in (("small", small), ("large", large), ("treated", treated)):
        array = np.asarray(values, dtype=np.float64).ravel()
        if array.size == 0 or not np.all(np.isfinite(array)):
            raise ValueError(f"gap_closed needs one finite value per seed for {name!r}, got {list(values)!r}")
        arrays[name] = array
    stats = {name: _mean_std(array) for name, array in arrays.items()}
    gap = stats["large"][0] - stats["small"][0]
    fraction = (stats["large"][0] - stats["treated"][0]) / gap if gap != 0 else math.nan
    variance = sum(std ** 2 / arrays[name].size for name, (_, std) in stats.items()
                   if name != "treated" and math.isfinite(std))
    beyond = bool(gap != 0 and abs(gap) > 2 * math.sqrt(variance)) if all(
        arrays[name].size > 1 for name in ("small", "large")) else False
    return GapClosed(quantity, stats["small"], stats["large"], stats["treated"], float(fraction), beyond)


def _family_means(runs: Sequence[Run] | RunGroup, level: float, family: str, min_parameter: float, hold: int
                  ) -> dict[float, float]:
    group = aggregate(runs, level, hold)
    names = list(group.mean)
    params, columns = family_names(names, family)
    chosen = {float(p): group.mean[c] for p, c in zip(params, columns) if p >= min_parameter}
    if not chosen:
        raise ValueError(f"no {family} parameter >= {min_parameter:g} was tracked (the grid is {params.tolist()})")
    return chosen


def profile_distance(candidate: Sequence[Run] | RunGroup, reference: Sequence[Run] | RunGroup, level: float,
                     family: str = "gcdf", min_parameter: float = 2.0, hold: int = 0) -> float:
    """How far ``candidate``'s alternative-loss profile lies from ``reference``'s at an equal training CE: the mean
    over the family's parameters >= ``min_parameter`` of ``|log(candidate / reference)|`` of the seed means at the
    level (0 for the same profile; 0.1 is about 10 % apart). The large-σ Gcdf is where the paper finds the small
    batch lower (figs. 5, 13-16): the explicit term that makes the large batch's profile the small batch's there
    brings this to 0.

    Args:
        candidate, reference: runs (or a :class:`RunGroup`) of one setting each, tracked with the same grids.
        level: the training CE.
        family: ``"gcdf"``, ``"tce"`` or ``"hinge"``.
        min_parameter: the smallest σ (T, γ) counted.
        hold: as in :func:`at_level`.

    Raises:
        LevelNotReachedError: a run does not reach the level.
        ValueError: no parameter of the family at or above ``min_parameter``, or a value <= 0.
    """
    a = _family_means(candidate, level, family, min_parameter, hold)
    b = _family_means(reference, level, family, min_parameter, hold)
    if set(a) != set(b):
        raise GridMismatchError(f"the runs tracked different {family} grids: {sorted(a)} and {sorted(b)}")
    if not all(a[p] > 0 and b[p] > 0 for p in a):
        raise ValueError(f"{family} values must be > 0 for a distance in log: {a} against {b}")
    return float(np.mean([abs(math.log(a[p] / b[p])) for p in a]))


def choose_by_profile(candidates: Sequence[RunGroup], reference: Sequence[Run] | RunGroup, level: float,
                      family: str = "gcdf", min_parameter: float = 2.0, hold: int = 0
                      ) -> tuple[RunGroup, dict[str, float]]:
    """The candidate whose profile at ``level`` comes closest to ``reference``'s (:func:`profile_distance`), and
    every candidate's distance by label: question (i) of docs/EXPLICIT.md, choosing λ (or ρ) from a grid.

    Candidates that do not reach the level are left out (their distance reads NaN); a ValueError when none does.
    """
    distances = {}
    for group in candidates:
        try:
            distances[group.label] = profile_distance(group, reference, level, family, min_parameter, hold)
        except LevelNotReachedError:
            distances[group.label] = math.nan
    return _least(candidates, distances, f"no candidate reaches a training CE of {level:g}"), distances


def choose_by_validation(candidates: Sequence[RunGroup], level: float, quantity: str = "error", hold: int = 0
                         ) -> tuple[RunGroup, dict[str, float]]:
    """The candidate with the lowest validation ``quantity`` (seed mean) where its training CE reaches ``level``,
    and every candidate's value by label: question (ii) of docs/EXPLICIT.md. The test set chooses nothing.

    Raises:
        ValueError: a candidate's runs have no validation split at the level (train with ``validation_size``),
            or none reaches the level.
    """
    values = {}
    for group in candidates:
        try:
            points = [at_level(run, level, hold) for run in group.runs]
        except LevelNotReachedError:
            values[group.label] = math.nan
            continue
        for point in points:
            if quantity not in point.validation:
                raise ValueError(f"run {point.run!r} has no validation {quantity!r} at a training CE of {level:g}: "
                                 "train with validation_size (--validation-size) to choose on it")
        values[group.label] = float(np.mean([point.validation[quantity] for point in points]))
    return _least(candidates, values, f"no candidate reaches a training CE of {level:g}"), values


def _least(candidates: Sequence[RunGroup], values: Mapping[str, float], none: str) -> RunGroup:
    finite = [group for group in candidates if math.isfinite(values[group.label])]
    if not finite:
        raise ValueError(none)
    return min(finite, key=lambda group: values[group.label])
