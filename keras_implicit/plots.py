"""The paper's figures, from run directories (matplotlib).

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
(beyond the paper)     the ratio of two settings against the parameter  :func:`plot_ladder`
                       at a ladder of training-CE levels
(beyond the paper)     Gcdf, the noisy error it bounds (eq. 3) and eq.  :func:`plot_sharpness`
                       9 against sigma at training-CE levels
=====================  ===============================================  =================================

Runs are seed groups (:func:`keras_implicit.analysis.group_runs`): a line is the mean over seeds and
a shaded band spans mean ± one standard deviation (on a log axis the lower edge is mean / (1 + std / mean),
which stays positive where the seeds spread more than their mean). Lines differ by line style and marker as well as
colour, so the figures read in grayscale. Only :func:`plot_loss_shapes` imports TensorFlow (through
:mod:`keras_implicit.losses`, so each formula has one definition); the others need only the run
directories.

The functions return :class:`matplotlib.figure.Figure` objects drawn without pyplot: importing this
module never changes matplotlib's backend (a notebook keeps its own), and the figures are not
registered with pyplot, so they are freed once unreferenced. Show one in a notebook by leaving it as
a cell's value, or save it with :func:`save_figure` or ``fig.savefig``. Every log axis gets readable
ticks (:func:`readable_log_ticks`): at most eight labels that do not overlap, plain decimals
("2.295", "4.5", "0.01") unless a tick lies outside 1e-3 to 1e5, then m×10^k.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.axis
import matplotlib.font_manager
import matplotlib.lines
import matplotlib.ticker
import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.textpath import TextPath

from keras_implicit import analysis

__all__ = [
    "RUN_STYLES",
    "KINDS",
    "plot_loss_shapes",
    "plot_training_curves",
    "plot_against_train_loss",
    "plot_family_at_level",
    "plot_ladder",
    "plot_sharpness",
    "readable_log_ticks",
    "save_figure",
    "plot_all",
    "write_ladder",
    "PlotWarning",
    "DEFAULT_QUANTITIES",
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
KINDS = ("loss_shapes", "curves", "vs_train_loss", "at_level", "sharpness")
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
    colour = matplotlib.colormaps["viridis"](0.9 * k / max(count - 1, 1))  # luminance rises with k
    return colour, _PARAMETER_STYLES[k % len(_PARAMETER_STYLES)], _PARAMETER_MARKERS[k % len(_PARAMETER_MARKERS)]


def _band(ax, x, mean, std, colour, log: bool = False):
    """A ± ``std`` band around ``mean``. On a log axis (``log``) the lower edge is ``mean / (1 + std / mean)``:
    ``mean - std`` to first order, but positive where the seeds spread more than their mean (``mean - std`` would
    fill down to the bottom of the axis there)."""
    if std is None or not np.any(np.isfinite(std)):
        return
    lower = mean - std
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            lower = np.where(mean > 0, mean / (1.0 + std / mean), np.nan)
    ax.fill_between(x, lower, mean + std, color=colour, alpha=0.18, linewidth=0)


def _mean_std(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    mean = np.nanmean(stack, axis=0)
    if stack.shape[0] < 2:
        return mean, None
    return mean, np.nanstd(stack, axis=0, ddof=1)


def _legend_above(fig, ax, **kwargs):
    """The legend of ``ax``'s lines, above every panel of ``fig`` (outside the axes, so it covers no data)."""
    handles, labels = ax.get_legend_handles_labels()
    return fig.legend(handles, labels, loc="outside upper center", ncol=min(len(handles), 3) or 1,
                      fontsize=8, **kwargs)


# --------------------------------------------------------------------------- #
# Readable ticks on log axes
# --------------------------------------------------------------------------- #
_MAX_TICKS = 8
_TARGET_TICKS = 5
# Per-decade tick families, sparse to dense (powers of ten alone, with any stride, come first).
_DECADE_MANTISSAS = ((1, 3), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9))
# Tick values in [low, high) are written as plain decimals, others as m×10^k.
_PLAIN_LOW, _PLAIN_HIGH = 1e-3, 1e5


def _shortest(value: float) -> tuple[float, int]:
    """``value`` rounded to the fewest significant digits that keep it within 1e-9 (relative), and that count."""
    for digits in range(1, 18):
        rounded = float(f"{value:.{digits - 1}e}")
        if math.isclose(rounded, value, rel_tol=1e-9):
            return rounded, digits
    return value, 17


def _decimals(value: float) -> int:
    text = np.format_float_positional(value, trim="-")
    return len(text.split(".")[1]) if "." in text else 0


def _tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels of log-axis ticks: plain decimals when every tick lies between 1e-3 and 1e5 ("0.5",
    "2.295", "300"), else m×10^k mathtext for all of them. Evenly spaced ticks within one decade share
    their number of decimals ("2.290", "2.295", "2.300"), as on a linear axis."""
    rounded = [_shortest(float(t)) if math.isfinite(t) and t != 0 else (float(t), 1) for t in ticks]
    values = [v for v, _ in rounded]
    plain = all(_PLAIN_LOW <= v < _PLAIN_HIGH for v in values if v > 0 and math.isfinite(v))
    decimals = None
    if values and plain and min(values) > 0 and max(values) < 10 * min(values):
        steps = np.diff(values)
        if steps.size < 2 or np.allclose(steps, steps[0], rtol=1e-6):
            decimals = max(_decimals(v) for v in values)
    labels = []
    for value, digits in rounded:
        if not math.isfinite(value) or value <= 0:
            labels.append(f"{value:g}")
        elif plain:
            labels.append(f"{value:.{decimals}f}" if decimals is not None
                          else np.format_float_positional(value, trim="-"))
        else:
            mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
            mantissa = np.format_float_positional(float(mantissa), trim="-")
            power = f"10^{{{int(exponent)}}}"
            body = power if mantissa == "1" else rf"{mantissa}\times{power}"
            labels.append(rf"$\mathdefault{{{body}}}$")
    return labels


@functools.lru_cache(maxsize=4096)
def _label_size(text: str, font: matplotlib.font_manager.FontProperties) -> tuple[float, float]:
    """Width and height, in points, of ``text`` drawn in ``font``."""
    extents = TextPath((0, 0), text, prop=font).get_extents()
    return extents.width, extents.height


class _ReadableLogFormatter(matplotlib.ticker.Formatter):
    """Formats the ticks of :class:`_ReadableLogLocator` with :func:`_tick_labels`."""

    def __init__(self):
        self._labels: dict[float, str] = {}

    def set_locs(self, locs):
        super().set_locs(locs)
        self._labels = dict(zip(locs, _tick_labels(locs)))

    def __call__(self, x, pos=None):
        label = self._labels.get(x)
        return label if label is not None else _tick_labels([x])[0]


class _ReadableLogLocator(matplotlib.ticker.Locator):
    """Major ticks of a log axis whose labels (:func:`_tick_labels`) do not overlap.

    Candidate tick sets, measured against the axis' length and its label font at draw time:
    powers of ten (every decade, every second, ...), then 1-3, 1-2-5 and 1-...-9 per decade; within
    one decade, when those give fewer than five ticks, evenly spaced decimals (steps 1, 2, 5 × 10^k) that give
    more.
    Of the sets whose neighbouring labels keep at least half a font size apart and that have at most
    ``max_ticks`` ticks, the one with the count nearest five wins (the sparser on a tie). With
    ``at``, the candidates are every k-th of those values instead (counted from the one nearest 1),
    the densest that fits.
    """

    def __init__(self, at: Sequence[float] | None = None, max_ticks: int = _MAX_TICKS):
        self.at = None if at is None else np.unique([float(v) for v in at if v > 0 and math.isfinite(v)])
        self.max_ticks = max_ticks

    def __call__(self):
        vmin, vmax = self.axis.get_view_interval()
        return self.tick_values(vmin, vmax)

    def _geometry(self) -> tuple[float, bool, matplotlib.font_manager.FontProperties]:
        """The axis' length in points, whether it runs along x, and its tick labels' font."""
        if self.axis is None:
            return 216.0, True, matplotlib.font_manager.FontProperties(size=matplotlib.rcParams["xtick.labelsize"])
        horizontal = self.axis.axis_name == "x"
        bbox = self.axis.axes.bbox
        length = (bbox.width if horizontal else bbox.height) * 72.0 / self.axis.axes.figure.dpi
        font = self.axis.get_major_ticks(1)[0].label1.get_fontproperties().copy()
        return length, horizontal, font

    def _fits(self, ticks: Sequence[float], log_low: float, log_high: float, geometry) -> bool:
        if len(ticks) < 2:
            return len(ticks) == 1
        length, horizontal, font = geometry
        sizes = np.array([_label_size(label, font)[0 if horizontal else 1] for label in _tick_labels(ticks)])
        positions = (np.log10(ticks) - log_low) / (log_high - log_low) * length
        needed = (sizes[:-1] + sizes[1:]) / 2 + 0.5 * font.get_size_in_points()
        return bool(np.all(np.diff(positions) >= needed))

    def _log_candidates(self, vmin: float, vmax: float) -> list[list[float]]:
        low, high = math.log10(vmin), math.log10(vmax)
        first, last = math.ceil(low - 1e-9), math.floor(high + 1e-9)
        candidates = []
        for stride in range(1, max(last - first, 0) + 2):
            exponents = [k for k in range(first, last + 1) if k % stride == 0]
            if len(exponents) <= self.max_ticks:
                candidates.append([float(f"1e{k}") for k in exponents])
        if high - low <= self.max_ticks:
            for mantissas in _DECADE_MANTISSAS:
                candidates.append([value for k in range(first - 1, last + 1) for m in mantissas
                                   if vmin * (1 - 1e-9) <= (value := float(f"{m}e{k}")) <= vmax * (1 + 1e-9)])
        return candidates

    def _linear_candidates(self, vmin: float, vmax: float) -> list[list[float]]:
        candidates = []
        for exponent in range(math.floor(math.log10(vmax - vmin)) - 1, math.floor(math.log10(vmax)) + 1):
            for mantissa in (1, 2, 5):
                step = float(f"{mantissa}e{exponent}")
                first, last = math.ceil(vmin / step - 1e-9), math.floor(vmax / step + 1e-9)
                if 1 <= last - first + 1 <= self.max_ticks:
                    candidates.append([float(f"{k * step:.12g}") for k in range(first, last + 1)])
        return candidates

    def tick_values(self, vmin, vmax):
        vmin, vmax = sorted((float(vmin), float(vmax)))
        if not (vmin > 0 and math.isfinite(vmax)):
            return np.array([])
        if vmax <= vmin * (1 + 1e-12):
            vmin, vmax = vmin * 0.999, vmax * 1.001
        log_low, log_high = math.log10(vmin), math.log10(vmax)
        geometry = self._geometry()

        def fitting(candidates):
            return [t for t in candidates
                    if 1 <= len(t) <= self.max_ticks and self._fits(t, log_low, log_high, geometry)]

        if self.at is not None:
            grid = self.at[(self.at >= vmin * (1 - 1e-9)) & (self.at <= vmax * (1 + 1e-9))]
            if grid.size == 0:
                return grid
            anchor = int(np.argmin(np.abs(np.log10(grid))))
            for stride in range(1, grid.size + 1):
                ticks = grid[anchor % stride::stride]
                if fitting([ticks]):
                    return ticks
            return grid[anchor:anchor + 1]

        def best(candidates):
            return min(candidates, key=lambda t: (abs(len(t) - _TARGET_TICKS), len(t)), default=None)

        chosen = best(fitting(self._log_candidates(vmin, vmax)))
        if (chosen is None or len(chosen) < _TARGET_TICKS) and vmax < 10 * vmin:
            # Under a decade, evenly spaced decimals where they label more than the round log values do (a ratio
            # axis from 0.9 to 2.2: 1.0, 1.2, ..., 2.2 rather than 0.9, 1, 2).
            linear = best([t for t in fitting(self._linear_candidates(vmin, vmax))
                           if chosen is None or len(t) > len(chosen)])
            if linear is not None:
                chosen = linear
        if chosen is None:  # not even one label fits: the one tick nearest the middle of the axis
            middle = 10 ** ((log_low + log_high) / 2)
            everything = [v for t in self._log_candidates(vmin, vmax) + self._linear_candidates(vmin, vmax) for v in t]
            chosen = [min(everything, key=lambda v: abs(math.log10(v / middle)))] if everything else []
        return np.array(chosen, dtype=np.float64)


def readable_log_ticks(axis: matplotlib.axis.Axis, at: Sequence[float] | None = None,
                       max_ticks: int = _MAX_TICKS) -> None:
    """Readable major ticks for a log-scaled axis, at any range.

    Picks, at each draw, at most ``max_ticks`` labelled ticks whose labels do not overlap at the
    axis' size and font: powers of ten, 1-3 or 1-2-5 per decade over wide ranges, plain evenly spaced
    decimals ("2.290", "2.295", "2.300") over a narrow one. Labels are plain decimals ("0.25", "4.5",
    "300") when every labelled tick lies between 1e-3 and 1e5, else ``m×10^k`` for all of them. Minor
    ticks stay unlabelled. Call it after ``set_xscale("log")`` / ``set_yscale("log")``, which reset the
    ticks.

    Args:
        axis: ``ax.xaxis`` or ``ax.yaxis`` of a log-scaled Axes.
        at: the values that may carry a label (e.g. a parameter grid); each gets a minor tick, and
            every k-th, the densest choice that fits, a labelled one. Default: round numbers.
        max_ticks: the most labelled ticks.

    Example::

        ax.set_xscale("log")
        readable_log_ticks(ax.xaxis)
    """
    axis.set_major_locator(_ReadableLogLocator(at, max_ticks))
    axis.set_major_formatter(_ReadableLogFormatter())
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if at is not None:
        axis.set_minor_locator(matplotlib.ticker.FixedLocator([v for v in at if v > 0]))


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
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
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
    fig = Figure(figsize=(4.6 * len(groups) + 1.4, 3.8), layout="constrained")
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)
    symbol = analysis.FAMILY_PARAMETER[family]
    for ax, group, letter in zip(axes[0], groups, "abcdefghijklmnopqrstuvwxyz"):
        for k, (p, name) in enumerate(zip(grid, names)):
            xs, stack = _aligned(group, name, split, x)
            mean, std = _mean_std(stack)
            colour, style, marker = _parameter_style(k, len(names))
            ax.plot(xs, mean, color=colour, linestyle=style, marker=marker, markevery=max(len(xs) // 8, 1),
                    markersize=4, label=f"{symbol} = {p:g}")
            _band(ax, xs, mean, std, colour, log=yscale == "log")
        seeds = f" ({len(group.runs)} seeds)" if len(group.runs) > 1 else ""
        ax.set_title(f"({letter}) {group.label}{seeds}", fontsize=10)
        ax.set_xlabel(x)
        ax.set_yscale(yscale)
        ax.grid(True, which="major", alpha=0.3)
    if yscale == "log":
        readable_log_ticks(axes[0][0].yaxis)  # after every set_yscale: the panels share the y axis
    axes[0][0].set_ylabel(f"{split} {analysis.FAMILY_TITLE[family]}")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


# --------------------------------------------------------------------------- #
# Figs. 6, 15
# --------------------------------------------------------------------------- #
def _level_grid(runs: Sequence[analysis.Run], count: int) -> np.ndarray:
    """``count`` log-spaced training-CE levels from just below the highest starting CE down to the lowest CE
    that any run reaches (before a NaN: nothing after a divergence counts)."""
    starts, lows = [], []
    for run in runs:
        ce = run.series("ce")[1]
        finite = ce[:int(np.argmax(~np.isfinite(ce))) if not np.all(np.isfinite(ce)) else ce.size]
        finite = finite[finite > 0]
        if finite.size:
            starts.append(float(ce[0]))
            lows.append(float(finite.min()))
    if not starts:
        raise analysis.LevelNotReachedError("no run has a finite training CE > 0")
    high, low = max(starts) * 0.999, min(lows)
    if not high > low:
        raise analysis.LevelNotReachedError(
            f"the runs span no range of training CE: the highest start is {max(starts):.4g}, the lowest CE "
            f"reached {low:.4g}")
    return np.geomspace(high, low, count)


def plot_against_train_loss(runs, quantities: Sequence[str] = ("gcdf@0.5", "gcdf@1", "gcdf@8", "error"),
                            points: int = 60):
    """Figs. 6 and 15: chosen quantities against the training CE, runs overlaid, one panel each.

    Each curve gives the quantity at the first crossing of each training-CE level
    (:func:`keras_implicit.analysis.at_level`) over log-spaced levels from the highest starting CE down to
    the lowest CE that any run reaches; a group is drawn (as the mean of its seeds, with a ± std band) at the
    levels that every one of its seeds reaches, so the runs need not share a level. The CE axis is
    logarithmic and reversed, so training runs left to right. The legend sits above the panels.

    Raises:
        KeyError: a run did not track a quantity (named).
        LevelNotReachedError: the runs span no range of training CE (a single point each).

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
    fig = Figure(figsize=(3.6 * len(quantities), 3.6), layout="constrained")
    axes = fig.subplots(1, len(quantities), squeeze=False)
    for ax, quantity, letter in zip(axes[0], quantities, "abcdefghijklmnopqrstuvwxyz"):
        for g, group in enumerate(groups):
            stack = np.array([analysis.curve_at_levels(run, quantity, levels) for run in group.runs])
            mean = stack.mean(axis=0)  # NaN where some seed does not reach the level: the group's line ends
            std = stack.std(axis=0, ddof=1) if stack.shape[0] > 1 else None
            colour, style, marker = RUN_STYLES[g % len(RUN_STYLES)]
            label = f"{group.label} (n={len(group.runs)})" if len(group.runs) > 1 else group.label
            ax.plot(levels, mean, color=colour, linestyle=style, marker=marker, markevery=(g * 2, 10),
                    markersize=4, label=label)
            _band(ax, levels, mean, std, colour)
        family, parameter = analysis.parse_name(quantity)
        title = ("train error" if quantity == "error" else
                 f"{analysis.FAMILY_TITLE.get(family, family)}, "
                 f"{analysis.FAMILY_PARAMETER.get(family, '')} = {parameter:g}"
                 if parameter is not None else quantity)
        ax.set_title(f"({letter}) {title}", fontsize=10)
        ax.set_xscale("log")
        readable_log_ticks(ax.xaxis)
        ax.invert_xaxis()
        ax.set_xlabel("training cross-entropy")
        ax.set_ylabel(quantity)
        ax.grid(True, which="major", alpha=0.3)
    _legend_above(fig, axes[0][0])
    return fig


# --------------------------------------------------------------------------- #
# Figs. 7, 12, 16
# --------------------------------------------------------------------------- #
def plot_family_at_level(runs, level: float, families: Sequence[str] = analysis.FAMILIES, ratio: bool = True):
    """Figs. 7, 12, 16: each family against its parameter at the training-CE ``level``, runs overlaid.

    Both axes are logarithmic. With ``ratio`` (and two or more groups) a second row shows each
    group's values divided by the first group's: a curve crossing 1 marks a crossover
    (:func:`keras_implicit.analysis.crossovers`). Runs are grouped in the order of
    :func:`keras_implicit.analysis.group_runs` (RunGroups keep the order given), so the reference is the
    largest learning rate / smallest batch: a ratio above 1 at large parameters says that the slower
    setting is higher there. Parameters <= 0 are left out (log axis). The legend sits above the panels.

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
    fig = Figure(figsize=(4.2 * len(families), 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, len(families), squeeze=False, sharex="col")
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
            _band(axes[0][col], params, mean, std if agg.n > 1 else None, colour, log=True)
            if rows == 2:
                axes[1][col].plot(params, mean / reference, color=colour, linestyle=style, marker=marker,
                                  markersize=5, label=label)
                if agg.n > 1:
                    _band(axes[1][col], params, mean / reference, std / reference, colour)
        symbol = analysis.FAMILY_PARAMETER[family]
        axes[0][col].set_title(f"({'abc'[col] if col < 3 else col}) {analysis.FAMILY_TITLE[family]}", fontsize=10)
        axes[0][col].set_xscale("log")
        axes[0][col].set_yscale("log")
        readable_log_ticks(axes[0][col].yaxis)
        readable_log_ticks(axes[-1][col].xaxis, at=params)  # the rows share it: labels on the tracked grid
        axes[0][col].set_ylabel(f"{family} at train CE = {level:.3g}")
        axes[0][col].grid(True, which="major", alpha=0.3)
        axes[-1][col].set_xlabel(symbol)
        if rows == 2:
            axes[1][col].axhline(1.0, color="0.5", linewidth=0.8)
            axes[1][col].set_ylabel(f"ratio to {groups[0].label}", fontsize=8)
            axes[1][col].grid(True, which="major", alpha=0.3)
    _legend_above(fig, axes[0][0])
    return fig


def plot_ladder(ladder: analysis.Ladder, families: Sequence[str] | None = None, limit: float = 100.0):
    """The gap between two settings against the training-CE level (:func:`keras_implicit.analysis.loss_ladder`):
    for each family, the ratio ``a / b`` of the seed means against the parameter, one line per level (darker:
    lower CE), with a band of ± the seed-paired ratios' standard deviation (where that is smaller than the ratio and
    the ratio is on the axis); a line crossing 1 marks a crossover.
    Both axes are logarithmic; parameters <= 0 are left out. The ratio axis shows at most [1 / ``limit``,
    ``limit``] (near convergence a loss that reaches 0 in one setting makes the ratio run off to 1e25 and
    flatten every other line); a clipped axis says so in its label. The legend (one entry per level) sits to
    the right of the panels.

    Returns:
        A Figure with one column per family.
    """
    families = list(families or ladder.families)
    fig = Figure(figsize=(4.2 * len(families), 3.6), layout="constrained")
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    count = len(ladder.levels)
    for col, family in enumerate(families):
        params = ladder.families[family]
        keep = params > 0
        axis = axes[col]
        for row, level in enumerate(ladder.levels):
            shade = 0.75 - 0.75 * (row / max(count - 1, 1))  # from light grey (high CE) to black (low CE)
            colour = (shade, shade, shade) if count > 1 else (0, 0, 0)
            ratio, spread = ladder.ratio[family][row][keep], ladder.ratio_std[family][row][keep]
            style, marker = RUN_STYLES[row % len(RUN_STYLES)][1:]
            axis.plot(params[keep], ratio, color=colour, linestyle=style, marker=marker, markersize=4,
                      label=f"train CE {level:g}")
            # The band where the ratio is on the axis and its spread smaller than itself: near convergence a ratio
            # of 1e20 has a spread of 1e30, whose band would grey out the whole panel.
            shown = (np.isfinite(ratio) & np.isfinite(spread) & (ratio <= limit) & (ratio >= 1 / limit)
                     & (spread < ratio))
            if shown.sum() >= 2:
                axis.fill_between(params[keep], np.where(shown, np.maximum(ratio - spread, 1 / limit), np.nan),
                                  np.where(shown, np.minimum(ratio + spread, limit), np.nan), color=colour, alpha=0.18,
                                  linewidth=0)
        axis.axhline(1.0, color="#d55e00", linewidth=0.9)
        axis.set_xscale("log")
        axis.set_yscale("log")
        ratios = ladder.ratio[family][:, keep]
        shown = ratios[np.isfinite(ratios) & (ratios > 0)]
        low, high = (float(shown.min()), float(shown.max())) if shown.size else (1.0, 1.0)
        clipped = low < 1 / limit or high > limit or shown.size < ratios.size
        axis.set_ylim(max(min(low, 1.0), 1 / limit) / 1.15, min(max(high, 1.0), limit) * 1.15)
        readable_log_ticks(axis.xaxis, at=params[keep])
        readable_log_ticks(axis.yaxis)
        axis.set_xlabel(analysis.FAMILY_PARAMETER[family])
        axis.set_ylabel(f"{family}: {ladder.a} / {ladder.b}" + (f" (axis clipped at ×{limit:g})" if clipped else ""),
                        fontsize=8)
        axis.set_title(f"({'abc'[col] if col < 3 else col}) {analysis.FAMILY_TITLE[family]}", fontsize=10)
        axis.grid(True, which="major", alpha=0.3)
    crossing = "first crossing" if ladder.hold == 0 else f"crossing held {ladder.hold} points"
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title=crossing, title_fontsize=7)
    return fig


# (name prefix, legend label, line style, marker) of the quantities of plot_sharpness.
_SHARPNESS_LINES = (
    ("gcdf", "Gcdf (eq. 6), the bound", "-", "o"),
    ("noisy_error", "noisy error (eq. 3), Monte Carlo ± 2 s.e.", "--", "s"),
    ("eq9", "eq. 9: (CE + σ²/2 Tr H) / log 2", ":", "^"),
    ("noisy_ce", "E[CE under noise] / log 2, Monte Carlo", "-.", None),
)


def _sharpness_grid(runs: Sequence[analysis.Run]) -> tuple[np.ndarray, list[str]]:
    """The σ > 0 of the noisy error and their name suffixes; ValueError naming the run that lacks one of the
    sharpness quantities."""
    for run in runs:
        if not analysis.family_names(run.quantities(), "noisy_error")[1]:
            raise ValueError(f"run {run.name!r} did not track the noisy error: train with --noisy-error-draws "
                             "(or AltLossTracker(noisy_error_draws=...))")
    sigmas, noisy_names = analysis.family_names(runs[0].quantities(), "noisy_error")
    keep = sigmas > 0
    suffixes = [n.partition("@")[2] for n, k in zip(noisy_names, keep) if k]
    for run in runs:
        missing = [f"{prefix}@{s}" for prefix in ("gcdf", "noisy_error", "noisy_error_se", "eq9", "noisy_ce")
                   for s in suffixes if f"{prefix}@{s}" not in run.quantities()]
        if missing:
            raise ValueError(f"run {run.name!r} did not track {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}: every run needs the same σ grid and "
                             "--noisy-error-draws")
    return sigmas[keep], suffixes


def plot_sharpness(runs, levels: Sequence[float], hold: int = 0):
    """Gcdf against what it bounds: for each training-CE level (a column), Gcdf (eq. 6), the Monte Carlo noisy
    error (eq. 3, the rate at which N(0, σ²I) noise on the top layer's weights makes the prediction wrong),
    eq. 9 and the noisy CE / log 2 (the quantity eq. 9 expands), against σ, one colour per setting (seed
    means). The second row is noisy error / Gcdf: how tight the union bound is (1: tight).

    The runs must have tracked the noisy error (``run.py --noisy-error-draws``, or ``AltLossTracker(...,
    noisy_error_draws=...)``). Values are read at each level as :func:`keras_implicit.analysis.at_level`
    with ``hold``; the noisy error's band is ± 2 Monte Carlo standard errors (at least the seeds' spread).
    A noisy error of 0 (no draw changed a prediction) is left off the log axis.

    Raises:
        ValueError: a run did not track the noisy error.
        LevelNotReachedError: a run does not reach a level.

    Returns:
        A Figure with one column per level and two rows.
    """
    groups = _as_groups(runs)
    levels = [float(level) for level in levels]
    if not levels:
        raise ValueError("give at least one training-CE level")
    sigmas, suffixes = _sharpness_grid([run for group in groups for run in group.runs])
    fig = Figure(figsize=(4.6 * len(levels), 6.8), layout="constrained")
    axes = fig.subplots(2, len(levels), squeeze=False, sharex=True, height_ratios=(2.2, 1))
    log2 = math.log(2.0)
    for col, level in enumerate(levels):
        top, bottom = axes[0][col], axes[1][col]
        for g, group in enumerate(groups):
            colour = RUN_STYLES[g % len(RUN_STYLES)][0]
            seeds = analysis.aggregate(group, level, hold)

            def over_sigma(prefix, statistic="mean"):
                return np.array([getattr(seeds, statistic)[f"{prefix}@{s}"] for s in suffixes])

            for prefix, _, style, marker in _SHARPNESS_LINES:
                mean = over_sigma(prefix) / (log2 if prefix == "noisy_ce" else 1.0)
                shown = np.where(mean > 0, mean, np.nan)
                top.plot(sigmas, shown, color=colour, linestyle=style, marker=marker, markersize=4,
                         linewidth=1.0 if prefix == "noisy_ce" else 1.4)
                if prefix == "noisy_error":  # the seeds' spread where it exceeds 2 standard errors (fmax: NaN at n=1)
                    spread = np.fmax(2 * over_sigma("noisy_error_se"), over_sigma(prefix, "std"))
                    _band(top, sigmas, shown, spread, colour, log=True)
            ratio = over_sigma("noisy_error") / over_sigma("gcdf")
            bottom.plot(sigmas, np.where(ratio > 0, ratio, np.nan), color=colour, linestyle="--", marker="s",
                        markersize=4)
        top.set_xscale("log")
        top.set_yscale("log")
        bottom.set_xscale("log")
        bottom.set_yscale("log")
        readable_log_ticks(top.yaxis)
        readable_log_ticks(bottom.yaxis)
        readable_log_ticks(bottom.xaxis, at=sigmas)
        bottom.axhline(1.0, color="0.5", linewidth=0.8)
        top.set_title(f"({'abcdef'[col] if col < 6 else col}) train CE = {level:g}"
                      + (f", crossing held {hold} points" if hold else ""), fontsize=10)
        top.set_ylabel("value at this training CE")
        bottom.set_ylabel("noisy error / Gcdf", fontsize=8)
        bottom.set_xlabel("σ")
        for axis in (top, bottom):
            axis.grid(True, which="major", alpha=0.3)
    quantity_handles = [matplotlib.lines.Line2D([], [], color="0.2", linestyle=style, marker=marker, markersize=4,
                                                label=label) for _, label, style, marker in _SHARPNESS_LINES]
    setting_handles = [matplotlib.lines.Line2D([], [], color=RUN_STYLES[g % len(RUN_STYLES)][0], linewidth=3,
                                               label=f"{group.label} (n={len(group.runs)})")
                       for g, group in enumerate(groups)]
    # One column of panels is narrower than three columns of these labels: one legend column then.
    fig.legend(handles=quantity_handles + setting_handles, loc="outside upper center",
               ncol=1 if len(levels) == 1 else min(3, len(quantity_handles) + len(setting_handles)), fontsize=8)
    return fig


# --------------------------------------------------------------------------- #
# Saving
# --------------------------------------------------------------------------- #
def save_figure(fig, out_dir: str | os.PathLike, stem: str, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 110) -> list[Path]:
    """Writes ``out_dir/stem.<format>`` for each format and returns the paths.

    Any format matplotlib writes works (png, pdf, svg, ...), whatever the session's backend. A figure
    made with pyplot is closed afterwards; this module's figures are not pyplot's and need no closing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    pyplot = sys.modules.get("matplotlib.pyplot")  # loaded only if the caller uses pyplot: never import it here
    if pyplot is not None:
        pyplot.close(fig)
    return paths


class PlotWarning(UserWarning):
    """A figure that :func:`plot_all` was asked for cannot be drawn from these runs (it draws the others)."""


# The quantities of the against-train-loss figure when none are asked for (those that every run tracked).
DEFAULT_QUANTITIES = ("gcdf@0.5", "gcdf@1", "gcdf@8", "error")


def _tracked_text(names: Sequence[str]) -> str:
    """Tracked names, each family's on one entry: ``"ce, error, gcdf@{0.5, 1, 8}, tce@{1, 4}"``."""
    families: dict[str, list[tuple[float, str]]] = {}
    plain = []
    for name in names:
        try:
            family, parameter = analysis.parse_name(name)
        except ValueError:
            family, parameter = name, None
        if parameter is None:
            plain.append(name)
        else:
            families.setdefault(family, []).append((parameter, name.partition("@")[2]))
    parts = plain + [f"{family}@{{{', '.join(text for _, text in sorted(values))}}}"
                     for family, values in families.items()]
    return ", ".join(parts) if parts else "nothing"


def _check_reached(runs: Sequence[analysis.Run], levels: Sequence[float], hold: int = 0) -> None:
    for level in levels:
        for run in runs:
            analysis.at_level(run, level, hold)  # LevelNotReachedError naming the run and its lowest CE


def plot_all(runs, out_dir: str | os.PathLike, level: float | None = None, split: str = "train",
             x: str = "epoch", quantities: Sequence[str] | None = None,
             formats: Sequence[str] = ("png", "pdf"), loss_shapes: bool = True, dpi: int = 110,
             kinds: Sequence[str] | None = None, sharpness_levels: Sequence[float] | None = None,
             sharpness_hold: int = 0) -> list[Path]:
    """Every figure kind for a set of runs, written under ``out_dir``.

    ``kinds`` chooses among :data:`KINDS` (default: all of them, ``sharpness`` only when the runs tracked the
    noisy error):

    - ``"loss_shapes"``: ``fig1_loss_shapes`` (needs TensorFlow; ``loss_shapes=False`` also leaves it out);
    - ``"curves"``: ``curves_<family>_<split>`` for each family the runs tracked, against ``x``;
    - ``"vs_train_loss"``: ``vs_train_loss``, ``quantities`` against the training CE (default:
      :data:`DEFAULT_QUANTITIES`, those of them that every run tracked); it needs no common level;
    - ``"at_level"``: ``at_level``, each family at the training CE ``level``;
    - ``"sharpness"``: Gcdf, the noisy error and eq. 9 (runs trained with ``--noisy-error-draws``) at
      ``sharpness_levels`` with ``sharpness_hold`` (:func:`plot_sharpness`), written as
      ``sharpness_hold<k>``; without ``sharpness_levels``, at ``level``, written as ``sharpness`` (or
      ``sharpness_hold<k>`` with a hold k > 0).

    ``level`` defaults to the lowest training CE that every run reaches
    (:func:`keras_implicit.analysis.common_level`), computed only when a kind needs it.

    Everything is checked before any file is written: the kinds, formats, levels (finite, > 0, and reached by
    every run), ``x``, the hold, and explicitly given ``quantities`` (each must be tracked by every run). A
    kind that was asked for (or, for the sharpness figure, given ``sharpness_levels``) but cannot be drawn from
    these runs (a sharpness figure from runs without the noisy error, curves of a split the runs lack, no
    default quantity tracked, no level that every run reaches when ``level`` is not given) is left out with a
    :class:`PlotWarning` saying why; when none of the kinds can be drawn, that is a ``ValueError`` and nothing is
    written.

    Returns:
        The paths written.

    Raises:
        ValueError: a bad argument, an explicitly given quantity that some run did not track (the message
            lists what they tracked), or nothing to draw.
        LevelNotReachedError: ``level`` or a ``sharpness_levels`` entry is not reached by every run.
        GridMismatchError: the runs tracked different grids.
    """
    default_kinds = kinds is None
    kinds = list(KINDS if default_kinds else dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown figure kinds {sorted(unknown)}: choose among {KINDS}")
    if not kinds:
        raise ValueError(f"no figure kind asked for: choose among {KINDS}")
    formats = list(formats)
    supported = FigureCanvasBase.get_supported_filetypes()
    bad = [f for f in formats if f not in supported]
    if bad or not formats:
        raise ValueError(f"unsupported figure formats {bad}: choose among {sorted(supported)}" if bad
                         else "no figure format given")
    if x not in ("epoch", "step"):
        raise ValueError(f"x must be 'epoch' or 'step', got {x!r}")
    if int(sharpness_hold) != sharpness_hold or sharpness_hold < 0:
        raise ValueError(f"the sharpness hold must be a whole number of tracking points >= 0, got {sharpness_hold!r}")
    sharpness_hold = int(sharpness_hold)
    level = None if level is None else analysis.check_level(level)
    if sharpness_levels is not None:
        sharpness_levels = [analysis.check_level(v, "each sharpness level") for v in sharpness_levels]
        if not sharpness_levels:
            raise ValueError("sharpness_levels is empty: give at least one training CE, or None for the level")
    groups = _as_groups(runs)
    all_runs = [r for g in groups for r in g.runs]

    plan: list[tuple[str, object]] = []  # (file stem, a function drawing the figure)
    cannot: list[str] = []  # why a kind that was asked for is left out
    if "loss_shapes" in kinds and loss_shapes:
        try:  # fig. 1 computes the families; the other figures only read run directories
            from keras_implicit import losses  # noqa: F401
        except ImportError as error:
            cannot.append(f"loss_shapes: fig. 1 computes the families with keras_implicit.losses, which needs Keras "
                          f"and a backend ({error}); pass loss_shapes=False to leave it out")
        else:
            plan.append(("fig1_loss_shapes", plot_loss_shapes))
    if "curves" in kinds:
        lacking = [r.name for r in all_runs if split not in r.splits]
        families = [] if lacking else [f for f in analysis.FAMILIES if all_runs[0].family(f, split)[1]]
        if lacking:
            cannot.append(f"curves: run(s) {', '.join(lacking)} have no {split!r} records")
        elif not families:
            cannot.append(f"curves: the runs tracked no {', '.join(analysis.FAMILIES)} losses on {split!r}")
        else:
            analysis.check_same_grids(all_runs, families, split)
        for family in families:
            plan.append((f"curves_{family}_{split}",
                         functools.partial(plot_training_curves, groups, family, split=split, x=x)))
    common = [q for q in all_runs[0].quantities() if all(q in r.quantities() for r in all_runs[1:])]
    if quantities is not None:  # asked for: each must be tracked, whatever the kinds
        chosen = list(quantities)
        if not chosen:
            raise ValueError("no quantities given for the against-train-loss figure")
        missing = [q for q in chosen if q not in common]
        if missing:
            raise ValueError(f"{'quantity' if len(missing) == 1 else 'quantities'} "
                             f"{', '.join(map(repr, missing))} not tracked by every run: they tracked "
                             f"{_tracked_text(common)}")
    if "vs_train_loss" in kinds:
        if quantities is None:
            chosen = [q for q in DEFAULT_QUANTITIES if q in common]
            if not chosen:
                cannot.append(f"vs_train_loss: none of the default quantities ({', '.join(DEFAULT_QUANTITIES)}) "
                              f"is tracked by every run; ask for some of {_tracked_text(common)}")
        if chosen:
            analysis.check_same_grids(all_runs)
            try:
                _level_grid(all_runs, 2)
            except analysis.LevelNotReachedError as error:
                cannot.append(f"vs_train_loss: {error}")
            else:
                plan.append(("vs_train_loss", functools.partial(plot_against_train_loss, groups, chosen)))
    at_level_families = [f for f in analysis.FAMILIES if all_runs[0].family(f)[1]]
    want_at_level = "at_level" in kinds
    if want_at_level and not at_level_families:
        cannot.append(f"at_level: the runs tracked no {', '.join(analysis.FAMILIES)} losses")
        want_at_level = False
    want_sharpness = "sharpness" in kinds
    if want_sharpness:
        try:
            _sharpness_grid(all_runs)
        except ValueError as error:
            # By default, runs without the noisy error just get no sharpness figure, unless levels were given for it.
            if not default_kinds or sharpness_levels is not None:
                cannot.append(f"sharpness: {error}")
            want_sharpness = False
    if want_at_level:
        analysis.check_same_grids(all_runs, at_level_families)
    needs_level = want_at_level or (want_sharpness and sharpness_levels is None)
    if needs_level and level is None:
        try:
            level = analysis.common_level(all_runs)
        except analysis.LevelNotReachedError as error:
            if want_at_level:
                cannot.append(f"at_level: {error}; give a level")
            if want_sharpness and sharpness_levels is None:
                cannot.append(f"sharpness: {error}; give sharpness levels")
                want_sharpness = False
            want_at_level = False
    elif needs_level:
        _check_reached(all_runs, [level])  # a level asked for: every run must reach it
    if want_sharpness:
        _check_reached(all_runs, sharpness_levels or [level], sharpness_hold)
    if want_at_level:
        plan.append(("at_level", functools.partial(plot_family_at_level, groups, level, at_level_families)))
    if want_sharpness:
        stem = "sharpness" if sharpness_levels is None and sharpness_hold == 0 else f"sharpness_hold{sharpness_hold}"
        plan.append((stem, functools.partial(plot_sharpness, groups, sharpness_levels or [level], sharpness_hold)))

    if not plan:
        why = "; ".join(cannot) if cannot else "loss_shapes=False leaves out the only kind asked for"
        raise ValueError(f"nothing to draw: {why}")
    for message in cannot:
        warnings.warn(f"not drawn: {message}", PlotWarning, stacklevel=2)
    paths: list[Path] = []
    for stem, draw in plan:
        paths += save_figure(draw(), out_dir, stem, formats, dpi)
    return paths


def write_ladder(runs, a: str, b: str, out_dir: str | os.PathLike, levels: Sequence[float] | None = None,
                 holds: Sequence[int] = (0, 2), parameters: Sequence[float] | None = None,
                 formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Two groups of runs compared at a ladder of training-CE levels: for each crossing definition of ``holds``
    (0: the first crossing; k: the first one after which the CE stays below the level for k more tracking points)
    ``ladder_hold<k>`` figures (:func:`plot_ladder`) and one ``ladder.md`` with a Markdown table per family and
    definition (:func:`keras_implicit.analysis.ladder_markdown`), under ``out_dir``.

    Args:
        runs: :class:`keras_implicit.analysis.Run` objects; grouped by :func:`keras_implicit.analysis.group_runs`.
        a, b: the two groups' labels (the ratio's numerator and denominator), as ``group_runs`` labels them.
        levels: training-CE levels (default :data:`keras_implicit.analysis.DEFAULT_LADDER`); those some run does
            not reach are left out and listed in ``ladder.md``.

    Returns:
        The paths written. Every ladder is computed before anything is written.

    Raises:
        RunDirectoryError: ``a`` or ``b`` is not a group of ``runs``; the errors of
            :func:`keras_implicit.analysis.loss_ladder`.
    """
    levels = list(analysis.DEFAULT_LADDER if levels is None else levels)
    groups = {group.label: group for group in analysis.group_runs(runs)}
    missing = [label for label in (a, b) if label not in groups]
    if missing:
        raise analysis.RunDirectoryError(f"no group {', '.join(map(repr, missing))} among the runs: "
                                         f"{', '.join(map(repr, groups))}")
    ladders = [analysis.loss_ladder(groups[a], groups[b], levels, hold=hold) for hold in holds]
    written, sections = [], []
    for hold, ladder in zip(holds, ladders):
        written += save_figure(plot_ladder(ladder), out_dir, f"ladder_hold{hold}", formats)
        definition = "first crossing" if hold == 0 else f"crossing that holds for {hold} more tracking points"
        for family in ladder.families:
            sections.append(f"### {family}: {ladder.a} / {ladder.b}, {definition}\n\n"
                            + analysis.ladder_markdown(ladder, family, parameters))
        if ladder.skipped:
            sections.append("Levels left out: " + "; ".join(f"{level:g} ({problem})"
                                                             for level, problem in ladder.skipped.items()))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ladder.md").write_text("\n\n".join(sections) + "\n")
    return [*written, out_dir / "ladder.md"]
