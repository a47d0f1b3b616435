"""Two settings compared at a ladder of training-CE levels: the gap of every family against the level.

    python experiments/ladder.py runs/regime --a lr=0.1 --b lr=0.001 --out figures/ladder-lr
    python experiments/ladder.py runs/regime --a batch=256 --b batch=4096 --levels 1 0.5 0.3 0.15 0.08 --holds 0 2

``--a`` / ``--b`` are group labels as this script (and ``experiments/plot.py``) prints them: runs that differ only
by seed form one group. For each crossing definition of ``--holds`` (0: the first crossing of each level;
k: the first crossing after which the training CE stays below the level for k more tracking points) it writes
``ladder_hold<k>.png`` / ``.pdf`` (``keras_implicit.plots.plot_ladder``) and ``ladder.md``, one Markdown table
per family and definition (``keras_implicit.analysis.ladder_markdown``). Everything here is in the library;
this script only parses flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keras_implicit import analysis, plots  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding run directories")
    parser.add_argument("--a", required=True, help="the first setting's group label (the ratio's numerator)")
    parser.add_argument("--b", required=True, help="the second setting's group label")
    parser.add_argument("--levels", nargs="+", type=float, default=list(analysis.DEFAULT_LADDER),
                        help="training-CE levels (those some run does not reach are left out and listed)")
    parser.add_argument("--holds", nargs="+", type=int, default=[0, 2],
                        help="crossing definitions: 0 the first crossing, k one that holds for k more points")
    parser.add_argument("--parameters", nargs="+", type=float, default=None,
                        help="the table's columns (default: every parameter of the grid)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write to")
    parser.add_argument("--formats", nargs="+", default=["png", "pdf"])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        paths = plots.write_ladder(analysis.load_runs(args.runs), args.a, args.b, args.out, args.levels, args.holds,
                                   args.parameters, args.formats)
    except (analysis.RunDirectoryError, analysis.GridMismatchError, analysis.LevelNotReachedError,
            ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
