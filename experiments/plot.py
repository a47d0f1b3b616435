"""The paper's figures from run directories.

    python experiments/plot.py runs/sweep --out figures                  # a folder of runs
    python experiments/plot.py runs/A runs/B runs/C --out figures --level 0.3

Writes PNG and PDF files under --out (see ``keras_implicit.plots.plot_all``):

- ``fig1_loss_shapes``: each family's binary loss against the margin z (fig. 1);
- ``curves_<family>_<split>``: the family tracked during training, one panel per run (figs. 2-5, 8-11, 13-14);
- ``vs_train_loss``: chosen losses and the train error against the training CE, runs overlaid (figs. 6, 15);
- ``at_level``: each family against its parameter at the training CE ``--level`` (figs. 7, 12, 16), with a row of
  ratios to the first group (the largest learning rate, then the smallest batch: ``analysis.group_runs``' order);
- ``sharpness``: Gcdf, the noisy error it bounds and eq. 9 against sigma at ``--level`` (runs trained with
  ``run.py --noisy-error-draws``), and ``--sharpness-levels L1 L2 ...`` draws it at several levels instead
  (``sharpness_hold<K>``).

Runs that differ only by seed are drawn as one line with a ± std band. ``--level`` defaults to the
lowest training CE that every run reaches. Every flag is checked before any file is written: a bad level,
a quantity some run did not track (the error lists what they tracked) or a level some run does not reach is
an error (exit code 1). A kind asked for that cannot be drawn from these runs (``sharpness`` without the noisy
error, ...) gets a ``warning: not drawn: ...`` line and the others are written; if none can be, it is an error.
Only fig. 1 imports TensorFlow (``--no-loss-shapes`` skips it). No display is needed: the library draws on plain
matplotlib Figures and never touches the backend.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keras_implicit import analysis, plots  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding run directories")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the figures to")
    parser.add_argument("--level", type=float, help="training CE of the at-level figure (default: lowest common)")
    parser.add_argument("--split", default="train", choices=["train", "test"], help="split of the curves")
    parser.add_argument("--x", default="epoch", choices=["epoch", "step"], help="x axis of the curves")
    parser.add_argument("--quantities", nargs="+", default=None,
                        help="the panels of the against-train-loss figure (default: "
                             f"{' '.join(plots.DEFAULT_QUANTITIES)}, those that every run tracked)")
    parser.add_argument("--formats", nargs="+", default=["png", "pdf"])
    parser.add_argument("--kinds", nargs="+", default=None, choices=plots.KINDS,
                        help="which figures to write (default: all, sharpness where the runs tracked the noisy error)")
    parser.add_argument("--sharpness-levels", type=float, nargs="+",
                        help="training CEs of the sharpness figure (default: --level)")
    parser.add_argument("--sharpness-hold", type=int, default=0, metavar="K",
                        help="read the sharpness figure's levels at the first crossing after which the training CE "
                             "stays below the level for K more tracking points (default 0: the first crossing)")
    parser.add_argument("--dpi", type=int, default=110)
    parser.add_argument("--no-loss-shapes", action="store_true", help="skip fig. 1 (which needs TensorFlow)")
    parser.add_argument("--strict", action="store_true", help="a truncated metrics.jsonl line is an error")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    failure = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", plots.PlotWarning)
        try:
            runs = analysis.load_runs(args.runs, strict=args.strict)
            paths = plots.plot_all(runs, args.out, level=args.level, split=args.split, x=args.x,
                                   quantities=args.quantities, formats=args.formats,
                                   loss_shapes=not args.no_loss_shapes, dpi=args.dpi, kinds=args.kinds,
                                   sharpness_levels=args.sharpness_levels, sharpness_hold=args.sharpness_hold)
        except (analysis.RunDirectoryError, analysis.GridMismatchError, analysis.LevelNotReachedError,
                ValueError) as error:
            failure = error
    for warning in caught:  # a dropped torn line, a kind that cannot be drawn: one line each
        print(f"warning: {warning.message}", file=sys.stderr)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    for group in analysis.group_runs(runs):
        print(f"{group.label}: {len(group.runs)} run(s), seeds {group.seeds}")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
