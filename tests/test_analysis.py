"""keras_implicit.analysis on synthetic run directories with known answers."""

import itertools
import json
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from keras_implicit import analysis

SIGMAS = (0.25, 0.5, 1.0, 2.0, 4.0)
TEMPERATURES = (0.5, 1.0, 4.0)
MARGINS = (0.5, 1.0, 4.0)


def write_run(path, records, *, state="finished", grids=None, **config):
    """A run directory as experiments/run.py writes it (config.json, status.json, metrics.jsonl)."""
    path.mkdir(parents=True, exist_ok=True)
    sigmas, temperatures, margins = grids or (SIGMAS, TEMPERATURES, MARGINS)
    base = {"model": "fc6", "dataset": "fashion_mnist", "lr": 0.1, "batch_size": 256, "ghost_batch_size": None,
            "epochs": 10, "seed": 0, "optimizer": "sgd", "loss": "ce", "train_subset": None, "track_every": 1,
            "target_train_loss": None, "data_dir": "/tmp/data", "sigmas": list(sigmas),
            "temperatures": list(temperatures), "margins": list(margins), "versions": {}, "git_commit": "abc"}
    base.update(config)
    (path / "config.json").write_text(json.dumps(base))
    last = records[-1] if records else {"epoch": 0, "step": 0}
    (path / "status.json").write_text(json.dumps({"state": state, "epoch": last["epoch"], "step": last["step"]}))
    with open(path / "metrics.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def names(grids=(SIGMAS, TEMPERATURES, MARGINS)):
    sig, tem, mar = grids
    return ([f"gcdf@{analysis_format(s)}" for s in sig] + [f"tce@{analysis_format(t)}" for t in tem]
            + [f"hinge@{analysis_format(g)}" for g in mar])


def analysis_format(value):
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def records_from(ce, family_fn, steps_per_epoch=10, grids=(SIGMAS, TEMPERATURES, MARGINS), test=True):
    """Records with train CE ``ce[k]`` at epoch k and every family value ``family_fn(name, param, ce)``."""
    out = []
    for k, c in enumerate(ce):
        record = {"epoch": float(k), "step": k * steps_per_epoch, "split": "train", "ce": float(c),
                  "error": float(c) / 4, "feature_norm": 1.0, "top_kernel_norm": 1.0 + k, "top_bias_norm": 0.1}
        for name in names(grids):
            family, param = analysis.parse_name(name)
            record[name] = float(family_fn(family, param, c))
        out.append(record)
        if test:
            out.append({**record, "split": "test", "ce": float(c) * 1.5, "error": float(c) / 3})
    return out


def power_of_ce(family, param, ce):
    # A power of the CE: exponential in time wherever the CE is, so the interpolation at a level (geometric in the
    # fraction of time t) reproduces it exactly at any level.
    return (3.0 + param) * ce ** 0.5


# --------------------------------------------------------------------------- #
# Names
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, expected", [
    ("gcdf@0.5", ("gcdf", 0.5)), ("tce@2", ("tce", 2.0)), ("hinge@1e-05", ("hinge", 1e-05)),
    ("ce", ("ce", None)), ("error", ("error", None)),
])
def test_parse_name(name, expected):
    assert analysis.parse_name(name) == expected


def test_parse_name_rejects_non_number():
    with pytest.raises(ValueError, match="not a number"):
        analysis.parse_name("gcdf@big")


def test_family_names_sorted_numerically():
    params, cols = analysis.family_names(["gcdf@16", "gcdf@2", "tce@1", "gcdf@0.5", "error"], "gcdf")
    np.testing.assert_array_equal(params, [0.5, 2.0, 16.0])
    assert cols == ["gcdf@0.5", "gcdf@2", "gcdf@16"]


def test_parses_the_core_names():
    from keras_implicit import losses  # imports TensorFlow; the analysis module itself never does
    core = losses.panel_names([0.0625, 1.0, 16.0], [0.25, 2.0], [1e-05, 4.0], error=True)
    assert [analysis.parse_name(n) for n in core] == [
        ("gcdf", 0.0625), ("gcdf", 1.0), ("gcdf", 16.0), ("tce", 0.25), ("tce", 2.0),
        ("hinge", 1e-05), ("hinge", 4.0), ("error", None)]
    # The test helper writes the same names as the core.
    assert names(((0.0625, 1.0), (0.25,), (16.0,))) == losses.panel_names([0.0625, 1.0], [0.25], [16.0])


# --------------------------------------------------------------------------- #
# Loading and bad input
# --------------------------------------------------------------------------- #
def test_load_run_columns(tmp_path):
    run = analysis.load_run(write_run(tmp_path / "r", records_from([2.0, 1.0, 0.5], power_of_ce)))
    assert run.name == "r" and run.state == "finished" and run.seed == 0
    epochs, ce = run.series("ce")
    np.testing.assert_array_equal(epochs, [0, 1, 2])
    np.testing.assert_array_equal(ce, [2.0, 1.0, 0.5])
    np.testing.assert_array_equal(run.series("ce", split="test")[1], [3.0, 1.5, 0.75])
    params, cols = run.family("gcdf")
    np.testing.assert_array_equal(params, SIGMAS)
    assert "top_kernel_norm" in run.quantities()
    columns = run.columns("test")
    assert list(columns)[:2] == ["epoch", "step"] and set(run.quantities("test")) <= set(columns)
    np.testing.assert_array_equal(columns["ce"], [3.0, 1.5, 0.75])


def test_missing_metrics_file(tmp_path):
    path = write_run(tmp_path / "r", records_from([2.0, 1.0], power_of_ce))
    (path / "metrics.jsonl").unlink()
    with pytest.raises(analysis.RunDirectoryError, match="metrics.jsonl is missing"):
        analysis.load_run(path)


def test_missing_config(tmp_path):
    path = write_run(tmp_path / "r", records_from([2.0, 1.0], power_of_ce))
    (path / "config.json").unlink()
    with pytest.raises(analysis.RunDirectoryError, match="config.json is missing"):
        analysis.load_run(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(analysis.RunDirectoryError, match="nothing does not exist"):
        analysis.load_run(tmp_path / "nothing")
    path = write_run(tmp_path / "r", records_from([2.0, 1.0], power_of_ce))
    # A file of a run directory, given for the directory: said so, not "does not exist".
    for find in (analysis.load_run, lambda p: analysis.find_run_dirs([p]), lambda p: analysis.load_runs([p])):
        with pytest.raises(analysis.RunDirectoryError,
                           match=r"metrics.jsonl is a file, not a run directory.*did you mean .*r\?\)"):
            find(path / "metrics.jsonl")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(analysis.RunDirectoryError, match=r"notes.txt is a file, not a run directory: give"):
        analysis.find_run_dirs([tmp_path / "notes.txt"])


@pytest.mark.parametrize("damage", ["truncated", "not an object", "a directory"])
def test_unreadable_status_is_a_warning_and_an_unknown_state(tmp_path, damage):
    # status.json only summarizes the run: run.py resumes over a damaged one, and so the analysis reads the run.
    path = write_run(tmp_path / "r", records_from([2.0, 1.0, 0.5], power_of_ce))
    status = path / "status.json"
    if damage == "truncated":
        status.write_text('{"state": "fini')
    elif damage == "not an object":
        status.write_text("[1, 2]")
    else:
        status.unlink()
        status.mkdir()
    with pytest.warns(RuntimeWarning, match=r"status.json .*it only summarizes the run; reading the run with its "
                                            r"state unknown"):
        run = analysis.load_run(path)
    assert run.state == "unknown" and run.status == {}
    assert analysis.at_level(run, 1.0).values["ce"] == 1.0
    status_missing = write_run(tmp_path / "m", records_from([2.0, 1.0], power_of_ce))
    (status_missing / "status.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert analysis.load_run(status_missing).state == "unknown"  # missing: no warning


def test_truncated_last_line_dropped_with_warning_or_error_when_strict(tmp_path):
    path = write_run(tmp_path / "r", records_from([2.0, 1.0, 0.5], power_of_ce, test=False), state="running")
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3.0, "step": 30, "split": "train", "ce": 0.2')
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        run = analysis.load_run(path)
    np.testing.assert_array_equal(run.series("ce")[1], [2.0, 1.0, 0.5])
    with pytest.raises(analysis.RunDirectoryError, match=r"metrics.jsonl:4: truncated last line"):
        analysis.load_run(path, strict=True)


def test_malformed_middle_line_is_an_error(tmp_path):
    path = write_run(tmp_path / "r", records_from([2.0, 1.0, 0.5], power_of_ce, test=False))
    lines = (path / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(analysis.RunDirectoryError, match=r"metrics.jsonl:2: malformed line"):
        analysis.load_run(path)


@pytest.mark.parametrize("content, match", [
    ("", "no complete tracking point"),
    ('{"epoch": 0, "st', "no complete tracking point"),
    ('{"epoch": 0, "step": 0, "split": "test", "ce": 2.3}\n', "no 'train' records"),
    ('{"epoch": 0, "step": 0, "split": "train", "error": 0.9}\n', "no 'ce'"),
    ('{"epoch": 0, "split": "train", "ce": 2.3}\n', "no 'step'"),
])
def test_unusable_metrics_file(tmp_path, content, match):
    path = write_run(tmp_path / "r", [])
    (path / "metrics.jsonl").write_text(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(analysis.RunDirectoryError, match=match):
            analysis.load_run(path)


def test_resumed_run_replaces_retracked_points(tmp_path):
    # Logged epochs 0..3, killed, resumed from the epoch-1 checkpoint: epochs 2.. are tracked again.
    first = records_from([2.0, 1.0, 0.9, 0.8], power_of_ce, test=False)
    again = records_from([2.0, 1.0, 0.5, 0.25, 0.1], power_of_ce, test=False)[2:]
    run = analysis.load_run(write_run(tmp_path / "r", first + again))
    np.testing.assert_array_equal(run.series("ce")[1], [2.0, 1.0, 0.5, 0.25, 0.1])
    np.testing.assert_array_equal(run.series("ce", x="step")[0], [0, 10, 20, 30, 40])


def test_find_run_dirs_expands_a_folder(tmp_path):
    for name in ("b", "a"):
        write_run(tmp_path / "runs" / name, records_from([2.0, 1.0], power_of_ce))
    (tmp_path / "runs" / "not_a_run").mkdir()
    assert [p.name for p in analysis.find_run_dirs([tmp_path / "runs"])] == ["a", "b"]
    with pytest.raises(analysis.RunDirectoryError, match="neither a run directory"):
        analysis.find_run_dirs([tmp_path / "runs" / "not_a_run"])


def test_different_grids_are_an_error(tmp_path):
    a = analysis.load_run(write_run(tmp_path / "a", records_from([2.0, 0.5], power_of_ce)))
    other = ((0.25, 0.5, 1.0, 8.0), TEMPERATURES, MARGINS)
    b = analysis.load_run(write_run(tmp_path / "b", records_from([2.0, 0.5], power_of_ce, grids=other),
                                    grids=other))
    with pytest.raises(analysis.GridMismatchError, match=r"different gcdf grids.*\[0.25, 0.5, 1.0, 8.0\]"):
        analysis.check_same_grids([a, b])
    analysis.check_same_grids([a, b], families=["tce", "hinge"])  # the others agree
    with pytest.raises(analysis.GridMismatchError):
        analysis.compare_at_level(a, b, "gcdf", 1.0)


# --------------------------------------------------------------------------- #
# Interpolation at a level
# --------------------------------------------------------------------------- #
def test_at_level_geometric_at_the_fraction_of_time(tmp_path):
    ce = [2.0, 1.0, 0.25, 0.1]
    gcdf = {2.0: 0.9, 1.0: 0.5, 0.25: 0.1, 0.1: 0.05}
    run = analysis.load_run(write_run(tmp_path / "r", records_from(ce, lambda f, p, c: gcdf[c])))
    point = analysis.at_level(run, 0.5)
    # log 0.5 is halfway between log 1 and log 0.25: t = 1/2 of the time between epochs 1 and 2.
    assert point.epoch == pytest.approx(1.5) and point.step == pytest.approx(15)
    assert point.values["gcdf@1"] == pytest.approx(math.sqrt(0.5 * 0.1))  # geometric: both values > 0
    assert point.values["ce"] == 0.5
    assert point.values["error"] == pytest.approx(0.5 / 4)  # error = CE / 4 at every point: exactly level / 4
    assert point.values["top_kernel_norm"] == pytest.approx(math.sqrt(2.0 * 3.0))
    # Test quantities: the same rule at the crossing's step, halfway between the test points at steps 10 and 20.
    assert point.test["ce"] == pytest.approx(math.sqrt(1.5 * 0.375))
    # Exactly at a tracking point.
    assert analysis.at_level(run, 1.0).values["gcdf@1"] == pytest.approx(0.5)
    assert analysis.at_level(run, 1.0).epoch == pytest.approx(1.0)


@pytest.mark.parametrize("level", [1.9, 1.3, 0.77, 0.3, 0.0502])
def test_at_level_reproduces_a_power_of_ce(tmp_path, level):
    ce = np.geomspace(2.3, 0.05, 9)
    run = analysis.load_run(write_run(tmp_path / "r", records_from(ce, power_of_ce)))
    point = analysis.at_level(run, level)
    for sigma in SIGMAS:
        expected = (3.0 + sigma) * level ** 0.5
        assert point.values[f"gcdf@{analysis_format(sigma)}"] == pytest.approx(expected, rel=1e-12)
    # Epoch is linear in log CE too, with CE geometric in epoch: epoch = log(2.3 / level) / log(ratio).
    ratio = ce[0] / ce[1]
    assert point.epoch == pytest.approx(math.log(2.3 / level) / math.log(ratio))


def _thinned_records(seed=0, points=12):
    """Train records whose CE falls irregularly (factors 1.1-8 between points, with a bump), as records thinned
    to one per epoch are; ``tce@1`` is the CE itself, ``gcdf@1`` an unrelated positive quantity, the error
    sometimes 0."""
    rng = np.random.default_rng(seed)
    ce = 2.3 * np.cumprod(np.r_[1.0, rng.uniform(1 / 8, 1 / 1.1, points - 1)])
    ce[4] = ce[3] * 1.2  # a bump: the first crossing of levels just below ce[3] comes before it
    records = []
    for k, c in enumerate(ce):
        records.append({"epoch": float(k), "step": 7 * k, "split": "train", "ce": float(c), "tce@1": float(c),
                        "gcdf@1": float(rng.uniform(0.1, 3.0)), "error": float(max(0.0, rng.uniform(-0.2, 0.5)))})
    return ce, records


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_quantity_equal_to_ce_comes_out_at_the_level(tmp_path, seed):
    # tce@1 (the tempered CE at T = 1) is the training CE: at any level it must read as the level itself.
    ce, records = _thinned_records(seed)
    run = analysis.load_run(write_run(tmp_path / "r", records, grids=((1.0,), (1.0,), ())))
    for level in np.geomspace(ce[0] * 0.999, ce.min(), 25):
        point = analysis.at_level(run, level)
        assert abs(point.values["tce@1"] / level - 1) < 1e-12, (level, point.values["tce@1"])
        assert point.values["ce"] == level


def test_a_quantity_exponential_in_time_is_recovered_exactly(tmp_path):
    # The CE decays exponentially in time between points, at a different rate in each interval; v(time) =
    # 2.5 exp(-0.37 time) and 0.4 exp(0.8 time) have rates of their own. Where CE(T*) = level, at_level must
    # give the time T* and v(T*) exactly.
    times = np.array([0.0, 0.5, 2.0, 2.75, 5.0, 6.0])
    rates = np.array([0.9, 0.3, 1.7, 0.2, 1.1])  # the CE's decay rate in each interval
    log_ce = np.log(2.3) - np.r_[0.0, np.cumsum(rates * np.diff(times))]
    records = [{"epoch": float(t), "step": float(100 * t), "split": "train", "ce": float(math.exp(lc)),
                "gcdf@1": 2.5 * math.exp(-0.37 * t), "hinge@1": 0.4 * math.exp(0.8 * t)}
               for t, lc in zip(times, log_ce)]
    run = analysis.load_run(write_run(tmp_path / "r", records, grids=((1.0,), (), (1.0,))))
    for level in np.exp(np.linspace(log_ce[0] - 0.01, log_ce[-1], 17)):
        k = int(np.argmax(log_ce <= math.log(level)))  # the interval (k - 1, k) holding the crossing
        crossing = times[k - 1] + (log_ce[k - 1] - math.log(level)) / rates[k - 1]  # CE(T*) = level
        point = analysis.at_level(run, level)
        assert point.epoch == pytest.approx(crossing, rel=1e-12)
        assert point.step == pytest.approx(100 * crossing, rel=1e-12)
        assert point.values["gcdf@1"] == pytest.approx(2.5 * math.exp(-0.37 * crossing), rel=1e-12)
        assert point.values["hinge@1"] == pytest.approx(0.4 * math.exp(0.8 * crossing), rel=1e-12)


def test_linear_where_a_value_is_zero(tmp_path):
    # The error and the hinge reach 0; gcdf@0 starts at 0: no logarithm there, the interpolation is linear.
    ce = [2.0, 1.0, 0.25]
    columns = zip(ce, [0.5, 0.2, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.3])
    records = [{"epoch": float(k), "step": 10 * k, "split": "train", "ce": c, "error": e, "hinge@1": h,
                "gcdf@0": g, "gcdf@1": 0.5 * c} for k, (c, e, h, g) in enumerate(columns)]
    run = analysis.load_run(write_run(tmp_path / "r", records, grids=((0.0, 1.0), (), (1.0,))))
    point = analysis.at_level(run, 0.5)  # t = 1/2 between points 1 and 2
    assert point.values["error"] == pytest.approx(0.1)
    assert point.values["hinge@1"] == 0.0
    assert point.values["gcdf@0"] == pytest.approx(0.15)
    assert point.values["gcdf@1"] == pytest.approx(0.25, rel=1e-12)  # > 0 at both ends: geometric
    t = math.log(2.0 / 1.5) / math.log(2.0)  # level 1.5, between points 0 and 1
    point = analysis.at_level(run, 1.5)
    assert point.values["hinge@1"] == pytest.approx(1.0 - t)
    assert point.values["error"] == pytest.approx(0.5 * (0.2 / 0.5) ** t)


def reference_interpolate(v0, v1, t):
    """The rule written out per element, independently: v0 (v1 / v0)^t when both are > 0, else linear."""
    out = []
    for a, b in zip(np.ravel(v0), np.ravel(v1)):
        if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b):
            out.append(a * (b / a) ** t)
        else:
            out.append(a + t * (b - a))
    return np.array(out)


def test_interpolate_against_a_numpy_reference():
    rng = np.random.default_rng(3)
    v0 = np.exp(rng.uniform(-30, 5, 400))
    v1 = np.exp(rng.uniform(-30, 5, 400))
    v0[::7], v1[::11], v0[::13] = 0.0, 0.0, -0.5  # zeros and a negative value: the linear rule
    v1[5] = math.nan
    for t in (1e-9, 0.25, 0.5, 0.731, 1 - 1e-12):
        got = analysis.interpolate(v0, v1, t)
        np.testing.assert_allclose(got, reference_interpolate(v0, v1, t), rtol=1e-12, atol=0)
        assert math.isnan(got[5])
    np.testing.assert_array_equal(analysis.interpolate(v0, v1, 0.0), v0)
    np.testing.assert_array_equal(analysis.interpolate(v0, v1, 1.0), v1)
    assert analysis.interpolate(4, 1, 0.5) == pytest.approx(2.0) and isinstance(analysis.interpolate(4, 1, 0.5), float)
    with pytest.raises(ValueError, match=r"fraction t must lie in \[0, 1\]"):
        analysis.interpolate(1.0, 2.0, 1.5)


def reference_at_level(train, test, level):
    """at_level written independently with NumPy: the first crossing, t in log CE, epoch and step linear in t,
    every other column by reference_interpolate; test columns at the crossing's step, at the fraction of the
    steps between the test points around it."""
    ce = train["ce"]
    i = int(np.flatnonzero((ce[1:] <= level) & (ce[:-1] > level))[0]) + 1
    t = (np.log(ce[i - 1]) - np.log(level)) / (np.log(ce[i - 1]) - np.log(ce[i]))
    values = {}
    for key, column in train.items():
        if key in ("epoch", "step"):
            values[key] = column[i - 1] + t * (column[i] - column[i - 1])
        else:
            values[key] = reference_interpolate([column[i - 1]], [column[i]], t)[0]
    values["ce"] = level
    step = values["step"]
    j = int(np.searchsorted(test["step"], step))
    s = (step - test["step"][j - 1]) / (test["step"][j] - test["step"][j - 1])
    tested = {key: reference_interpolate([column[j - 1]], [column[j]], s)[0]
              for key, column in test.items() if key not in ("epoch", "step")}
    return values, tested


@pytest.mark.parametrize("seed", [0, 1])
def test_at_level_against_a_numpy_reference(tmp_path, seed):
    # A noisy CE; quantities equal to it, positive, sometimes 0, or unrelated to it; test points at steps of their
    # own (every third train point, shifted).
    rng = np.random.default_rng(seed)
    n = 40
    ce = 2.3 * np.exp(np.cumsum(np.r_[0.0, rng.normal(-0.12, 0.15, n - 1)]))
    train = {"epoch": np.arange(n) / 4.0, "step": np.arange(n) * 8.0, "ce": ce,
             "tce@1": ce.copy(), "gcdf@1": np.exp(rng.normal(0, 1, n)), "error": np.maximum(rng.normal(0.1, 0.1, n), 0),
             "hinge@1": np.where(rng.uniform(size=n) < 0.3, 0.0, rng.uniform(0, 3, n))}
    test_steps = np.r_[0.0, np.arange(1, n // 3 + 1) * 24.0 - 5.0, (n - 1) * 8.0]
    test = {"epoch": test_steps / 32, "step": test_steps, "ce": np.exp(rng.normal(0, 0.5, test_steps.size)),
            "error": np.maximum(rng.normal(0.1, 0.1, test_steps.size), 0)}
    records = [{"split": "train", **{key: float(column[k]) for key, column in train.items()}} for k in range(n)]
    records += [{"split": "test", **{key: float(column[k]) for key, column in test.items()}}
                for k in range(test_steps.size)]
    records.sort(key=lambda r: r["step"])
    run = analysis.load_run(write_run(tmp_path / "r", records, grids=((1.0,), (1.0,), (1.0,))))
    checked = 0
    for level in np.geomspace(2.2, ce.min() * 1.0001, 30):
        if ce[0] <= level:
            continue
        checked += 1
        point = analysis.at_level(run, level)
        values, tested = reference_at_level(train, test, level)
        assert point.epoch == pytest.approx(values.pop("epoch"), rel=1e-12)
        assert point.step == pytest.approx(values.pop("step"), rel=1e-12)
        assert set(point.values) == set(values) and set(point.test) == set(tested)
        for key, value in values.items():
            assert point.values[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        for key, value in tested.items():
            assert point.test[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert checked > 20


def test_every_reading_at_a_level_is_at_level(tmp_path):
    # One definition: aggregate, compare_at_level, loss_ladder (its ratios, train and test error),
    # curve_at_levels, summary_rows and hparams_records give at_level's values, here on irregular single-seed
    # runs where the interpolation rule matters.
    ce_a, records_a = _thinned_records(4)
    ce_b, records_b = _thinned_records(5)
    for record in records_a + records_b:
        record["hinge@1"] = record["gcdf@1"] ** 2
    grids = ((1.0,), (1.0,), (1.0,))
    tests_a = [{**r, "split": "test", "error": r["error"] + 0.05} for r in records_a]
    a = analysis.load_run(write_run(tmp_path / "a", records_a + tests_a, grids=grids))
    b = analysis.load_run(write_run(tmp_path / "b", records_b + [{**r, "split": "test"} for r in records_b],
                                    grids=grids, lr=0.001))
    level = float(np.sqrt(max(ce_a.min(), ce_b.min()) * 2.0))
    pa, pb = analysis.at_level(a, level), analysis.at_level(b, level)
    group_a, group_b = analysis.group_runs([b, a])
    assert (group_a.runs, group_b.runs) == ([a], [b])
    assert analysis.aggregate(group_a, level).mean == pa.values
    result = analysis.compare_at_level(group_a, group_b, "gcdf", level)
    assert (result.a_values[0], result.b_values[0]) == (pa.values["gcdf@1"], pb.values["gcdf@1"])
    ladder = analysis.loss_ladder(group_a, group_b, levels=(level,))
    for family in analysis.FAMILIES:
        assert ladder.ratio[family][0][0] == pa.values[f"{family}@1"] / pb.values[f"{family}@1"]
    assert ladder.test_error["a"][0] == pa.test["error"] and ladder.train_error["b"][0] == pb.values["error"]
    assert analysis.curve_at_levels(a, "gcdf@1", [level])[0] == pa.values["gcdf@1"]
    row = analysis.summary_rows([a], level)[0]
    assert row["gcdf@1"] == pa.values["gcdf@1"] and row["test_error"] == pa.test["error"]
    metrics = analysis.hparams_records([a], level, quantities=("gcdf@1",))[0]["metrics"]
    assert metrics["at_level/gcdf@1"] == pa.values["gcdf@1"]
    assert pa.values["tce@1"] == pytest.approx(level, rel=1e-12)


def test_at_level_uses_the_first_crossing(tmp_path):
    ce = [2.0, 0.4, 0.8, 0.1]
    gcdf = {2.0: 1, 0.4: 0, 0.8: 5, 0.1: 7}
    run = analysis.load_run(write_run(tmp_path / "r", records_from(ce, lambda f, p, c: gcdf[c])))
    point = analysis.at_level(run, 0.5)
    t = math.log(4) / math.log(5)  # (log 2 - log 0.5) / (log 2 - log 0.4)
    assert point.values["gcdf@1"] == pytest.approx(1 - t)
    assert point.epoch == pytest.approx(t)


def test_level_not_reached(tmp_path):
    run = analysis.load_run(write_run(tmp_path / "r", records_from([2.3, 1.0, 0.7], power_of_ce)))
    with pytest.raises(analysis.LevelNotReachedError, match=r"never reaches a training CE of 0.5: its lowest is 0.7"):
        analysis.at_level(run, 0.5)
    with pytest.raises(analysis.LevelNotReachedError, match="starts below the level"):
        analysis.at_level(run, 3.0)
    for bad, message in ((0.0, "the level must be a finite training CE > 0, got 0.0"),
                         (math.inf, "the level must be a finite training CE > 0, got inf"),
                         ("low", "the level must be a training CE > 0, got 'low'")):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            analysis.at_level(run, bad)
    assert analysis.check_level("0.25") == 0.25


def test_nan_after_divergence_is_not_a_crossing(tmp_path):
    records = records_from([2.3, 1.0, 0.9], power_of_ce, test=False)
    records.append({**records[-1], "epoch": 3.0, "step": 30, "ce": None})
    records.append({**records[-1], "epoch": 4.0, "step": 40, "ce": 0.01})
    run = analysis.load_run(write_run(tmp_path / "r", records, state="diverged"))
    with pytest.raises(analysis.LevelNotReachedError, match="state diverged"):
        analysis.at_level(run, 0.5)
    assert analysis.common_level([run]) == pytest.approx(0.9)


def test_common_level(tmp_path):
    a = analysis.load_run(write_run(tmp_path / "a", records_from([2.3, 0.5, 0.2], power_of_ce)))
    b = analysis.load_run(write_run(tmp_path / "b", records_from([2.2, 0.6, 0.3], power_of_ce)))
    level = analysis.common_level([a, b])
    assert level == pytest.approx(0.3)
    analysis.at_level(a, level)
    analysis.at_level(b, level)
    c = analysis.load_run(write_run(tmp_path / "c", records_from([0.15, 0.1], power_of_ce)))
    with pytest.raises(analysis.LevelNotReachedError, match="no training CE level is reached by every run"):
        analysis.common_level([a, c])


def test_curve_at_levels(tmp_path):
    run = analysis.load_run(write_run(tmp_path / "r", records_from(np.geomspace(2.0, 0.1, 6), power_of_ce)))
    values = analysis.curve_at_levels(run, "gcdf@1", [1.5, 0.5, 0.05])
    np.testing.assert_allclose(values[:2], [4 * 1.5 ** 0.5, 4 * 0.5 ** 0.5], rtol=1e-12)
    assert math.isnan(values[2])


# --------------------------------------------------------------------------- #
# Crossovers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("crossing", [0.3, 1.0, 1.37, 3.9])
def test_crossovers_linear_in_log_parameter(crossing):
    params = np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    b = np.full(5, 2.0)
    a = b + 0.7 * (np.log(params) - math.log(crossing))  # a - b linear in log p, zero at `crossing`
    assert analysis.crossovers(params, a, b) == pytest.approx([crossing])
    assert analysis.crossovers(params[::-1], a[::-1], b[::-1]) == pytest.approx([crossing])  # any order


def test_crossovers_none_several_and_touching():
    params = [0.5, 1, 2, 4, 8]
    assert analysis.crossovers(params, [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]) == []
    # Two flips: between 0.5 and 1 (at the log-midpoint for symmetric values) and between 4 and 8.
    result = analysis.crossovers(params, [1, 3, 3, 3, 1], [2, 2, 2, 2, 2])
    assert result == pytest.approx([math.sqrt(0.5), math.sqrt(32)])
    # Equal at one grid point with a sign change across it: that point.
    assert analysis.crossovers(params, [1, 2, 3, 3, 3], [2, 2, 2, 2, 2]) == pytest.approx([1.0])
    # Touching without a flip is no crossover.
    assert analysis.crossovers(params, [1, 2, 1, 1, 1], [2, 2, 2, 2, 2]) == []
    # sigma = 0 has no place on a log axis.
    assert analysis.crossovers([0, 1, 4], [5, 1, 3], [2, 2, 2]) == pytest.approx([2.0])


def test_crossovers_bad_shapes():
    with pytest.raises(ValueError, match="one length"):
        analysis.crossovers([1, 2], [1, 2, 3], [1, 2])


AT_HALF = 0.5 ** 0.5  # the CE factor of two_lr_runs' values at level 0.5


def two_lr_runs(tmp_path, crossing=1.0, seeds=(0,), offsets=(0.0,)):
    """lr 0.1 lower on gcdf for sigma > crossing, lr 0.001 lower below it, at every CE (a power of the CE, so
    exact at any level; a seed's offset scales all its values by 1 + offset)."""
    runs = []
    for lr, sign in ((0.1, 1.0), (0.001, -1.0)):
        for seed, offset in zip(seeds, offsets):
            def fn(family, param, ce, sign=sign, offset=offset):
                return (2.0 - sign * 0.3 * math.log(param / crossing)) * ce ** 0.5 * (1 + offset)
            path = write_run(tmp_path / f"lr{lr}_s{seed}", records_from(np.geomspace(2.3, 0.1, 8), fn),
                             lr=lr, seed=seed)
            runs.append(analysis.load_run(path))
    return runs


def test_compare_at_level_between_runs(tmp_path):
    fast, slow = two_lr_runs(tmp_path, crossing=1.6)
    result = analysis.compare_at_level(fast, slow, "gcdf", 0.5)
    assert result.crossings == pytest.approx([1.6])
    assert result.lower_at_smallest == "b" and result.lower_at_largest == "a"
    np.testing.assert_array_equal(result.parameters, SIGMAS)
    expected = (2.0 - 0.3 * np.log(np.array(SIGMAS) / 1.6)) * AT_HALF
    np.testing.assert_allclose(result.a_values, expected)


# --------------------------------------------------------------------------- #
# Seeds
# --------------------------------------------------------------------------- #
def test_group_runs_and_aggregate(tmp_path):
    offsets = (0.1, 0.2, 0.6)
    runs = two_lr_runs(tmp_path, crossing=1.0, seeds=(2, 0, 1), offsets=offsets)
    groups = analysis.group_runs(runs)
    assert [g.label for g in groups] == ["lr=0.1", "lr=0.001"]
    assert [g.seeds for g in groups] == [[0, 1, 2], [0, 1, 2]]
    agg = analysis.aggregate(groups[0], 0.5)
    base = (2.0 - 0.3 * math.log(4.0)) * AT_HALF
    values = np.array([base * (1 + o) for o in offsets])
    assert agg.n == 3
    assert agg.mean["gcdf@4"] == pytest.approx(values.mean())
    assert agg.std["gcdf@4"] == pytest.approx(math.sqrt(((values - values.mean()) ** 2).sum() / 2))
    assert agg.std["gcdf@4"] == pytest.approx(base * math.sqrt(0.07))
    assert agg.std["ce"] == pytest.approx(0.0)
    # Seed means cross where the shared part does (offsets are the same in both groups).
    result = analysis.compare_at_level(groups[0], groups[1], "gcdf", 0.5)
    assert result.crossings == pytest.approx([1.0])
    assert (result.a, result.b) == ("lr=0.1", "lr=0.001")


def test_a_seed_given_twice_in_a_group_is_refused(tmp_path):
    runs = two_lr_runs(tmp_path / "a", crossing=1.0, seeds=(0, 1), offsets=(0.1, 0.2))
    again = two_lr_runs(tmp_path / "b", crossing=1.0, seeds=(1,), offsets=(0.2,))  # the same run in another folder
    with pytest.raises(ValueError, match=r"runs .*/a/\S+ and .*/b/\S+ are the same setting with seed 1: the seed "
                                         "statistics would count it twice"):
        analysis.group_runs([*runs, *again])
    assert [g.seeds for g in analysis.group_runs(runs)] == [[0, 1], [0, 1]]


def test_group_order_is_fast_to_slow_whatever_the_names(tmp_path):
    # load_runs sorts directory names: lr0.01 before lr0.1, b1024 before b256. group_runs orders the groups by
    # descending learning rate, then ascending batch size, whatever the order of the runs.
    folder = tmp_path / "sweep"
    for lr, batch, seed in itertools.product((0.1, 0.01), (256, 1024), (1, 0)):
        write_run(folder / f"fashion_mnist-fc6-ce-sgd-lr{lr:g}-b{batch}-s{seed}",
                  records_from([2.3, 0.5, 0.2], power_of_ce), lr=lr, batch_size=batch, seed=seed)
    runs = analysis.load_runs([folder])
    assert [r.name for r in runs][:2] == ["fashion_mnist-fc6-ce-sgd-lr0.01-b1024-s0",
                                          "fashion_mnist-fc6-ce-sgd-lr0.01-b1024-s1"]
    expected = ["lr=0.1 batch=256", "lr=0.1 batch=1024", "lr=0.01 batch=256", "lr=0.01 batch=1024"]
    rng = np.random.default_rng(0)
    for order in [runs, runs[::-1], *(list(rng.permutation(runs)) for _ in range(5))]:
        groups = analysis.group_runs(order)
        assert [g.label for g in groups] == expected
        assert [g.seeds for g in groups] == [[0, 1]] * 4
        assert [g.config["seed"] for g in groups] == [0] * 4  # the first run's config, whatever came first
    # The README's unpacking: a folder of two learning rates gives the fast one first.
    lr_only = [r for r in runs if r.config["batch_size"] == 256]
    fast, slow = analysis.group_runs(sorted(lr_only, key=lambda r: r.name))
    assert (fast.config["lr"], slow.config["lr"]) == (0.1, 0.01)
    small, large = analysis.group_runs([r for r in runs if r.config["lr"] == 0.01])
    assert (small.config["batch_size"], large.config["batch_size"]) == (256, 1024)


def test_group_order_puts_the_setting_first(tmp_path):
    # Model, dataset, optimizer, loss and subset before speed: each model's groups together, fast to slow.
    runs = [analysis.load_run(write_run(tmp_path / f"{model}_{lr}", records_from([2.3, 0.5], power_of_ce),
                                        model=model, lr=lr))
            for model in ("fc6", "c1") for lr in (0.001, 0.1)]
    runs.append(analysis.load_run(write_run(tmp_path / "adam", records_from([2.3, 0.5], power_of_ce),
                                            optimizer="adam", lr=1.0)))
    assert [g.label for g in analysis.group_runs(runs)] == [
        "c1 sgd lr=0.1", "c1 sgd lr=0.001", "fc6 adam lr=1", "fc6 sgd lr=0.1", "fc6 sgd lr=0.001"]


def test_runs_spread_over_devices_are_one_experiment(tmp_path):
    # The strategy says how a run was spread over devices, not what it is: seeds run on 1 device and on 2
    # replicas are one group; another learning rate is another.
    records = records_from([2.3, 0.2], lambda f, p, ce: 2.0 * (3 + math.log(ce)))
    runs = [analysis.load_run(write_run(tmp_path / "one", records, seed=0)),
            analysis.load_run(write_run(tmp_path / "two", records, seed=1, strategy="mirrored", cpu_replicas=2)),
            analysis.load_run(write_run(tmp_path / "other", records, seed=0, lr=0.001, strategy="multiworker"))]
    groups = analysis.group_runs(runs)
    assert sorted(len(g.runs) for g in groups) == [1, 2]


def test_crossover_spread_over_seeds(tmp_path):
    # Run a with seed k crosses the constant run b at sigma = c_k; the seed means cross at their geometric mean.
    crossings = {0: 0.5, 1: 2.0, 2: 1.0}
    runs = []
    for seed, c in crossings.items():
        def fast(family, param, ce, c=c):
            return (2.0 - 0.3 * math.log(param / c)) * ce ** 0.5
        runs.append(analysis.load_run(write_run(tmp_path / f"a{seed}", records_from([2.3, 0.2], fast), seed=seed)))
        runs.append(analysis.load_run(write_run(tmp_path / f"b{seed}", records_from(
            [2.3, 0.2], lambda f, p, ce: 2.0 * ce ** 0.5), seed=seed, lr=0.001)))
    fast_group, slow_group = analysis.group_runs(runs)
    result = analysis.compare_at_level(fast_group, slow_group, "gcdf", 0.5)
    assert result.seed_crossings == {s: pytest.approx([c]) for s, c in crossings.items()}
    assert result.crossings == pytest.approx([1.0])  # (0.5 * 2 * 1) ** (1 / 3)
    np.testing.assert_allclose(result.b_std, 0.0, atol=1e-12)
    expected_std = [np.std([(2.0 - 0.3 * math.log(p / c)) * AT_HALF for c in crossings.values()], ddof=1)
                    for p in SIGMAS]
    np.testing.assert_allclose(result.a_std, expected_std)


def test_single_seed_std_is_nan(tmp_path):
    run = analysis.load_run(write_run(tmp_path / "r", records_from([2.0, 0.5], power_of_ce)))
    agg = analysis.aggregate([run], 1.0)
    assert agg.n == 1 and math.isnan(agg.std["gcdf@1"])


def test_aggregate_names_the_run_that_misses_the_level(tmp_path):
    a = analysis.load_run(write_run(tmp_path / "a", records_from([2.0, 0.5], power_of_ce), seed=0))
    b = analysis.load_run(write_run(tmp_path / "b", records_from([2.0, 0.9], power_of_ce), seed=1))
    with pytest.raises(analysis.LevelNotReachedError, match="run 'b' never reaches"):
        analysis.aggregate([a, b], 0.6)


def test_group_ignores_tracking_and_stopping_settings(tmp_path):
    runs = [analysis.load_run(write_run(tmp_path / "a", records_from([2.0, 0.5], power_of_ce), seed=0,
                                        track_schedule="log", track_every=16, epochs=30, target_train_loss=0.8)),
            analysis.load_run(write_run(tmp_path / "b", records_from([2.0, 0.5], power_of_ce), seed=1,
                                        track_schedule="epoch", epochs=12, deterministic=True))]
    groups = analysis.group_runs(runs)
    assert len(groups) == 1 and groups[0].seeds == [0, 1]


def test_groups_and_pairs_tell_the_ways_of_updating_moving_statistics_apart(tmp_path):
    records = records_from([2.0, 0.5], power_of_ce)
    runs = [analysis.load_run(write_run(tmp_path / "small", records, ghost_batch_size=256)),
            analysis.load_run(write_run(tmp_path / "old", records, batch_size=16384, ghost_batch_size=256)),
            analysis.load_run(write_run(tmp_path / "new", records, batch_size=16384, ghost_batch_size=256,
                                        moving_statistics="sequential"))]
    # As trained: one micro-batch per step (None), a config.json from before the setting ("mean"), a new one.
    assert [r.config["moving_statistics"] for r in runs] == [None, "mean", "sequential"]
    groups = analysis.group_runs(runs)
    assert [g.label for g in groups] == ["batch=256", "batch=16384 bn=mean", "batch=16384 bn=sequential"]
    assert [what for _, _, what in analysis.extreme_pairs(groups)] == [
        "fc6 fashion_mnist lr=0.1: batch 256 vs 16384 (bn=mean)",
        "fc6 fashion_mnist lr=0.1: batch 256 vs 16384 (bn=sequential)"]
    # Named only where two ways meet: a batch comparison of one way reads as before.
    assert [g.label for g in analysis.group_runs(runs[:1] + runs[2:])] == ["batch=256", "batch=16384"]
    # A batch-256 run from before the setting and a new one are one experiment.
    again = analysis.load_run(write_run(tmp_path / "small_new", records, ghost_batch_size=256, seed=1,
                                        moving_statistics="sequential"))
    assert [g.seeds for g in analysis.group_runs([runs[0], again])] == [[0, 1]]


def test_group_labels_cover_batch_and_model(tmp_path):
    runs = [
        analysis.load_run(write_run(tmp_path / "a", records_from([2.0, 0.5], power_of_ce), batch_size=256)),
        analysis.load_run(write_run(tmp_path / "b", records_from([2.0, 0.5], power_of_ce), batch_size=16384,
                                    ghost_batch_size=256)),
        analysis.load_run(write_run(tmp_path / "c", records_from([2.0, 0.5], power_of_ce), model="c1")),
    ]
    labels = [g.label for g in analysis.group_runs(runs)]
    assert labels == ["c1 batch=256", "fc6 batch=256", "fc6 batch=16384 ghost=256"]


# --------------------------------------------------------------------------- #
# Summaries
# --------------------------------------------------------------------------- #
def test_summary_rows_csv_and_markdown(tmp_path):
    runs = two_lr_runs(tmp_path, crossing=1.0, seeds=(0, 1), offsets=(0.0, 0.1))
    short = analysis.load_run(write_run(tmp_path / "short", records_from([2.3, 0.9], power_of_ce),
                                        lr=0.01, state="running"))
    rows = analysis.summary_rows([*runs, short], 0.5)
    assert [r["reached"] for r in rows] == [True, True, True, True, False]
    assert rows[0]["gcdf@1"] == pytest.approx(2 * AT_HALF)
    text = analysis.summary_csv(rows)
    import csv
    import io
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == 5 and float(parsed[0]["gcdf@1"]) == pytest.approx(2 * AT_HALF)
    assert parsed[4]["gcdf@1"] == "" and parsed[4]["state"] == "running"
    markdown = analysis.summary_markdown([*runs, short], 0.5, quantities=("gcdf@0.25", "gcdf@4", "error"))
    assert "| lr=0.1 | 2 |" in markdown
    assert "| fc6 fashion_mnist batch=256: lr 0.1 vs 0.001 | gcdf | σ=0.25 |" in markdown
    line = next(x for x in markdown.splitlines() if "lr 0.1 vs 0.001 | gcdf" in x).split(" | ")
    assert (line[5], line[9], line[10], line[11]) == ("b", "a", "1", "s0: 1; s1: 1 |")
    assert "short (running)" in markdown


def test_summary_markdown_refuses_a_level_no_run_reaches_and_keeps_its_table_whole(tmp_path):
    runs = two_lr_runs(tmp_path, crossing=1.0, seeds=(0,), offsets=(0.0,))
    with pytest.raises(analysis.LevelNotReachedError, match=r"none of the 2 run\(s\) reaches a training CE of 0.001"):
        analysis.summary_markdown(runs, 0.001)
    # Quantities the runs did not log: a header of the first three columns, as wide as its separator.
    header, separator = analysis.summary_markdown(runs, 0.5, quantities=("gcdf@123",)).splitlines()[2:4]
    assert header == "| group | seeds | epoch at level |" and separator == "|---|---|---|"


def test_extreme_pairs_of_runs_without_a_batch_size_name_only_what_they_have(tmp_path):
    runs = [analysis.load_run(write_run(tmp_path / f"lr{lr}", records_from([2.0, 0.5], power_of_ce), lr=lr))
            for lr in (0.1, 0.01)]
    for run in runs:
        del run.config["batch_size"]
    pairs = analysis.extreme_pairs(analysis.group_runs(runs))
    assert [what for _, _, what in pairs] == ["fc6 fashion_mnist: lr 0.1 vs 0.01"]  # no "batch=None"


def test_extreme_pairs(tmp_path):
    runs = []
    for lr in (0.1, 0.01, 0.001):
        for batch in (256, 1024, 16384):
            path = write_run(tmp_path / f"{lr}_{batch}", records_from([2.0, 0.5], power_of_ce),
                             lr=lr, batch_size=batch)
            runs.append(analysis.load_run(path))
    pairs = analysis.extreme_pairs(analysis.group_runs(runs))
    whats = [w for _, _, w in pairs]
    assert len(pairs) == 6
    assert "fc6 fashion_mnist batch=256: lr 0.1 vs 0.001" in whats
    assert "fc6 fashion_mnist lr=0.01: batch 256 vs 16384" in whats
    for a, b, what in pairs:
        if "lr 0.1 vs" in what:
            assert a.config["lr"] == 0.1 and b.config["lr"] == 0.001
        else:
            assert a.config["batch_size"] == 256 and b.config["batch_size"] == 16384


def test_crossover_table_prints_the_digits_that_tell_a_from_b(tmp_path):
    # Two runs that differ in the 5th (gcdf) or 8th (tce) significant digit, or not at all (hinge): the table
    # shows a and b differently wherever its "lower" column names one of them, and alike with "tie".
    values = {0.1: {"gcdf": 4.4981, "tce": 2.1650001, "hinge": 2.5},
              0.001: {"gcdf": 4.4983, "tce": 2.1650003, "hinge": 2.5}}
    runs = [analysis.load_run(write_run(tmp_path / f"lr{lr}", records_from(
        np.geomspace(2.3, 0.1, 8), lambda family, param, ce, v=v: v[family]), lr=lr)) for lr, v in values.items()]
    markdown = analysis.summary_markdown(runs, 0.5)
    rows = {cells[1]: cells for cells in (line.split(" | ") for line in markdown.splitlines()
                                          if "lr 0.1 vs 0.001 |" in line)}
    assert set(rows) == {"gcdf", "tce", "hinge"}
    for cells in rows.values():
        for a, b, lower in (cells[3:6], cells[7:10]):
            assert lower == ("a" if float(a) < float(b) else "b" if float(b) < float(a) else "tie")
            assert (a == b) == (lower == "tie")
    assert rows["gcdf"][3:6] == rows["gcdf"][7:10] == ["4.4981", "4.4983", "a"]
    assert rows["tce"][7:10] == ["2.1650001", "2.1650003", "a"]
    assert rows["hinge"][7:10] == ["2.5", "2.5", "tie"]


def test_hparams_records(tmp_path):
    runs = two_lr_runs(tmp_path)
    records = analysis.hparams_records(runs, 0.5, quantities=("gcdf@1", "error"))
    # loss and optimizer tell apart runs that differ only there; settings that are None are left out.
    assert records[0]["hparams"] == {"model": "fc6", "dataset": "fashion_mnist", "loss": "ce", "optimizer": "sgd",
                                     "lr": 0.1, "batch_size": 256, "seed": 0}
    assert records[0]["metrics"]["at_level/gcdf@1"] == pytest.approx(2 * AT_HALF)
    assert records[0]["metrics"]["final/ce"] == pytest.approx(0.1)
    assert set(records[0]["metrics"]) == {"at_level/epoch", "at_level/gcdf@1", "at_level/error", "final/ce"}


def test_no_tensorflow_import():
    code = "import sys, keras_implicit.analysis; sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------- #
# The ladder: gaps against the level, with known answers
# --------------------------------------------------------------------------- #
def _ladder_runs(tmp_path, offsets_a=(0.0, 0.1, -0.05), offsets_b=(0.0, -0.1, 0.2)):
    """Two groups of three seeds whose CE falls from 2.3 to about 0.02. b = (1 + p) ce^0.5; a = b (p ce^0.5)^0.3,
    so a and b cross at p* = ce^-0.5 (1 at CE 1, 2 at CE 0.25, 5 at CE 0.04); every value is a power of the CE,
    so the interpolation at a level is exact. A seed scales its values by 1 + its offset."""
    ce = 2.3 * 0.6 ** np.arange(10)

    def b_value(family, p, c):
        return (1.0 + p) * c ** 0.5

    def a_value(family, p, c):
        return b_value(family, p, c) * (p * c ** 0.5) ** 0.3

    runs = []
    for seed, (oa, ob) in enumerate(zip(offsets_a, offsets_b)):
        runs.append(analysis.load_run(write_run(tmp_path / f"a{seed}", records_from(
            ce, lambda f, p, c, oa=oa: a_value(f, p, c) * (1 + oa)), seed=seed)))
        runs.append(analysis.load_run(write_run(tmp_path / f"b{seed}", records_from(
            ce, lambda f, p, c, ob=ob: b_value(f, p, c) * (1 + ob)), seed=seed, lr=0.001)))
    a, b = analysis.group_runs(runs)
    return a, b, a_value, b_value, offsets_a, offsets_b, ce


@pytest.mark.parametrize("family, grid", [("gcdf", SIGMAS), ("tce", TEMPERATURES), ("hinge", MARGINS)])
def test_ladder_gaps_and_crossovers_are_the_constructed_ones(tmp_path, family, grid):
    a, b, a_value, b_value, offsets_a, offsets_b, ce = _ladder_runs(tmp_path)
    ladder = analysis.loss_ladder(a, b, levels=(1.0, 0.25, 0.04, 0.01))
    assert ladder.levels == [1.0, 0.25, 0.04]  # CE ends at 2.3 * 0.6^9 = 0.023: 0.01 is not reached
    assert list(ladder.skipped) == [0.01] and "never reaches a training CE of 0.01" in ladder.skipped[0.01]
    assert (ladder.a, ladder.b) == ("lr=0.1", "lr=0.001")
    for row, level in enumerate(ladder.levels):
        mean_a = np.array([np.mean([a_value(family, p, level) * (1 + o) for o in offsets_a]) for p in grid])
        mean_b = np.array([np.mean([b_value(family, p, level) * (1 + o) for o in offsets_b]) for p in grid])
        np.testing.assert_allclose(ladder.ratio[family][row], mean_a / mean_b, rtol=1e-12)
        paired = np.array([[a_value(family, p, level) * (1 + oa) / (b_value(family, p, level) * (1 + ob))
                            for p in grid] for oa, ob in zip(offsets_a, offsets_b)])
        np.testing.assert_allclose(ladder.ratio_std[family][row], paired.std(axis=0, ddof=1), rtol=1e-10)
        # With the offsets, the seed means cross where mean(a) = mean(b); without them at level^-0.5.
        expected = analysis.crossovers(grid, mean_a, mean_b)
        assert ladder.crossings[family][row] == pytest.approx(expected)
        assert set(ladder.seed_crossings[family][row]) == {0, 1, 2}
        np.testing.assert_allclose(ladder.epochs["a"][row], math.log(level / 2.3) / math.log(0.6), rtol=1e-12)


def test_ladder_crossover_moves_with_the_level(tmp_path):
    a, b, *_ = _ladder_runs(tmp_path, offsets_a=(0.0, 0.0), offsets_b=(0.0, 0.0))
    ladder = analysis.loss_ladder(a, b, levels=(1.0, 0.25), families=("gcdf",))
    assert ladder.crossings["gcdf"][0] == pytest.approx([1.0])
    assert ladder.crossings["gcdf"][1] == pytest.approx([2.0])
    assert np.all(ladder.ratio_std["gcdf"] == 0)  # identical seeds: no spread
    # Below the crossover a (the large rate here) is lower: ratio < 1; above it, higher.
    assert ladder.ratio["gcdf"][1][SIGMAS.index(0.5)] < 1 < ladder.ratio["gcdf"][1][SIGMAS.index(4.0)]
    table = analysis.ladder_markdown(ladder, "gcdf", parameters=(0.5, 4.0))
    lines = table.splitlines()
    assert lines[0] == "| train CE | epoch a / b | gcdf σ=0.5 | gcdf σ=4 | crossover | test error a / b |"
    assert lines[2].startswith("| 1 | ") and "| 1 |" in lines[2] and lines[3].split(" | ")[-2] == "2"


def test_ladder_test_error_is_interpolated_at_the_crossing(tmp_path):
    a, b, *_, ce = _ladder_runs(tmp_path)
    ladder = analysis.loss_ladder(a, b, levels=(0.3,), families=("gcdf",))
    step = 10 * math.log(0.3 / 2.3) / math.log(0.6)  # where log CE crosses log 0.3
    k = math.ceil(step / 10)  # the test points at steps 10 (k - 1) and 10 k are around it
    s = (step - 10 * (k - 1)) / 10
    assert ladder.test_error["a"][0] == pytest.approx(reference_interpolate([ce[k - 1] / 3], [ce[k] / 3], s)[0],
                                                      rel=1e-12)
    assert ladder.test_error["a"][0] == pytest.approx(0.3 / 3, rel=1e-12)  # the test error is CE / 3 here
    assert ladder.train_error["a"][0] == pytest.approx(0.3 / 4, rel=1e-12)
    assert ladder.test_error["a_std"][0] == pytest.approx(0.0)


def test_no_level_reached_by_every_run_is_an_error(tmp_path):
    a, b, *_ = _ladder_runs(tmp_path)
    with pytest.raises(analysis.LevelNotReachedError, match="no level of the ladder is reached by every run"):
        analysis.loss_ladder(a, b, levels=(0.001, 5.0))


def test_a_settled_crossing_skips_a_dip(tmp_path):
    ce = [2.3, 1.0, 0.5, 0.2, 0.4, 0.3, 0.15, 0.1]
    run = analysis.load_run(write_run(tmp_path / "noisy", records_from(ce, power_of_ce)))
    first = analysis.at_level(run, 0.3)
    assert first.epoch == pytest.approx(2 + math.log(0.5 / 0.3) / math.log(0.5 / 0.2))
    settled = analysis.at_level(run, 0.3, hold=2)
    assert settled.epoch == pytest.approx(5.0) and settled.values["ce"] == pytest.approx(0.3)
    # hold=1 also skips the dip (the next point, 0.4, is above); the level 0.45 is crossed at 0.2 and holds.
    assert analysis.at_level(run, 0.3, hold=1).epoch == pytest.approx(5.0)
    assert analysis.at_level(run, 0.45, hold=2).epoch == analysis.at_level(run, 0.45).epoch
    rising = analysis.load_run(write_run(tmp_path / "rising", records_from([2.3, 1.0, 0.2, 0.5], power_of_ce)))
    assert analysis.at_level(rising, 0.3).epoch < 2
    with pytest.raises(analysis.LevelNotReachedError, match="reaches a training CE of 0.3 and stays there for 1 more"):
        analysis.at_level(rising, 0.3, hold=1)
    with pytest.raises(ValueError, match="hold must be a whole number"):
        analysis.at_level(run, 0.3, hold=-1)


def test_ladder_ratio_over_a_zero_is_inf_not_an_error(tmp_path):
    # A hinge loss that has reached 0 in b (every margin met) while a still has some: the ratio is inf.
    ce = [2.3, 1.0, 0.5]
    a = analysis.load_run(write_run(tmp_path / "a", records_from(ce, lambda f, p, c: 1.0 + p), seed=0))
    b = analysis.load_run(write_run(tmp_path / "b", records_from(
        ce, lambda f, p, c: 0.0 if (f, p) == ("hinge", 0.5) else 1.0 + p), seed=0, lr=0.001))
    group_a, group_b = analysis.group_runs([a, b])
    ladder = analysis.loss_ladder(group_a, group_b, levels=(1.0,), families=("hinge",))
    assert ladder.ratio["hinge"][0].tolist() == [math.inf, 1.0, 1.0]
    assert "| inf |" in analysis.ladder_markdown(ladder, "hinge")


# --------------------------------------------------------------------------- #
# At a budget; judging explicit terms (docs/EXPLICIT.md)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("steps_per_epoch", [3, 10, 215])
@pytest.mark.parametrize("epoch", [0.0, 1.0, 2.5, 3.75, 4.0])
def test_at_budget_reads_every_split_at_the_epoch_or_the_step(tmp_path, steps_per_epoch, epoch):
    ce = np.exp(-np.arange(5.0))  # exponential in time: the geometric interpolation is exact between points
    records = records_from(ce, power_of_ce, steps_per_epoch=steps_per_epoch)
    records += [{**r, "split": "validation", "error": 0.2 * r["ce"]} for r in records if r["split"] == "train"]
    run = analysis.load_run(write_run(tmp_path / "r", records))
    by_epoch = analysis.at_budget(run, epoch=epoch)
    by_step = analysis.at_budget(run, step=epoch * steps_per_epoch)
    assert by_epoch.step == pytest.approx(epoch * steps_per_epoch) and by_step.epoch == pytest.approx(epoch)
    for point in (by_epoch, by_step):
        assert point.level == pytest.approx(math.exp(-epoch), rel=1e-12)
        assert point.values["ce"] == pytest.approx(math.exp(-epoch), rel=1e-12)
        assert point.values["gcdf@2"] == pytest.approx(5.0 * math.exp(-epoch / 2), rel=1e-12)
        assert point.test["ce"] == pytest.approx(1.5 * math.exp(-epoch), rel=1e-12)
        assert point.validation["error"] == pytest.approx(0.2 * math.exp(-epoch), rel=1e-12)


def test_at_budget_refuses_what_the_run_did_not_train_and_bad_budgets(tmp_path):
    run = analysis.load_run(write_run(tmp_path / "r", records_from([2.0, 1.0, 0.5], power_of_ce)))
    assert analysis.at_budget(run, epoch=2).validation == {}  # no validation split
    with pytest.raises(analysis.BudgetNotReachedError, match="tracked up to epoch 2, not 2.5"):
        analysis.at_budget(run, epoch=2.5)
    with pytest.raises(analysis.BudgetNotReachedError, match="tracked up to step 20, not 21"):
        analysis.at_budget(run, step=21)
    for kwargs, message in (({}, "one of them"), ({"epoch": 1, "step": 10}, "one of them"),
                            ({"epoch": -1}, "finite number >= 0"), ({"step": "x"}, "a number >= 0")):
        with pytest.raises(ValueError, match=message):
            analysis.at_budget(run, **kwargs)


@pytest.mark.parametrize("small, large, treated", [
    ([92.64], [89.83], [91.75]),  # Novack et al.'s ResNet-18 accuracies: about two thirds
    ([11.2, 11.3, 11.4], [11.6, 11.5, 11.7], [11.5, 11.4, 11.45]),
    ([0.1, 0.2, 0.15], [0.1, 0.25, 0.12], [0.3, 0.2, 0.1]),  # a gap inside the seed spread
    ([1.0, 1.1], [2.0, 2.2], [2.5, 2.6]),  # the wrong way: below 0
])
def test_gap_closed_against_the_formula(small, large, treated):
    result = analysis.gap_closed(small, large, treated, quantity="test error")
    s, big, t = (np.asarray(v, float) for v in (small, large, treated))
    assert result.fraction == pytest.approx((big.mean() - t.mean()) / (big.mean() - s.mean()), rel=1e-12)
    assert result.small[0] == pytest.approx(s.mean()) and result.treated[0] == pytest.approx(t.mean())
    if len(small) > 1:
        assert result.large[1] == pytest.approx(big.std(ddof=1))
        standard_error = math.sqrt(s.var(ddof=1) / s.size + big.var(ddof=1) / big.size)
        assert result.gap_beyond_spread == (abs(big.mean() - s.mean()) > 2 * standard_error)
    else:
        assert math.isnan(result.large[1]) and not result.gap_beyond_spread  # one seed: no spread to judge by
    assert result.quantity == "test error"


def test_gap_closed_edge_cases():
    assert analysis.gap_closed([92.64], [89.83], [91.75]).fraction == pytest.approx(0.6832, abs=1e-4)
    assert math.isnan(analysis.gap_closed([1.0, 1.0], [1.0, 1.0], [0.5, 0.6]).fraction)  # no gap
    assert analysis.gap_closed([1.0, 1.02], [2.0, 2.01], [1.0, 1.02]).gap_beyond_spread
    with pytest.raises(ValueError, match="one finite value per seed for 'treated'"):
        analysis.gap_closed([1.0], [2.0], [])
    with pytest.raises(ValueError, match="for 'large'"):
        analysis.gap_closed([1.0], [math.nan], [1.0])


def _scaled_runs(tmp_path, name, factor, seeds=(0, 1), validation_error=None, **config):
    """Runs whose every family value is ``factor`` times power_of_ce's (the reference at factor 1)."""
    runs = []
    for seed in seeds:
        records = records_from([2.0, 1.0, 0.5, 0.25], lambda f, p, c: factor * power_of_ce(f, p, c) * (1 + 0.01 * seed))
        if validation_error is not None:
            records += [{**r, "split": "validation", "error": validation_error + 0.01 * seed}
                        for r in records if r["split"] == "train"]
        runs.append(analysis.load_run(write_run(tmp_path / f"{name}-s{seed}", records, seed=seed, **config)))
    return runs


@pytest.mark.parametrize("family, min_parameter", [("gcdf", 2.0), ("gcdf", 0.25), ("tce", 1.0), ("hinge", 4.0)])
@pytest.mark.parametrize("factor", [1.0, 1.1, 0.7])
def test_profile_distance_is_the_mean_absolute_log_ratio(tmp_path, family, min_parameter, factor):
    reference = _scaled_runs(tmp_path, "ref", 1.0)
    candidate = _scaled_runs(tmp_path, "cand", factor, batch_size=16384)
    distance = analysis.profile_distance(candidate, reference, 0.5, family, min_parameter)
    assert distance == pytest.approx(abs(math.log(factor)), abs=1e-12)
    with pytest.raises(ValueError, match="no gcdf parameter >= 100"):
        analysis.profile_distance(candidate, reference, 0.5, "gcdf", 100.0)
    with pytest.raises(analysis.LevelNotReachedError):
        analysis.profile_distance(candidate, reference, 0.1)


def test_choose_by_profile_and_by_validation(tmp_path):
    reference = _scaled_runs(tmp_path, "ref", 1.0, batch_size=256)
    candidates = [*_scaled_runs(tmp_path, "gp0.01", 1.3, validation_error=0.12, batch_size=16384,
                                gradient_penalty=0.01),
                  *_scaled_runs(tmp_path, "gp0.1", 1.05, validation_error=0.14, batch_size=16384,
                                gradient_penalty=0.1),
                  *_scaled_runs(tmp_path, "gp1", 0.8, validation_error=0.11, batch_size=16384, gradient_penalty=1.0)]
    groups = analysis.group_runs(candidates)
    chosen, distances = analysis.choose_by_profile(groups, reference, 0.5)
    assert chosen.config["gradient_penalty"] == 0.1  # |log 1.05| < |log 0.8| < |log 1.3|
    assert distances[chosen.label] == pytest.approx(math.log(1.05))
    best, errors = analysis.choose_by_validation(groups, 0.5)
    assert best.config["gradient_penalty"] == 1.0  # the lowest validation error: the two choices differ
    assert errors[best.label] == pytest.approx(0.115)  # the mean of 0.11 and 0.12 over the two seeds
    with pytest.raises(ValueError, match="no candidate reaches a training CE of 0.01"):
        analysis.choose_by_profile(groups, reference, 0.01)
    with pytest.raises(ValueError, match="has no validation 'error'.*--validation-size"):
        analysis.choose_by_validation(analysis.group_runs(reference), 0.5)
