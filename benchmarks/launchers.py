"""The Ray launcher's overhead against local processes: one 4-run sweep of 2-epoch runs on each, side by side.

The same four runs (fc6 on 4,096 Fashion-MNIST images, batch 256, lr 0.1 and 0.05, seeds 0 and 1, two epochs, JAX)
are trained by ``keras_implicit.sweep.run_jobs`` two at a time, once with the local engine (a process per run) and
once with the Ray engine on a local Ray instance of 2 CPUs (a task per run, in a fresh worker process), in
alternating rounds, each round in fresh run directories. Printed: each round's wall time, the minimum per engine,
and their ratio (ray / local). The Ray instance's start is timed apart (it is paid once per sweep).

    python benchmarks/launchers.py              # 2 rounds (~5 minutes on 2 cores)
    python benchmarks/launchers.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keras_implicit import launchers, sweep  # noqa: E402
from keras_implicit.config import RunConfig  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=4096)
    args = parser.parse_args(argv)
    import ray

    configs = sweep.grid(RunConfig(epochs=2, train_subset=args.train_subset), lr=[0.1, 0.05], seed=[0, 1])
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"ray.init (a local instance of 2 CPUs): {time.perf_counter() - started:.1f} s")
    engines = {"local": launchers.LocalLauncher(), "ray": launchers.RayLauncher(backend=os.environ["KERAS_BACKEND"])}
    times = {name: [] for name in engines}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name, launcher in engines.items():
                runs_dir = Path(tmp) / f"{name}-{round_index}"
                jobs = sweep.plan(configs, runs_dir)
                started = time.perf_counter()
                codes = sweep.run_jobs(jobs, 2, runs_dir / "logs", poll=0.1, launcher=launcher,
                                       stream=open(os.devnull, "w"))
                elapsed = time.perf_counter() - started
                if set(codes.values()) != {0}:
                    raise SystemExit(f"{name}: a run failed: {codes}")
                times[name].append(elapsed)
                print(f"round {round_index + 1} {name:5s}: {elapsed:.1f} s for 4 runs of 2 epochs", flush=True)
    engines["ray"].close()
    best = {name: min(values) for name, values in times.items()}
    print(f"minimum: local {best['local']:.1f} s, ray {best['ray']:.1f} s; ray / local = "
          f"{best['ray'] / best['local']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
