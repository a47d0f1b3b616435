"""keras_implicit.analysis on synthetic run directories with known answers."""

import json
import math
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


def linear_in_log_ce(family, param, ce):
    # Exactly linear in log CE: interpolation must reproduce it at any level.
    return 3.0 + param + 2.0 * math.log(ce)


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
    run = analysis.load_run(write_run(tmp_path / "r", records_from([2.0, 1.0, 0.5], linear_in_log_ce)))
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
    path = write_run(tmp_path / "r", records_from([2.0, 1.0], linear_in_log_ce))
    (path / "metrics.jsonl").unlink()
    with pytest.raises(analysis.RunDirectoryError, match="metrics.jsonl is missing"):
        analysis.load_run(path)


def test_missing_config(tmp_path):
    path = write_run(tmp_path / "r", records_from([2.0, 1.0], linear_in_log_ce))
    (path / "config.json").unlink()
    with pytest.raises(analysis.RunDirectoryError, match="config.json is missing"):
        analysis.load_run(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(analysis.RunDirectoryError, match="not a directory"):
        analysis.load_run(tmp_path / "nothing")


def test_truncated_last_line_dropped_with_warning_or_error_when_strict(tmp_path):
    path = write_run(tmp_path / "r", records_from([2.0, 1.0, 0.5], linear_in_log_ce, test=False), state="running")
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3.0, "step": 30, "split": "train", "ce": 0.2')
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        run = analysis.load_run(path)
    np.testing.assert_array_equal(run.series("ce")[1], [2.0, 1.0, 0.5])
    with pytest.raises(analysis.RunDirectoryError, match=r"metrics.jsonl:4: truncated last line"):
        analysis.load_run(path, strict=True)


def test_malformed_middle_line_is_an_error(tmp_path):
    path = write_run(tmp_path / "r", records_from([2.0, 1.0, 0.5], linear_in_log_ce, test=False))
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
    first = records_from([2.0, 1.0, 0.9, 0.8], linear_in_log_ce, test=False)
    again = records_from([2.0, 1.0, 0.5, 0.25, 0.1], linear_in_log_ce, test=False)[2:]
    run = analysis.load_run(write_run(tmp_path / "r", first + again))
    np.testing.assert_array_equal(run.series("ce")[1], [2.0, 1.0, 0.5, 0.25, 0.1])
    np.testing.assert_array_equal(run.series("ce", x="step")[0], [0, 10, 20, 30, 40])


def test_find_run_dirs_expands_a_folder(tmp_path):
    for name in ("b", "a"):
        write_run(tmp_path / "runs" / name, records_from([2.0, 1.0], linear_in_log_ce))
    (tmp_path / "runs" / "not_a_run").mkdir()
    assert [p.name for p in analysis.find_run_dirs([tmp_path / "runs"])] == ["a", "b"]
    with pytest.raises(analysis.RunDirectoryError, match="neither a run directory"):
        analysis.find_run_dirs([tmp_path / "runs" / "not_a_run"])


def test_different_grids_are_an_error(tmp_path):
    a = analysis.load_run(write_run(tmp_path / "a", records_from([2.0, 0.5], linear_in_log_ce)))
    other = ((0.25, 0.5, 1.0, 8.0), TEMPERATURES, MARGINS)
    b = analysis.load_run(write_run(tmp_path / "b", records_from([2.0, 0.5], linear_in_log_ce, grids=other),
                                    grids=other))
    with pytest.raises(analysis.GridMismatchError, match=r"different gcdf grids.*\[0.25, 0.5, 1.0, 8.0\]"):
        analysis.check_same_grids([a, b])
    analysis.check_same_grids([a, b], families=["tce", "hinge"])  # the others agree
    with pytest.raises(analysis.GridMismatchError):
        analysis.compare_at_level(a, b, "gcdf", 1.0)


# --------------------------------------------------------------------------- #
# Interpolation at a level
# --------------------------------------------------------------------------- #
def test_at_level_linear_in_log_ce(tmp_path):
    ce = [2.0, 1.0, 0.25, 0.1]
    gcdf = {2.0: 0.9, 1.0: 0.5, 0.25: 0.1, 0.1: 0.05}
    run = analysis.load_run(write_run(tmp_path / "r", records_from(ce, lambda f, p, c: gcdf[c])))
    point = analysis.at_level(run, 0.5)
    # log 0.5 is halfway between log 1 and log 0.25.
    assert point.values["gcdf@1"] == pytest.approx(0.3)
    assert point.epoch == pytest.approx(1.5) and point.step == pytest.approx(15)
    assert point.values["ce"] == 0.5
    assert point.values["error"] == pytest.approx((1.0 + 0.25) / 2 / 4)
    assert point.values["top_kernel_norm"] == pytest.approx(2.5)
    # Test quantities: linear in step between the test points at steps 10 and 20.
    assert point.test["ce"] == pytest.approx((1.5 + 0.375) / 2)
    # Exactly at a tracking point.
    assert analysis.at_level(run, 1.0).values["gcdf@1"] == pytest.approx(0.5)
    assert analysis.at_level(run, 1.0).epoch == pytest.approx(1.0)


@pytest.mark.parametrize("level", [1.9, 1.3, 0.77, 0.3, 0.0502])
def test_at_level_reproduces_a_quantity_linear_in_log_ce(tmp_path, level):
    ce = np.geomspace(2.3, 0.05, 9)
    run = analysis.load_run(write_run(tmp_path / "r", records_from(ce, linear_in_log_ce)))
    point = analysis.at_level(run, level)
    for sigma in SIGMAS:
        assert point.values[f"gcdf@{analysis_format(sigma)}"] == pytest.approx(3.0 + sigma + 2 * math.log(level))
    # Epoch is linear in log CE too, with CE geometric in epoch: epoch = log(2.3 / level) / log(ratio).
    ratio = ce[0] / ce[1]
    assert point.epoch == pytest.approx(math.log(2.3 / level) / math.log(ratio))


def test_at_level_uses_the_first_crossing(tmp_path):
    ce = [2.0, 0.4, 0.8, 0.1]
    gcdf = {2.0: 1, 0.4: 0, 0.8: 5, 0.1: 7}
    run = analysis.load_run(write_run(tmp_path / "r", records_from(ce, lambda f, p, c: gcdf[c])))
    point = analysis.at_level(run, 0.5)
    t = math.log(4) / math.log(5)  # (log 2 - log 0.5) / (log 2 - log 0.4)
    assert point.values["gcdf@1"] == pytest.approx(1 - t)
    assert point.epoch == pytest.approx(t)


def test_level_not_reached(tmp_path):
    run = analysis.load_run(write_run(tmp_path / "r", records_from([2.3, 1.0, 0.7], linear_in_log_ce)))
    with pytest.raises(analysis.LevelNotReachedError, match=r"never reaches a training CE of 0.5: its lowest is 0.7"):
        analysis.at_level(run, 0.5)
    with pytest.raises(analysis.LevelNotReachedError, match="starts below the level"):
        analysis.at_level(run, 3.0)
    with pytest.raises(ValueError, match="finite CE > 0"):
        analysis.at_level(run, 0.0)


def test_nan_after_divergence_is_not_a_crossing(tmp_path):
    records = records_from([2.3, 1.0, 0.9], linear_in_log_ce, test=False)
    records.append({**records[-1], "epoch": 3.0, "step": 30, "ce": None})
    records.append({**records[-1], "epoch": 4.0, "step": 40, "ce": 0.01})
    run = analysis.load_run(write_run(tmp_path / "r", records, state="diverged"))
    with pytest.raises(analysis.LevelNotReachedError, match="state diverged"):
        analysis.at_level(run, 0.5)
    assert analysis.common_level([run]) == pytest.approx(0.9)


def test_common_level(tmp_path):
    a = analysis.load_run(write_run(tmp_path / "a", records_from([2.3, 0.5, 0.2], linear_in_log_ce)))
    b = analysis.load_run(write_run(tmp_path / "b", records_from([2.2, 0.6, 0.3], linear_in_log_ce)))
    level = analysis.common_level([a, b])
    assert level == pytest.approx(0.3)
    analysis.at_level(a, level)
    analysis.at_level(b, level)
    c = analysis.load_run(write_run(tmp_path / "c", records_from([0.15, 0.1], linear_in_log_ce)))
    with pytest.raises(analysis.LevelNotReachedError, match="no training CE level is reached by every run"):
        analysis.common_level([a, c])


def test_curve_at_levels(tmp_path):
    run = analysis.load_run(write_run(tmp_path / "r", records_from(np.geomspace(2.0, 0.1, 6), linear_in_log_ce)))
    values = analysis.curve_at_levels(run, "gcdf@1", [1.5, 0.5, 0.05])
    np.testing.assert_allclose(values[:2], [4 + 2 * math.log(1.5), 4 + 2 * math.log(0.5)])
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


AT_HALF = 3 + math.log(0.5)  # the CE factor of two_lr_runs' values at level 0.5


def two_lr_runs(tmp_path, crossing=1.0, seeds=(0,), offsets=(0.0,)):
    """lr 0.1 lower on gcdf for sigma > crossing, lr 0.001 lower below it, at every CE (linear in log CE)."""
    runs = []
    for lr, sign in ((0.1, 1.0), (0.001, -1.0)):
        for seed, offset in zip(seeds, offsets):
            def fn(family, param, ce, sign=sign, offset=offset):
                return (2.0 - sign * 0.3 * math.log(param / crossing)) * (3 + math.log(ce)) + offset
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
    values = np.array([base + o for o in offsets])
    assert agg.n == 3
    assert agg.mean["gcdf@4"] == pytest.approx(values.mean())
    assert agg.std["gcdf@4"] == pytest.approx(math.sqrt(((values - values.mean()) ** 2).sum() / 2))
    assert agg.std["gcdf@4"] == pytest.approx(math.sqrt(0.07))
    assert agg.std["ce"] == pytest.approx(0.0)
    # Seed means cross where the shared part does (offsets are the same in both groups).
    result = analysis.compare_at_level(groups[0], groups[1], "gcdf", 0.5)
    assert result.crossings == pytest.approx([1.0])
    assert (result.a, result.b) == ("lr=0.1", "lr=0.001")


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
            return (2.0 - 0.3 * math.log(param / c)) * (3 + math.log(ce))
        runs.append(analysis.load_run(write_run(tmp_path / f"a{seed}", records_from([2.3, 0.2], fast), seed=seed)))
        runs.append(analysis.load_run(write_run(tmp_path / f"b{seed}", records_from(
            [2.3, 0.2], lambda f, p, ce: 2.0 * (3 + math.log(ce))), seed=seed, lr=0.001)))
    fast_group, slow_group = analysis.group_runs(runs)
    result = analysis.compare_at_level(fast_group, slow_group, "gcdf", 0.5)
    assert result.seed_crossings == {s: pytest.approx([c]) for s, c in crossings.items()}
    assert result.crossings == pytest.approx([1.0])  # (0.5 * 2 * 1) ** (1 / 3)
    np.testing.assert_allclose(result.b_std, 0.0, atol=1e-12)
    expected_std = [np.std([(2.0 - 0.3 * math.log(p / c)) * AT_HALF for c in crossings.values()], ddof=1)
                    for p in SIGMAS]
    np.testing.assert_allclose(result.a_std, expected_std)


def test_single_seed_std_is_nan(tmp_path):
    run = analysis.load_run(write_run(tmp_path / "r", records_from([2.0, 0.5], linear_in_log_ce)))
    agg = analysis.aggregate([run], 1.0)
    assert agg.n == 1 and math.isnan(agg.std["gcdf@1"])


def test_aggregate_names_the_run_that_misses_the_level(tmp_path):
    a = analysis.load_run(write_run(tmp_path / "a", records_from([2.0, 0.5], linear_in_log_ce), seed=0))
    b = analysis.load_run(write_run(tmp_path / "b", records_from([2.0, 0.9], linear_in_log_ce), seed=1))
    with pytest.raises(analysis.LevelNotReachedError, match="run 'b' never reaches"):
        analysis.aggregate([a, b], 0.6)


def test_group_ignores_tracking_and_stopping_settings(tmp_path):
    runs = [analysis.load_run(write_run(tmp_path / "a", records_from([2.0, 0.5], linear_in_log_ce), seed=0,
                                        track_schedule="log", track_every=16, epochs=30, target_train_loss=0.8)),
            analysis.load_run(write_run(tmp_path / "b", records_from([2.0, 0.5], linear_in_log_ce), seed=1,
                                        track_schedule="epoch", epochs=12, deterministic=True))]
    groups = analysis.group_runs(runs)
    assert len(groups) == 1 and groups[0].seeds == [0, 1]


def test_group_labels_cover_batch_and_model(tmp_path):
    runs = [
        analysis.load_run(write_run(tmp_path / "a", records_from([2.0, 0.5], linear_in_log_ce), batch_size=256)),
        analysis.load_run(write_run(tmp_path / "b", records_from([2.0, 0.5], linear_in_log_ce), batch_size=16384,
                                    ghost_batch_size=256)),
        analysis.load_run(write_run(tmp_path / "c", records_from([2.0, 0.5], linear_in_log_ce), model="c1")),
    ]
    labels = [g.label for g in analysis.group_runs(runs)]
    assert labels == ["fc6 batch=256", "fc6 batch=16384 ghost=256", "c1 batch=256"]


# --------------------------------------------------------------------------- #
# Summaries
# --------------------------------------------------------------------------- #
def test_summary_rows_csv_and_markdown(tmp_path):
    runs = two_lr_runs(tmp_path, crossing=1.0, seeds=(0, 1), offsets=(0.0, 0.1))
    short = analysis.load_run(write_run(tmp_path / "short", records_from([2.3, 0.9], linear_in_log_ce),
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


def test_extreme_pairs(tmp_path):
    runs = []
    for lr in (0.1, 0.01, 0.001):
        for batch in (256, 1024, 16384):
            path = write_run(tmp_path / f"{lr}_{batch}", records_from([2.0, 0.5], linear_in_log_ce),
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
    """Two groups of three seeds whose CE falls from 2.3 to about 0.02. b = 8 + log ce + p; a = b + log p - (-0.5
    log ce), so a and b cross at p* = ce^-0.5 (1 at CE 1, 2 at CE 0.25, 5 at CE 0.04); every value is linear in
    log CE, so the interpolation at a level is exact. Seeds add constant offsets."""
    ce = 2.3 * 0.6 ** np.arange(10)

    def b_value(family, p, c):
        return 8.0 + math.log(c) + p

    def a_value(family, p, c):
        return b_value(family, p, c) + math.log(p) + 0.5 * math.log(c)

    runs = []
    for seed, (oa, ob) in enumerate(zip(offsets_a, offsets_b)):
        runs.append(analysis.load_run(write_run(tmp_path / f"a{seed}", records_from(
            ce, lambda f, p, c, oa=oa: a_value(f, p, c) + oa), seed=seed)))
        runs.append(analysis.load_run(write_run(tmp_path / f"b{seed}", records_from(
            ce, lambda f, p, c, ob=ob: b_value(f, p, c) + ob), seed=seed, lr=0.001)))
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
        mean_a = np.array([np.mean([a_value(family, p, level) + o for o in offsets_a]) for p in grid])
        mean_b = np.array([np.mean([b_value(family, p, level) + o for o in offsets_b]) for p in grid])
        np.testing.assert_allclose(ladder.ratio[family][row], mean_a / mean_b, rtol=1e-12)
        paired = np.array([[(a_value(family, p, level) + oa) / (b_value(family, p, level) + ob) for p in grid]
                           for oa, ob in zip(offsets_a, offsets_b)])
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
    steps = np.arange(10) * 10.0
    step = 10 * math.log(0.3 / 2.3) / math.log(0.6)  # where log CE crosses log 0.3
    assert ladder.test_error["a"][0] == pytest.approx(np.interp(step, steps, ce / 3))
    assert ladder.train_error["a"][0] == pytest.approx(np.interp(step, steps, ce / 4))
    assert ladder.test_error["a_std"][0] == pytest.approx(0.0)


def test_no_level_reached_by_every_run_is_an_error(tmp_path):
    a, b, *_ = _ladder_runs(tmp_path)
    with pytest.raises(analysis.LevelNotReachedError, match="no level of the ladder is reached by every run"):
        analysis.loss_ladder(a, b, levels=(0.001, 5.0))


def test_a_settled_crossing_skips_a_dip(tmp_path):
    ce = [2.3, 1.0, 0.5, 0.2, 0.4, 0.3, 0.15, 0.1]
    run = analysis.load_run(write_run(tmp_path / "noisy", records_from(ce, linear_in_log_ce)))
    first = analysis.at_level(run, 0.3)
    assert first.epoch == pytest.approx(2 + math.log(0.5 / 0.3) / math.log(0.5 / 0.2))
    settled = analysis.at_level(run, 0.3, hold=2)
    assert settled.epoch == pytest.approx(5.0) and settled.values["ce"] == pytest.approx(0.3)
    # hold=1 also skips the dip (the next point, 0.4, is above); the level 0.45 is crossed at 0.2 and holds.
    assert analysis.at_level(run, 0.3, hold=1).epoch == pytest.approx(5.0)
    assert analysis.at_level(run, 0.45, hold=2).epoch == analysis.at_level(run, 0.45).epoch
    rising = analysis.load_run(write_run(tmp_path / "rising", records_from([2.3, 1.0, 0.2, 0.5], linear_in_log_ce)))
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
