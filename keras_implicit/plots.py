"""The paper's figures, from run directories (matplotlib, Agg backend).

=====================  ===============================================  =================================
paper figure           what                                             function
=====================  ===============================================  =================================
1                      each family's binary loss against the margin z   :func:`plot_loss_shapes`
2-5, 8-11, 13-14       tracked losses against epoch (or step), one      :func:`plot_training_curves`
                       panel per run, one line per parameter
6, 15                  chosen losses and the train error against the    :func:`plot_against_train_loss`
                       training CE, runs overlaid
7, 12, 16              each family against its parameter at a fixed     :func:`plot_family_at_level`
                       training CE, runs overlaid, log parameter axis
=====================  ===============================================  =================================

Runs are seed groups (:func:`keras_implicit.analysis.group_runs`): a line is the mean over seeds and
a shaded band spans mean ± one standard deviation. Lines differ by line style and marker as well as
colour, so the figures read in grayscale. Only :func:`plot_loss_shapes` imports TensorFlow (through
:mod:`keras_implicit.losses`, so each formula has one definition); the others need only the run
directories.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from keras_implicit import analysis  # noqa: E402

__all__ = [
    "RUN_STYLES",
    "KINDS",
    "plot_loss_shapes",
    "plot_training_curves",
    "plot_against_train_loss",
    "plot_family_at_level",
    "save_figure",
    "plot_all",
]

# (colour, line style, marker) per run group: distinct in grayscale through style and marker.
RUN_STYLES = (
    ("#000000", "-", "o"),
    ("#d55e00", "--", "s"),
    ("#0072b2", ":", "^"),
    ("#009e73", "-.", "D"),
    ("#cc79a7", (0, (5, 1, 1, 1, 1, 1)), "v"),
    ("#e69f00", (0, (1, 3)), "P"),
)
_PARAMETER_STYLES = ("-", "--", ":", "-.")
# The figure kinds of plot_all.
KINDS = ("loss_shapes", "curves", "vs_train_loss", "at_level")
_PARAMETER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")


def _as_groups(runs) -> list[analysis.RunGroup]:
    if isinstance(runs, analysis.RunGroup):
        return [runs]
    runs = list(runs)
    if not runs:
        raise ValueError("no runs given")
    if all(isinstance(r, analysis.RunGroup) for r in runs):
        return runs
    if all(isinstance(r, analysis.Run) for r in runs):
        return analysis.group_runs(runs)
    raise TypeError("expected Run objects, RunGroup objects, or one RunGroup")


def _parameter_style(k: int, count: int):
    colour = plt.get_cmap("viridis")(0.9 * k / max(count - 1, 1))  # luminance rises with k
    return colour, _PARAMETER_STYLES[k % len(_PARAMETER_STYLES)], _PARAMETER_MARKERS[k % len(_PARAMETER_MARKERS)]


def _band(ax, x, mean, std, colour):
    if std is not None and np.any(np.isfinite(std)):
        ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)


def _mean_std(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    mean = np.nanmean(stack, axis=0)
    if stack.shape[0] < 2:
        return mean, None
    return mean, np.nanstd(stack, axis=0, ddof=1)


# --------------------------------------------------------------------------- #
# Fig. 1
# --------------------------------------------------------------------------- #
def plot_loss_shapes(
    sigmas: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    temperatures: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    margins: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    z: Sequence[float] | None = None,
):
    """Fig. 1: the binary view of each family against the margin ``z = s_y - s_j``.

    Gcdf ``Phi(-z / (sqrt(2) sigma))``, tempered CE ``log(1 + exp(-z / T))``, hinge
    ``max(0, gamma - z)``: computed by :mod:`keras_implicit.losses` on two-class logits ``[z, 0]``
    with label 0.

    Returns:
        A matplotlib Figure with three panels (a), (b), (c), one line per parameter.
    """
    from keras_implicit import losses  # TensorFlow: only this figure needs it

    z = np.linspace(-4.0, 8.0, 241) if z is None else np.asarray(z, dtype=np.float64)
    logits = np.stack([z, np.zeros_like(z)], axis=1)
    labels = np.zeros(z.shape[0], dtype=np.int32)
    panels = [
        ("(a) Gcdf", "σ", sigmas, lambda p: losses.gcdf(labels, logits, sigma=list(p))),
        ("(b) tempered cross-entropy", "T", temperatures,
         lambda p: losses.tempered_crossentropy(labels, logits, temperature=list(p))),
        ("(c) multi-class hinge", "γ", margins, lambda p: losses.multiclass_hinge(labels, logits, margin=list(p))),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
    for ax, (title, symbol, params, fn) in zip(axes, panels):
        values = np.asarray(fn(params), dtype=np.float64)  # [len(z), K]
        for k, p in enumerate(params):
            colour, style, marker = _parameter_style(k, len(params))
            ax.plot(z, values[:, k], color=colour, linestyle=style, marker=marker, markevery=(k * 4, 30),
                    markersize=4, label=f"{symbol} = {p:g}")
        ax.axvline(0.0, color="0.6", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("margin z = s_y − s_j")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.02, 1.02)
    return fig


# --------------------------------------------------------------------------- #
# Figs. 2-5, 8-11, 13-14
# --------------------------------------------------------------------------- #
def _aligned(group: analysis.RunGroup, quantity: str, split: str, x: str):
    """Seed runs on a common step grid (the first run's points up to the shortest run's end)."""
    first = group.runs[0]
    steps0 = first.series(quantity, split, "step")[0]
    end = min(run.series(quantity, split, "step")[0][-1] for run in group.runs)
    keep = steps0 <= end
    grid = steps0[keep]
    stack = []
    for run in group.runs:
        steps, values = run.series(quantity, split, "step")
        stack.append(np.interp(grid, steps, values))
    xs = first.series(quantity, split, x)[0][keep]
    return xs, np.array(stack)


def plot_training_curves(runs, family: str, split: str = "train", x: str = "epoch",
                         parameters: Sequence[float] | None = None, yscale: str = "log"):
    """Figs. 2-5 (and 8-11, 13-14): one family tracked during training, one panel per run group,
    one line per parameter value; panels share the y axis.

    Args:
        runs: Runs (grouped by seed automatically) or RunGroups.
        family: ``"gcdf"``, ``"tce"`` or ``"hinge"``.
        split: ``"train"`` or ``"test"``.
        x: ``"epoch"`` or ``"step"``.
        parameters: the parameter values to draw (default: the whole tracked grid).
        yscale: ``"log"`` (default: the values span orders of magnitude across parameters) or ``"linear"``.

    Returns:
        A Figure with one Axes per group.
    """
    groups = _as_groups(runs)
    analysis.check_same_grids([r for g in groups for r in g.runs], families=[family], split=split)
    grid, names = groups[0].runs[0].family(family, split)
    if not names:
        raise ValueError(f"the runs tracked no {family} losses on {split!r}")
    if parameters is not None:
        wanted = [float(p) for p in parameters]
        chosen = [(p, n) for p, n in zip(grid, names) if any(math.isclose(p, w) for w in wanted)]
        if len(chosen) != len(wanted):
            raise ValueError(f"{family}: parameters {wanted} are not all in the tracked grid {grid.tolist()}")
        grid, names = np.array([p for p, _ in chosen]), [n for _, n in chosen]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups) + 1.4, 3.8), sharey=True,
                             squeeze=False, constrained_layout=True)
    symbol = analysis.FAMILY_PARAMETER[family]
    for ax, group, letter in zip(axes[0], groups, "abcdefghijklmnopqrstuvwxyz"):
        for k, (p, name) in enumerate(zip(grid, names)):
            xs, stack = _aligned(group, name, split, x)
            mean, std = _mean_std(stack)
            colour, style, marker = _parameter_style(k, len(names))
            ax.plot(xs, mean, color=colour, linestyle=style, marker=marker, markevery=max(len(xs) // 8, 1),
                    markersize=4, label=f"{symbol} = {p:g}")
            _band(ax, xs, mean, std, colour)
        seeds = f" ({len(group.runs)} seeds)" if len(group.runs) > 1 else ""
        ax.set_title(f"({letter}) {group.label}{seeds}", fontsize=10)
        ax.set_xlabel(x)
        ax.set_yscale(yscale)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(f"{split} {analysis.FAMILY_TITLE[family]}")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


# --------------------------------------------------------------------------- #
# Figs. 6, 15
# --------------------------------------------------------------------------- #
def _level_grid(runs: Sequence[analysis.Run], count: int) -> np.ndarray:
    low = analysis.common_level(runs)
    high = min(float(run.series("ce")[1][0]) for run in runs)
    if not high > low:
        raise analysis.LevelNotReachedError(
            f"the runs share no range of training CE: starts at {high:.4g}, lowest common level {low:.4g}"
        )
    return np.geomspace(high * 0.999, low, count)


def plot_against_train_loss(runs, quantities: Sequence[str] = ("gcdf@0.5", "gcdf@1", "gcdf@8", "error"),
                            points: int = 60):
    """Figs. 6 and 15: chosen quantities against the training CE, runs overlaid, one panel each.

    Each curve gives the quantity at the first crossing of each training-CE level
    (:func:`keras_implicit.analysis.at_level`) over log-spaced levels between the runs' common start
    and the lowest level all of them reach; seeds are averaged, with a ± std band. The CE axis is
    logarithmic and reversed, so training runs left to right.

    Returns:
        A Figure with one Axes per quantity.
    """
    groups = _as_groups(runs)
    all_runs = [r for g in groups for r in g.runs]
    for quantity in quantities:
        for run in all_runs:
            run.series(quantity)  # KeyError naming the run if it was not tracked
    analysis.check_same_grids(all_runs)
    levels = _level_grid(all_runs, points)
    fig, axes = plt.subplots(1, len(quantities), figsize=(3.6 * len(quantities), 3.6), squeeze=False,
                             constrained_layout=True)
    for ax, quantity, letter in zip(axes[0], quantities, "abcdefghijklmnopqrstuvwxyz"):
        for g, group in enumerate(groups):
            stack = np.array([analysis.curve_at_levels(run, quantity, levels) for run in group.runs])
            mean, std = _mean_std(stack)
            colour, style, marker = RUN_STYLES[g % len(RUN_STYLES)]
            ax.plot(levels, mean, color=colour, linestyle=style, marker=marker, markevery=(g * 2, 10),
                    markersize=4, label=group.label)
            _band(ax, levels, mean, std, colour)
        family, parameter = analysis.parse_name(quantity)
        title = ("train error" if quantity == "error" else
                 f"{analysis.FAMILY_TITLE.get(family, family)}, "
                 f"{analysis.FAMILY_PARAMETER.get(family, '')} = {parameter:g}"
                 if parameter is not None else quantity)
        ax.set_title(f"({letter}) {title}", fontsize=10)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("training cross-entropy")
        ax.set_ylabel(quantity)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- #
# Figs. 7, 12, 16
# --------------------------------------------------------------------------- #
def plot_family_at_level(runs, level: float, families: Sequence[str] = analysis.FAMILIES, ratio: bool = True):
    """Figs. 7, 12, 16: each family against its parameter at the training-CE ``level``, runs overlaid.

    Both axes are logarithmic. With ``ratio`` (and two or more groups) a second row shows each
    group's values divided by the first group's: a curve crossing 1 marks a crossover
    (:func:`keras_implicit.analysis.crossovers`). Parameters <= 0 are left out (log axis).

    Raises:
        LevelNotReachedError: a run does not reach ``level``.
        GridMismatchError: the runs tracked different grids.

    Returns:
        A Figure with one column per family (two rows with ``ratio``).
    """
    groups = _as_groups(runs)
    all_runs = [r for g in groups for r in g.runs]
    analysis.check_same_grids(all_runs, families=families)
    aggregates = [analysis.aggregate(group, level) for group in groups]
    rows = 2 if ratio and len(groups) > 1 else 1
    fig, axes = plt.subplots(rows, len(families), figsize=(4.2 * len(families), 3.4 * rows), squeeze=False,
                             sharex="col", constrained_layout=True)
    for col, family in enumerate(families):
        params, names = all_runs[0].family(family)
        keep = params > 0
        params, names = params[keep], [n for n, k in zip(names, keep) if k]
        reference = np.array([aggregates[0].mean[n] for n in names])
        for g, (group, agg) in enumerate(zip(groups, aggregates)):
            mean = np.array([agg.mean[n] for n in names])
            std = np.array([agg.std[n] for n in names])
            colour, style, marker = RUN_STYLES[g % len(RUN_STYLES)]
            label = f"{group.label} (n={agg.n})" if agg.n > 1 else group.label
            axes[0][col].plot(params, mean, color=colour, linestyle=style, marker=marker, markersize=5, label=label)
            _band(axes[0][col], params, mean, std if agg.n > 1 else None, colour)
            if rows == 2:
                axes[1][col].plot(params, mean / reference, color=colour, linestyle=style, marker=marker,
                                  markersize=5, label=label)
                if agg.n > 1:
                    _band(axes[1][col], params, mean / reference, std / reference, colour)
        symbol = analysis.FAMILY_PARAMETER[family]
        axes[0][col].set_title(f"({'abc'[col] if col < 3 else col}) {analysis.FAMILY_TITLE[family]}", fontsize=10)
        axes[0][col].set_xscale("log")
        axes[0][col].set_yscale("log")
        for row in axes[:, col]:
            row.set_xticks(params, [f"{p:g}" for p in params], fontsize=7, rotation=45 if len(params) > 7 else 0)
            row.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            row.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axes[0][col].set_ylabel(f"{family} at train CE = {level:.3g}")
        axes[0][col].grid(True, which="major", alpha=0.3)
        axes[-1][col].set_xlabel(symbol)
        if rows == 2:
            axes[1][col].axhline(1.0, color="0.5", linewidth=0.8)
            axes[1][col].set_ylabel(f"ratio to {groups[0].label}", fontsize=8)
            axes[1][col].grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- #
# Saving
# --------------------------------------------------------------------------- #
def save_figure(fig, out_dir: str | os.PathLike, stem: str, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 110) -> list[Path]:
    """Writes ``out_dir/stem.<format>`` for each format, closes the figure, returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    plt.close(fig)
    return paths


def plot_all(runs, out_dir: str | os.PathLike, level: float | None = None, split: str = "train",
             x: str = "epoch", quantities: Sequence[str] = ("gcdf@0.5", "gcdf@1", "gcdf@8", "error"),
             formats: Sequence[str] = ("png", "pdf"), loss_shapes: bool = True, dpi: int = 110,
             kinds: Sequence[str] = KINDS) -> list[Path]:
    """Every figure kind for a set of runs, written under ``out_dir``.

    Writes ``fig1_loss_shapes``, ``curves_<family>`` (one per family), and, for the comparison of
    runs, ``vs_train_loss`` and ``at_level`` (at ``level``, default: the lowest training CE that every
    run reaches, :func:`keras_implicit.analysis.common_level`). Quantities of ``quantities`` that the
    runs did not track are skipped. ``kinds`` chooses among :data:`KINDS` (``"loss_shapes"``, ``"curves"``,
    ``"vs_train_loss"``, ``"at_level"``); ``loss_shapes=False`` also leaves fig. 1 out.

    Returns:
        The paths written.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown figure kinds {sorted(unknown)}: choose among {KINDS}")
    groups = _as_groups(runs)
    all_runs = [r for g in groups for r in g.runs]
    paths: list[Path] = []
    if loss_shapes and "loss_shapes" in kinds:
        paths += save_figure(plot_loss_shapes(), out_dir, "fig1_loss_shapes", formats, dpi)
    for family in analysis.FAMILIES if "curves" in kinds else ():
        if all_runs[0].family(family, split)[1]:
            fig = plot_training_curves(groups, family, split=split, x=x)
            paths += save_figure(fig, out_dir, f"curves_{family}_{split}", formats, dpi)
    level = analysis.common_level(all_runs) if level is None else float(level)
    tracked = [q for q in quantities if all(q in run.quantities() for run in all_runs)]
    if tracked and "vs_train_loss" in kinds:
        paths += save_figure(plot_against_train_loss(groups, tracked), out_dir, "vs_train_loss", formats, dpi)
    families = [f for f in analysis.FAMILIES if all_runs[0].family(f)[1]]
    if families and "at_level" in kinds:
        paths += save_figure(plot_family_at_level(groups, level, families), out_dir, "at_level", formats, dpi)
    return paths
