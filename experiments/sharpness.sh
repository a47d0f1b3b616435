#!/bin/sh
# Gcdf against the noisy error it bounds and eq. 9 (docs/REPRODUCTION.md, "What Gcdf bounds"): the batch
# comparison of experiments/regime.sh (fc6 on a 4096-image Fashion-MNIST subset, lr 0.1, batch 256 against
# batch 1024 in ghost batches of 256, 3 seeds, down to a training CE of 0.04; tracked every 8 steps, not 4),
# trained again with the noisy error, the noisy CE and eq. 9 measured at every tracking point (64 draws per
# example); then the figure at two training-CE levels.
#
#     sh experiments/sharpness.sh                 # RUNS=runs/sharpness FIGURES=docs/figures/sharpness JOBS=1
set -e
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/sharpness}
FIGURES=${FIGURES:-docs/figures/sharpness}
JOBS=${JOBS:-1}
LEVELS=${LEVELS:-0.3 0.08}

python experiments/sweep.py --runs-dir "$RUNS" --lrs 0.1 --batch-sizes 256 1024 --ghost-batch-size 256 \
    --seeds 0 1 2 --jobs "$JOBS" --track-every 8 --train-subset 4096 --target-train-loss 0.04 --epochs 100000 \
    --no-hparams -- --noisy-error-draws 64
# shellcheck disable=SC2086
python experiments/plot.py "$RUNS"/fashion_mnist-* --out "$FIGURES" --kinds sharpness --sharpness-levels $LEVELS \
    --sharpness-hold 2 --formats png pdf
