"""keras_implicit.plots: every figure kind renders from small synthetic runs."""

import json
import math

import matplotlib
import numpy as np
import pytest

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


def test_backend_is_agg():
    assert matplotlib.get_backend().lower() == "agg"


def test_loss_shapes_match_the_closed_forms():
    pytest.importorskip("tensorflow")
    from scipy.stats import norm

    z = np.linspace(-3, 5, 17)
    fig = plots.plot_loss_shapes(sigmas=(0.5, 2.0), temperatures=(1.0, 4.0), margins=(1.0,), z=z)
    gcdf_axes, tce_axes, hinge_axes = fig.axes
    assert len(gcdf_axes.get_lines()) == 2 + 1  # two sigmas and the z = 0 line
    np.testing.assert_allclose(gcdf_axes.get_lines()[1].get_ydata(), norm.cdf(-z / (math.sqrt(2) * 2.0)), rtol=1e-5)
    np.testing.assert_allclose(tce_axes.get_lines()[1].get_ydata(), np.log1p(np.exp(-z / 4.0)), rtol=1e-5)
    np.testing.assert_allclose(hinge_axes.get_lines()[0].get_ydata(), np.maximum(0, 1.0 - z), atol=1e-6)
    assert [a.get_xlabel() for a in fig.axes] == ["margin z = s_y − s_j"] * 3
    matplotlib.pyplot.close(fig)


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
    matplotlib.pyplot.close(fig)


def test_training_curves_subset_step_axis_and_bad_parameter(runs):
    fig = plots.plot_training_curves(runs[:1], "hinge", x="step", parameters=[1, 4], split="test")
    assert len(fig.axes) == 1 and len(fig.axes[0].get_lines()) == 2 and fig.axes[0].get_xlabel() == "step"
    assert len(fig.axes[0].collections) == 0  # one seed: no band
    matplotlib.pyplot.close(fig)
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
    matplotlib.pyplot.close(fig)
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
    matplotlib.pyplot.close(fig)
    with pytest.raises(analysis.LevelNotReachedError):
        plots.plot_family_at_level(runs, 1e-6)


def test_plot_all_writes_png_and_pdf(runs, tmp_path):
    pytest.importorskip("tensorflow")
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
