"""keras_implicit.plots: every figure kind renders from small synthetic runs, with readable log ticks,
and without touching matplotlib's backend."""

import itertools
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from keras_implicit import analysis, plots

SIGMAS = (0.25, 0.5, 1.0, 8.0)
TEMPERATURES = (0.5, 1.0, 4.0)
MARGINS = (0.5, 1.0, 4.0)


def fmt(value):
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def write_run(path, lr, seed, epochs=6, batch_size=256):
    """A run directory whose families favour lr 0.1 at large parameters and lr 0.001 at small ones."""
    path.mkdir(parents=True)
    config = {"model": "fc6", "dataset": "fashion_mnist", "lr": lr, "batch_size": batch_size, "seed": seed,
              "epochs": epochs, "sigmas": list(SIGMAS), "temperatures": list(TEMPERATURES), "margins": list(MARGINS)}
    (path / "config.json").write_text(json.dumps(config))
    (path / "status.json").write_text(json.dumps({"state": "finished", "epoch": epochs, "step": epochs * 4}))
    rng = np.random.default_rng(seed)
    sign = 1.0 if lr > 0.01 else -1.0
    with open(path / "metrics.jsonl", "w") as f:
        for k in range(4 * epochs + 1):
            ce = 2.3 * math.exp(-(0.5 + 0.05 * seed) * k / 4)
            record = {"epoch": k / 4, "step": k, "split": "train", "ce": ce, "error": 0.9 * ce / 2.3}
            for family, grid in (("gcdf", SIGMAS), ("tce", TEMPERATURES), ("hinge", MARGINS)):
                for p in grid:
                    record[f"{family}@{fmt(p)}"] = (ce * p * (1 - sign * 0.2 * math.log(p))
                                                    * (1 + 0.01 * rng.standard_normal()))
            f.write(json.dumps(record) + "\n")
            f.write(json.dumps({**record, "split": "test", "ce": 1.2 * ce}) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return analysis.load_runs([write_run(root / f"lr{lr}_s{seed}", lr, seed)
                               for lr in (0.1, 0.001) for seed in (0, 1, 2)])


def check_image(path, kind):
    data = path.read_bytes()
    if kind == "png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000
    else:
        assert data[:5] == b"%PDF-"
        assert len(data) > 5_000


def test_loss_shapes_match_the_closed_forms():
    from scipy.stats import norm

    z = np.linspace(-3, 5, 17)
    fig = plots.plot_loss_shapes(sigmas=(0.5, 2.0), temperatures=(1.0, 4.0), margins=(1.0,), z=z)
    gcdf_axes, tce_axes, hinge_axes = fig.axes
    assert len(gcdf_axes.get_lines()) == 2 + 1  # two sigmas and the z = 0 line
    np.testing.assert_allclose(gcdf_axes.get_lines()[1].get_ydata(), norm.cdf(-z / (math.sqrt(2) * 2.0)), rtol=1e-5)
    np.testing.assert_allclose(tce_axes.get_lines()[1].get_ydata(), np.log1p(np.exp(-z / 4.0)), rtol=1e-5)
    np.testing.assert_allclose(hinge_axes.get_lines()[0].get_ydata(), np.maximum(0, 1.0 - z), atol=1e-6)
    assert [a.get_xlabel() for a in fig.axes] == ["margin z = s_y − s_j"] * 3


def test_training_curves_one_panel_per_group_one_line_per_parameter(runs):
    fig = plots.plot_training_curves(runs, "gcdf")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.get_lines()) == len(SIGMAS)
        assert len(ax.collections) == len(SIGMAS)  # one seed band per line
        assert ax.get_xlabel() == "epoch" and ax.get_yscale() == "log"
    assert fig.axes[0].get_title() == "(a) lr=0.1 (3 seeds)"
    styles = {(line.get_linestyle(), line.get_marker()) for line in fig.axes[0].get_lines()}
    assert len(styles) == len(SIGMAS)  # told apart without colour
    # The drawn line is the seed mean.
    mean = np.mean([r.series("gcdf@8")[1] for r in runs[:3]], axis=0)
    np.testing.assert_allclose(fig.axes[0].get_lines()[-1].get_ydata(), mean)


def test_training_curves_subset_step_axis_and_bad_parameter(runs):
    fig = plots.plot_training_curves(runs[:1], "hinge", x="step", parameters=[1, 4], split="test")
    assert len(fig.axes) == 1 and len(fig.axes[0].get_lines()) == 2 and fig.axes[0].get_xlabel() == "step"
    assert len(fig.axes[0].collections) == 0  # one seed: no band
    with pytest.raises(ValueError, match="not all in the tracked grid"):
        plots.plot_training_curves(runs, "hinge", parameters=[3])


def test_against_train_loss(runs):
    fig = plots.plot_against_train_loss(runs, ("gcdf@0.5", "gcdf@1", "gcdf@8", "error"), points=20)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2 and len(ax.collections) == 2
        assert ax.get_xscale() == "log" and ax.xaxis_inverted()
        assert ax.get_xlabel() == "training cross-entropy"
    assert fig.axes[1].get_title() == "(b) Gcdf loss, σ = 1"
    assert fig.axes[3].get_title() == "(d) train error"
    # Curves are the seed means of the values at each level.
    levels = fig.axes[0].get_lines()[0].get_xdata()
    expected = np.mean([analysis.curve_at_levels(r, "gcdf@0.5", levels) for r in runs[:3]], axis=0)
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), expected)
    with pytest.raises(KeyError, match="did not track 'gcdf@3'"):
        plots.plot_against_train_loss(runs, ("gcdf@3",))


def test_family_at_level(runs):
    level = 0.3
    fig = plots.plot_family_at_level(runs, level)
    assert len(fig.axes) == 6  # three families, values and ratio rows
    top = fig.axes[:3]
    for ax, grid in zip(top, (SIGMAS, TEMPERATURES, MARGINS)):
        assert ax.get_xscale() == "log"
        assert len(ax.get_lines()) == 2
        np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), grid)
    agg = analysis.aggregate(analysis.group_runs(runs)[1], level)
    np.testing.assert_allclose(top[0].get_lines()[1].get_ydata(), [agg.mean[f"gcdf@{fmt(s)}"] for s in SIGMAS])
    ratio = fig.axes[3].get_lines()
    np.testing.assert_allclose(ratio[0].get_ydata(), 1.0)
    assert fig.axes[3].get_xlabel() == "σ"
    with pytest.raises(analysis.LevelNotReachedError):
        plots.plot_family_at_level(runs, 1e-6)


def test_plot_all_writes_png_and_pdf(runs, tmp_path):
    paths = plots.plot_all(runs, tmp_path / "figs", level=0.3)
    stems = sorted({p.stem for p in paths})
    assert stems == ["at_level", "curves_gcdf_train", "curves_hinge_train", "curves_tce_train", "fig1_loss_shapes",
                     "vs_train_loss"]
    for path in paths:
        check_image(path, path.suffix[1:])
    assert len(paths) == 12


def test_plot_all_kinds(runs, tmp_path):
    paths = plots.plot_all(runs, tmp_path, formats=("png",), kinds=("at_level", "vs_train_loss"))
    assert sorted(p.name for p in paths) == ["at_level.png", "vs_train_loss.png"]
    with pytest.raises(ValueError, match="unknown figure kinds"):
        plots.plot_all(runs, tmp_path, kinds=("heatmap",))


def test_plot_all_without_tensorflow_figure(runs, tmp_path):
    paths = plots.plot_all(runs[:3], tmp_path / "figs", formats=("png",), loss_shapes=False)
    assert sorted(p.name for p in paths) == ["at_level.png", "curves_gcdf_train.png", "curves_hinge_train.png",
                                             "curves_tce_train.png", "vs_train_loss.png"]
    for path in paths:
        check_image(path, "png")


_WITHOUT_KERAS = textwrap.dedent(
    """
    import importlib.abc, json, sys, warnings

    class NoKeras(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("keras", "tensorflow", "jax"):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, NoKeras())
    from keras_implicit import analysis, plots
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = plots.plot_all(analysis.load_runs(sys.argv[2:]), sys.argv[1], formats=("png",))
    print("RESULT " + json.dumps({"files": sorted(p.name for p in paths),
                                  "warnings": [str(w.message) for w in caught if w.category is plots.PlotWarning]}))
    """
)


def test_plot_all_without_keras_leaves_fig1_out_with_a_warning(runs, tmp_path):
    done = subprocess.run([sys.executable, "-c", _WITHOUT_KERAS, str(tmp_path / "figs"),
                           *(str(r.path) for r in runs[:3])], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["files"] == ["at_level.png", "curves_gcdf_train.png", "curves_hinge_train.png",
                               "curves_tce_train.png", "vs_train_loss.png"]
    assert len(result["warnings"]) == 1 and result["warnings"][0].startswith(
        "not drawn: loss_shapes: fig. 1 computes the families with keras_implicit.losses, which needs Keras")
    assert "pass loss_shapes=False to leave it out" in result["warnings"][0]


def write_narrow_run(path, lr, ces):
    """A short run whose training CE takes the values ``ces``; every tracked loss stays within 3.5-5.5."""
    path.mkdir(parents=True)
    config = {"model": "fc6", "dataset": "fashion_mnist", "lr": lr, "batch_size": 256, "seed": 0, "epochs": 1,
              "sigmas": list(SIGMAS), "temperatures": list(TEMPERATURES), "margins": list(MARGINS)}
    (path / "config.json").write_text(json.dumps(config))
    (path / "status.json").write_text(json.dumps({"state": "finished", "epoch": 1, "step": len(ces) - 1}))
    sign = 1.0 if lr > 0.01 else -1.0
    with open(path / "metrics.jsonl", "w") as f:
        for k, ce in enumerate(ces):
            record = {"epoch": k / (len(ces) - 1), "step": k, "split": "train", "ce": ce, "error": 0.9 * ce / 2.3}
            for family, grid in (("gcdf", SIGMAS), ("tce", TEMPERATURES), ("hinge", MARGINS)):
                for p in grid:
                    record[f"{family}@{fmt(p)}"] = 4.5 + sign * 0.1 * (k + 1) * math.log(p)
            f.write(json.dumps(record) + "\n")
    return path


MATHTEXT_TICK = re.compile(r"\$\\mathdefault\{(?:([0-9.]+)\\times)?10\^\{(-?[0-9]+)\}\}\$")


def tick_value(text):
    """The number a tick label writes: a plain decimal or $\\mathdefault{m\\times10^{k}}$."""
    match = MATHTEXT_TICK.fullmatch(text)
    if match:
        return float(match.group(1) or 1) * 10.0 ** int(match.group(2))
    return float(text)


def readable_tick_labels(fig, axis, min_labels=2):
    """``axis``'s visible tick labels (major and minor) after drawing ``fig``, checked readable: ``min_labels``
    to 8 labels, no two overlapping on the canvas, each writing its tick's value."""
    canvas = fig.canvas
    if not isinstance(canvas, FigureCanvasAgg) or fig.stale:  # drawn once for all the axes a test checks
        canvas = canvas if isinstance(canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
        canvas.draw()
    renderer = canvas.get_renderer()
    low, high = sorted(axis.get_view_interval())
    ticks = [*zip(axis.get_majorticklocs(), axis.get_major_ticks()),
             *zip(axis.get_minorticklocs(), axis.get_minor_ticks())]
    labelled = sorted((loc, tick.label1) for loc, tick in ticks
                      if tick.label1.get_visible() and tick.label1.get_text() and low <= loc <= high)
    assert min_labels <= len(labelled) <= 8, [label.get_text() for _, label in labelled]
    boxes = [label.get_window_extent(renderer) for _, label in labelled]
    for (a, box_a), (b, box_b) in itertools.combinations(zip(labelled, boxes), 2):
        assert not box_a.overlaps(box_b), f"tick labels {a[1].get_text()!r} and {b[1].get_text()!r} overlap"
    for loc, label in labelled:
        assert tick_value(label.get_text()) == pytest.approx(loc, rel=1e-6), (label.get_text(), loc)
    return [label.get_text() for _, label in labelled]


def assert_plain(texts):
    for text in texts:
        assert "$" not in text and "×10" not in text and "10^{" not in text, texts


def test_narrow_ce_range_has_plain_readable_ticks(tmp_path):
    # Two short runs whose training CE spans only 2.30-2.289 (the log x axis spans 0.2% of a decade).
    runs = analysis.load_runs([write_narrow_run(tmp_path / "fast", 0.1, [2.30, 2.295, 2.29, 2.289]),
                               write_narrow_run(tmp_path / "slow", 0.001, [2.30, 2.29])])
    fig = plots.plot_against_train_loss(runs, ("gcdf@0.5", "gcdf@1", "gcdf@8", "error"))
    for ax in fig.axes:
        texts = readable_tick_labels(fig, ax.xaxis, min_labels=3)
        assert_plain(texts)
        assert all(2.285 <= float(t) <= 2.305 for t in texts), texts
        assert len({len(t) for t in texts}) == 1, texts  # evenly spaced: one number of decimals
    # At that level each family lies within 3.5-5.5: plain "4.5", not "4.5×10⁰".
    fig = plots.plot_family_at_level(runs, 2.29)
    top, bottom = fig.axes[:3], fig.axes[3:]
    for ax in top:
        assert ax.get_yscale() == "log"
        texts = readable_tick_labels(fig, ax.yaxis)
        assert_plain(texts)
        assert all(3 <= float(t) <= 6 for t in texts), texts
    for ax, grid in zip(bottom, (SIGMAS, TEMPERATURES, MARGINS)):
        texts = readable_tick_labels(fig, ax.xaxis)
        assert_plain(texts)
        assert {float(t) for t in texts} <= set(grid)
        ticked = {*ax.xaxis.get_majorticklocs(), *ax.xaxis.get_minorticklocs()}
        np.testing.assert_allclose(sorted(ticked), grid)  # every grid value has a tick, labelled or not


def test_wide_ranges_have_readable_ticks(tmp_path):
    runs = analysis.load_runs([write_run(tmp_path / f"lr{lr}", lr, 0, epochs=16) for lr in (0.1, 0.001)])
    fig = plots.plot_against_train_loss(runs, ("gcdf@1", "error"))
    for ax in fig.axes:
        low, high = sorted(ax.get_xlim())
        assert high / low > 1000  # several decades of training CE
        texts = readable_tick_labels(fig, ax.xaxis, min_labels=3)
        assert "1" in texts and "0.01" in texts
    fig = plots.plot_training_curves(runs, "gcdf")
    readable_tick_labels(fig, fig.axes[0].yaxis, min_labels=3)
    fig = plots.plot_family_at_level(runs, 0.01)
    for ax in fig.axes[:3]:
        readable_tick_labels(fig, ax.yaxis)
    for ax in fig.axes[3:]:
        readable_tick_labels(fig, ax.xaxis)


@pytest.mark.parametrize("low, high", [
    (2.29, 2.2977), (0.999, 1.001), (100.0, 101.0), (4.2, 4.9), (0.3, 0.8), (0.1, 1.0), (2.0, 30.0),
    (0.05, 0.6), (1e-3, 3.0), (3e-5, 8e-5), (1e4, 3e6), (1e-7, 3.0), (1e-12, 1e3)])
@pytest.mark.parametrize("which", ["x", "y"])
def test_readable_log_ticks_at_any_range(low, high, which):
    fig = Figure(figsize=(3.6, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([low, high], [low, high])
    ax.set_xscale("log")
    ax.set_yscale("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    plots.readable_log_ticks(axis)
    texts = readable_tick_labels(fig, axis)
    assert [t.get_text() for t in axis.get_minorticklabels() if t.get_text()] == []
    if 1e-3 <= low and high < 1e5:
        assert_plain(texts)
    else:
        assert all(MATHTEXT_TICK.fullmatch(t) for t in texts), texts  # one notation per axis


@pytest.mark.parametrize("low, high", [(0.88, 2.2), (0.9, 2.0), (1.0, 3.5), (0.7, 1.3)])
def test_under_a_decade_evenly_spaced_labels_where_round_log_values_are_few(low, high):
    """A ratio axis from 0.9 to 2.2 used to read 0.9, 1, 2: now as many evenly spaced labels as fit (5 or more)."""
    fig = Figure(figsize=(4.2, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([1, 2], [low, high])
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    plots.readable_log_ticks(ax.yaxis)
    values = [tick_value(t) for t in readable_tick_labels(fig, ax.yaxis, min_labels=5)]
    np.testing.assert_allclose(np.diff(values), np.diff(values)[0], rtol=1e-9)


def test_readable_log_ticks_on_a_parameter_grid():
    grid = 2.0 ** np.arange(-6, 7)  # 13 values: not all labels fit
    fig = Figure(figsize=(3.6, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(grid, np.ones_like(grid))
    ax.set_xscale("log")
    plots.readable_log_ticks(ax.xaxis, at=grid)
    texts = readable_tick_labels(fig, ax.xaxis, min_labels=3)
    assert "1" in texts and {float(t) for t in texts} <= set(grid)
    assert len(texts) < len(grid)
    np.testing.assert_allclose(sorted({*ax.xaxis.get_majorticklocs(), *ax.xaxis.get_minorticklocs()}), grid)


def test_plots_leave_the_backend_and_pyplot_alone(runs, tmp_path):
    # A fresh interpreter, as a notebook is: it chose its backend before importing the library.
    code = textwrap.dedent(f"""
        import json, sys
        import matplotlib
        matplotlib.use("svg")
        from keras_implicit import analysis, plots
        runs = analysis.load_runs([{str(runs[0].path.parent)!r}])
        paths = plots.plot_all(runs, {str(tmp_path / "figs")!r}, level=0.3, loss_shapes=False)
        report = {{"pyplot": "matplotlib.pyplot" in sys.modules, "backend": matplotlib.get_backend(),
                   "paths": [str(p) for p in paths]}}
        # Fig. 1 imports TensorFlow, whose Keras loads pyplot itself: the backend must still be the user's.
        paths = plots.save_figure(plots.plot_loss_shapes(), {str(tmp_path / "figs")!r}, "fig1")
        report.update(fig1_backend=matplotlib.get_backend(), fig1_paths=[str(p) for p in paths])
        print(json.dumps(report))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("MPLBACKEND", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["pyplot"] is False
    assert report["backend"] == "svg" and report["fig1_backend"] == "svg"
    paths = [Path(p) for p in report["paths"] + report["fig1_paths"]]
    assert sorted(p.suffix for p in paths) == [".pdf"] * 6 + [".png"] * 6
    for path in paths:
        check_image(path, path.suffix[1:])


def load_plot_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "experiments" / "plot.py"
    spec = importlib.util.spec_from_file_location("_script_plot", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_plot_script(runs, tmp_path, capsys):
    script = load_plot_script()
    folder = runs[0].path.parent
    assert script.main([str(folder), "--out", str(tmp_path / "out"), "--no-loss-shapes", "--formats", "png",
                        "--level", "0.3", "--quantities", "gcdf@1", "error"]) == 0
    out = capsys.readouterr().out
    assert "lr=0.1: 3 run(s), seeds [0, 1, 2]" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "at_level.png", "curves_gcdf_train.png", "curves_hinge_train.png", "curves_tce_train.png",
        "vs_train_loss.png"]
    assert script.main([str(folder), "--out", str(tmp_path / "bad"), "--no-loss-shapes", "--level", "1e-9"]) == 1
    assert "never reaches a training CE of 1e-09" in capsys.readouterr().err
    assert script.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "bad")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert script.main([str(runs[0].path / "metrics.jsonl"), "--out", str(tmp_path / "bad")]) == 1
    assert f"{runs[0].path / 'metrics.jsonl'} is a file, not a run directory" in capsys.readouterr().err
    # Problems are found before any file is written, and named.
    for flags, message in ((["--kinds", "sharpness"], "error: nothing to draw: sharpness: run 'lr0.1_s0' did not "
                                                      "track the noisy error"),
                           (["--quantities", "foo@1"], "error: quantity 'foo@1' not tracked by every run: they "
                                                       "tracked ce, error, gcdf@{0.25, 0.5, 1, 8}"),
                           (["--level", "-1"], "error: the level must be a finite training CE > 0, got -1.0"),
                           (["--level", "0.0001"], "error: run 'lr0.1_s0' never reaches a training CE of 0.0001")):
        assert script.main([str(folder), "--out", str(tmp_path / "bad"), "--no-loss-shapes", *flags]) == 1, flags
        err = capsys.readouterr().err
        assert message in err, err
    assert not (tmp_path / "bad").exists()
    # A kind that cannot be drawn beside one that can: a warning line, and the other written.
    assert script.main([str(folder), "--out", str(tmp_path / "some"), "--kinds", "at_level", "sharpness",
                        "--formats", "png"]) == 0
    captured = capsys.readouterr()
    assert "warning: not drawn: sharpness: run 'lr0.1_s0' did not track the noisy error" in captured.err
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["at_level.png"]
    # Sharpness levels for runs without the noisy error: said, as when the kind is asked for.
    assert script.main([str(folder), "--out", str(tmp_path / "levels"), "--no-loss-shapes", "--formats", "png",
                        "--sharpness-levels", "0.5"]) == 0
    assert "warning: not drawn: sharpness: run 'lr0.1_s0' did not track the noisy error" in capsys.readouterr().err
    # The same runs twice (two folders holding one run): one line, nothing written.
    assert script.main([str(folder), str(runs[0].path), "--out", str(tmp_path / "twice")]) == 1
    assert "are the same setting with seed 0: the seed statistics would count it twice" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()


def test_ladder_one_line_per_level_ratio_and_band(tmp_path):
    from tests.test_analysis import _ladder_runs

    a, b, *_ = _ladder_runs(tmp_path)
    ladder = analysis.loss_ladder(a, b, levels=(1.0, 0.25, 0.04))
    fig = plots.plot_ladder(ladder)
    axes = fig.axes
    assert len(axes) == 3
    for axis, family in zip(axes, analysis.FAMILIES):
        curves = [line for line in axis.get_lines() if len(line.get_xdata()) > 2]
        assert [line.get_label() for line in curves] == ["train CE 1", "train CE 0.25", "train CE 0.04"]
        for line, row in zip(curves, range(3)):
            np.testing.assert_allclose(line.get_ydata(), ladder.ratio[family][row])
        assert any(list(line.get_ydata()) == [1.0, 1.0] for line in axis.get_lines())  # the line at 1
        assert len(axis.collections) == 3  # one seed band per level
        assert axis.get_xscale() == "log" and axis.get_yscale() == "log"
    paths = plots.save_figure(fig, tmp_path / "out", "ladder", formats=("png",))
    assert paths[0].stat().st_size > 10_000


def test_ladder_script_writes_figures_and_tables(tmp_path):
    from tests.test_analysis import _ladder_runs

    _ladder_runs(tmp_path / "runs")
    script = Path(__file__).resolve().parent.parent / "experiments" / "ladder.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), "--a", "lr=0.1", "--b", "lr=0.001",
                           "--levels", "1", "0.25", "0.001", "--holds", "0", "1", "--formats", "png",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"ladder_hold0.png", "ladder_hold1.png", "ladder.md"}
    table = (tmp_path / "out" / "ladder.md").read_text()
    assert table.count("### gcdf: lr=0.1 / lr=0.001") == 2 and "Levels left out: 0.001" in table
    assert "| 0.25 |" in table
    wrong = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), "--a", "lr=1", "--b", "lr=0.001",
                            "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 1 and "no group 'lr=1' among the runs: 'lr=0.1', 'lr=0.001'" in wrong.stderr


def test_ladder_axis_is_clipped_when_a_ratio_runs_off(tmp_path):
    from tests.test_analysis import _ladder_runs

    a, b, *_ = _ladder_runs(tmp_path)
    ladder = analysis.loss_ladder(a, b, levels=(1.0, 0.25))
    ladder.ratio["gcdf"][1, 0] = 1e25  # as a loss that reached 0 in b makes it
    fig = plots.plot_ladder(ladder, families=("gcdf", "tce"), limit=100)
    clipped, normal = fig.axes
    assert clipped.get_ylim()[1] == pytest.approx(100 * 1.15) and "axis clipped at ×100" in clipped.get_ylabel()
    assert normal.get_ylim()[1] < 100 and "clipped" not in normal.get_ylabel()


def write_noisy_run(path, lr, seed, noisy_scale):
    """A run with the sharpness quantities: noisy_error = noisy_scale x Gcdf (a known tightness), eq9 and
    noisy_ce known functions of the CE, and a noisy error of 0 at the smallest sigma (left off the log axis)."""
    write_run(path, lr, seed)
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    with open(path / "metrics.jsonl", "w") as f:
        for record in records:
            for s in SIGMAS:
                gcdf = record[f"gcdf@{fmt(s)}"]
                record[f"noisy_error@{fmt(s)}"] = 0.0 if s == SIGMAS[0] else noisy_scale * gcdf
                record[f"noisy_error_se@{fmt(s)}"] = 0.001
                record[f"noisy_ce@{fmt(s)}"] = record["ce"] * (1 + s)
                record[f"eq9@{fmt(s)}"] = (record["ce"] + s * s / 2 * 0.1) / math.log(2)
            record["hessian_trace"] = 0.1
            f.write(json.dumps(record) + "\n")
    return path


def test_sharpness_figure_lines_values_and_tightness(tmp_path):
    runs = analysis.load_runs([write_noisy_run(tmp_path / f"lr{lr}_s{seed}", lr, seed, scale)
                               for lr, scale in ((0.1, 0.5), (0.001, 0.25)) for seed in (0, 1)])
    levels = (0.5, 0.2)
    fig = plots.plot_sharpness(runs, levels)
    assert len(fig.axes) == 4  # two levels, values and tightness rows
    groups = analysis.group_runs(runs)
    for col, level in enumerate(levels):
        top, bottom = fig.axes[col], fig.axes[len(levels) + col]
        assert top.get_xscale() == "log" and top.get_yscale() == "log" and f"train CE = {level:g}" in top.get_title()
        lines = top.get_lines()
        assert len(lines) == 4 * len(groups)  # Gcdf, noisy error, eq9, noisy CE per setting
        for g, group in enumerate(groups):
            gcdf, noisy, eq9, noisy_ce = lines[4 * g:4 * g + 4]
            np.testing.assert_allclose(gcdf.get_xdata(), SIGMAS)
            means = [np.mean([analysis.at_level(r, level).values[f"{q}@{fmt(s)}"] for r in group.runs])
                     for q in ("gcdf", "eq9") for s in SIGMAS]
            np.testing.assert_allclose(gcdf.get_ydata(), means[:len(SIGMAS)], rtol=1e-12)
            np.testing.assert_allclose(eq9.get_ydata(), means[len(SIGMAS):], rtol=1e-12)
            assert np.isnan(noisy.get_ydata()[0])  # 0 is left off the log axis
            # A multiple of the CE: read at a level, exactly the level's multiple (analysis.interpolate).
            np.testing.assert_allclose(noisy_ce.get_ydata(), level * (1 + np.array(SIGMAS)) / math.log(2), rtol=1e-12)
        for group, line in zip(groups, bottom.get_lines()[:len(groups)]):
            np.testing.assert_allclose(line.get_ydata()[1:], 0.5 if "0.1" in group.label else 0.25, rtol=1e-12)
    assert [t.get_text() for t in fig.legends[0].get_texts()][-2:] == [f"{g.label} (n=2)" for g in groups]
    paths = plots.save_figure(fig, tmp_path / "out", "sharpness", formats=("png",))
    check_image(paths[0], "png")
    assert "sharpness.png" in [p.name for p in plots.plot_all(runs, tmp_path / "all", level=0.3, formats=("png",),
                                                               kinds=("sharpness",))]
    paths = plots.plot_all(runs, tmp_path / "levels", formats=("png",), kinds=("sharpness",),
                           sharpness_levels=(0.5, 0.2), sharpness_hold=1)
    assert [p.name for p in paths] == ["sharpness_hold1.png"]
    with pytest.raises(analysis.LevelNotReachedError, match="never reaches a training CE of 1e-06"):
        plots.plot_all(runs, tmp_path / "unreached", formats=("png",), kinds=("sharpness",), sharpness_levels=(1e-6,))
    assert not (tmp_path / "unreached").exists()


def test_sharpness_figure_needs_the_noisy_error(runs, tmp_path):
    with pytest.raises(ValueError, match="did not track the noisy error: train with --noisy-error-draws"):
        plots.plot_sharpness(runs, [0.3])
    # Asked for alone: an error, and nothing written.
    with pytest.raises(ValueError, match=r"nothing to draw: sharpness: run 'lr0.1_s0' did not track the noisy "
                                         r"error: train with --noisy-error-draws"):
        plots.plot_all(runs, tmp_path / "alone", formats=("png",), kinds=("sharpness",))
    assert not (tmp_path / "alone").exists()
    # Asked for beside another kind: the other is drawn, and a warning says why the sharpness figure is not.
    with pytest.warns(plots.PlotWarning, match=r"not drawn: sharpness: run 'lr0.1_s0' did not track the noisy"):
        paths = plots.plot_all(runs, tmp_path / "both", formats=("png",), kinds=("at_level", "sharpness"))
    assert [p.name for p in paths] == ["at_level.png"]
    # Not asked for (the default kinds): runs without the noisy error simply get no sharpness figure.
    with warnings.catch_warnings():
        warnings.simplefilter("error", plots.PlotWarning)
        paths = plots.plot_all(runs, tmp_path / "default", formats=("png",), loss_shapes=False)
    assert "at_level.png" in [p.name for p in paths] and not any("sharpness" in p.name for p in paths)


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


@pytest.mark.parametrize("arguments, error, match", [
    ({"level": -1}, ValueError, r"the level must be a finite training CE > 0, got -1"),
    ({"level": 0.0}, ValueError, r"the level must be a finite training CE > 0, got 0.0"),
    ({"level": math.nan}, ValueError, r"the level must be a finite training CE > 0, got nan"),
    ({"level": 1e-4}, analysis.LevelNotReachedError, r"run 'lr0.1_s0' never reaches a training CE of 0.0001"),
    ({"quantities": ("gcdf@1", "foo@1")}, ValueError,
     r"quantity 'foo@1' not tracked by every run: they tracked ce, error, gcdf@\{0.25, 0.5, 1, 8\}, "
     r"tce@\{0.5, 1, 4\}, hinge@\{0.5, 1, 4\}"),
    ({"quantities": ("gcdf@3", "tce@0.25")}, ValueError, r"quantities 'gcdf@3', 'tce@0.25' not tracked by every"),
    ({"quantities": ("foo@1",), "kinds": ("curves",)}, ValueError, r"quantity 'foo@1' not tracked by every run"),
    ({"quantities": ()}, ValueError, r"no quantities given"),
    ({"formats": ("png", "jpeg2000")}, ValueError, r"unsupported figure formats \['jpeg2000'\]"),
    ({"x": "time"}, ValueError, r"x must be 'epoch' or 'step', got 'time'"),
    ({"kinds": ()}, ValueError, r"no figure kind asked for"),
    ({"kinds": ("heatmap",)}, ValueError, r"unknown figure kinds \['heatmap'\]"),
    ({"sharpness_levels": [0.3, -2.0], "kinds": ("curves", "sharpness")}, ValueError,
     r"each sharpness level must be a finite training CE > 0, got -2.0"),
    ({"sharpness_hold": -1}, ValueError, r"the sharpness hold must be a whole number"),
])
def test_plot_all_checks_everything_before_writing(runs, tmp_path, arguments, error, match):
    # Curves come first in the plan: any of these problems used to surface only after they were written.
    out = tmp_path / "figs"
    with pytest.raises(error, match=match):
        plots.plot_all(runs, out, loss_shapes=False, **{"formats": ("png",), **arguments})
    assert _tree(out) is None


def test_a_level_only_for_the_kinds_that_need_one(tmp_path):
    # Two runs with no training CE in common: the first goes from 2.3 down to 1.0, the second from 0.9 to 0.1.
    runs = analysis.load_runs([write_narrow_run(tmp_path / "fast", 0.1, [2.3, 1.7, 1.2, 1.0]),
                               write_narrow_run(tmp_path / "slow", 0.001, [0.9, 0.5, 0.2, 0.1])])
    with pytest.raises(analysis.LevelNotReachedError, match="no training CE level is reached by every run"):
        analysis.common_level(runs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", plots.PlotWarning)
        paths = plots.plot_all(runs, tmp_path / "figs", formats=("png",), kinds=("curves", "vs_train_loss"))
    assert sorted(p.name for p in paths) == ["curves_gcdf_train.png", "curves_hinge_train.png",
                                             "curves_tce_train.png", "vs_train_loss.png"]
    # Each run is drawn over the CE range it covers, on one axis from 2.3 down to 0.1.
    fig = plots.plot_against_train_loss(runs, ("gcdf@1",), points=30)
    fast, slow = fig.axes[0].get_lines()
    levels = fast.get_xdata()
    assert levels[0] == pytest.approx(2.3 * 0.999) and levels[-1] == pytest.approx(0.1)
    assert np.array_equal(np.isfinite(fast.get_ydata()), levels >= 1.0)
    assert np.array_equal(np.isfinite(slow.get_ydata()), levels < 0.9)
    np.testing.assert_allclose(slow.get_ydata()[levels < 0.9],
                               analysis.curve_at_levels(runs[1], "gcdf@1", levels[levels < 0.9]))
    # The default kinds draw what they can, and say which one they cannot.
    with pytest.warns(plots.PlotWarning, match=r"not drawn: at_level: no training CE level is reached by every "
                                               r"run.*; give a level"):
        paths = plots.plot_all(runs, tmp_path / "all", formats=("png",), loss_shapes=False)
    assert "at_level.png" not in [p.name for p in paths] and "vs_train_loss.png" in [p.name for p in paths]
    # A level that only one run reaches is an error, before any file.
    with pytest.raises(analysis.LevelNotReachedError, match="never reaches a training CE of 0.5"):
        plots.plot_all(runs, tmp_path / "none", formats=("png",), level=0.5, loss_shapes=False)
    assert _tree(tmp_path / "none") is None


def _overlaps(fig, legend):
    """The axes of ``fig`` that ``legend`` overlaps on the drawn canvas."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    return [ax for ax in fig.axes if box.overlaps(ax.get_window_extent(renderer))]


def test_legends_are_outside_the_data(runs, tmp_path):
    # Long group labels (as plot.py makes them for runs that differ in several settings) would cover points.
    from tests.test_analysis import _ladder_runs

    figures = {"at_level": plots.plot_family_at_level(runs, 0.3),
               "vs_train_loss": plots.plot_against_train_loss(runs, ("gcdf@0.5", "gcdf@8", "error"), points=20)}
    a, b, *_ = _ladder_runs(tmp_path)
    figures["ladder"] = plots.plot_ladder(analysis.loss_ladder(a, b, levels=(1.0, 0.25, 0.04)))
    for name, fig in figures.items():
        assert all(ax.get_legend() is None for ax in fig.axes), name
        assert len(fig.legends) == 1, name
        assert _overlaps(fig, fig.legends[0]) == [], name
    labels = [t.get_text() for t in figures["at_level"].legends[0].get_texts()]
    assert labels == ["lr=0.1 (n=3)", "lr=0.001 (n=3)"]


def test_at_level_ratio_is_to_the_fastest_group_whatever_the_order(runs):
    # Loaded from a folder, lr0.001 sorts before lr0.1; the ratio row still divides by lr 0.1 (group_runs' order).
    fig = plots.plot_family_at_level(list(reversed(runs)), 0.3)
    assert fig.axes[3].get_ylabel() == "ratio to lr=0.1"
    np.testing.assert_allclose(fig.axes[3].get_lines()[0].get_ydata(), 1.0)
    fast = analysis.aggregate(analysis.group_runs(runs)[0], 0.3)
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [fast.mean[f"gcdf@{fmt(s)}"] for s in SIGMAS])


def test_band_on_a_log_axis_stays_positive_where_the_seeds_spread_more_than_their_mean():
    x = np.array([1.0, 2.0, 3.0])
    mean, std = np.array([1.0, 0.5, 0.2]), np.array([0.1, 1.0, 0.6])
    for log, expected_lower in ((False, mean - std), (True, mean**2 / (mean + std))):
        fig = Figure()
        ax = fig.subplots()
        plots._band(ax, x, mean, std, "k", log=log)
        (band,) = ax.collections
        vertices = band.get_paths()[0].vertices
        upper = np.array([vertices[(vertices[:, 0] == v)][:, 1].max() for v in x])
        lower = np.array([vertices[(vertices[:, 0] == v)][:, 1].min() for v in x])
        np.testing.assert_allclose(upper, mean + std)
        np.testing.assert_allclose(lower, expected_lower)
    assert np.all(expected_lower > 0) and np.any(mean - std < 0)
    np.testing.assert_allclose(expected_lower[0], 1.0 / 1.1)  # ~ mean - std = 0.9 where the spread is small

