"""experiments/explicit.py: its plan, and its choice and report on synthetic exported runs with known answers."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_implicit import sweep

ROOT = Path(__file__).resolve().parent.parent
SIGMAS = (0.0625, 0.5, 1.0, 2.0, 8.0)


def _script():
    spec = importlib.util.spec_from_file_location("explicit_script", ROOT / "experiments" / "explicit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


explicit = _script()


def test_dry_run_lists_every_stage_without_tensorflow(tmp_path):
    runs, data, script = str(tmp_path / "runs"), str(tmp_path / "data"), str(ROOT / "experiments" / "explicit.py")
    code = (f"import runpy, sys\nsys.argv = ['explicit.py', 'run', '--dry-run', '--runs-dir', {runs!r}, '--data', "
            f"{data!r}]\ntry:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit as stop:\n"
            "    assert stop.code == 0, stop.code\nprint('TF' if {'tensorflow', 'keras', 'jax'} & set(sys.modules) "
            "else 'noTF')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "[explicit] baselines: 6 runs" in lines and "[explicit] grid: 12 runs" in lines
    assert lines[-1] == "noTF"
    assert any(line.startswith("[explicit] chosen: nothing chosen yet") for line in lines)
    assert "fashion_mnist-fc6-ce-sgd-lr0.1-b16384-v5000-gp0.025-s0: " in result.stdout
    assert "fashion_mnist-fc6-ce+1xgcdf2-sgd-lr0.1-b16384-v5000-s0: " in result.stdout
    assert not (tmp_path / "runs").exists()  # a dry run trains nothing


def test_configs_are_the_pages_settings():
    baselines = explicit.baseline_configs(large_epochs=1000)
    assert [(c.batch_size, c.seed, c.epochs) for c in baselines] == [
        (256, 0, 200), (256, 1, 200), (256, 2, 200), (16384, 0, 1000), (16384, 1, 1000), (16384, 2, 1000)]
    assert all(c.validation_size == 5000 and c.lr == 0.1 and c.ghost_batch_size == 256 for c in baselines)
    grid = explicit.grid_configs()
    assert len(grid) == 12 and all(c.seed == 0 and c.target_train_loss == 0.08 and c.batch_size == 16384
                                   for c in grid)
    chosen = explicit.chosen_configs({"gp": {"profile": 0.025, "validation": 0.25}, "sam": {"profile": 0.05,
                                                                                             "validation": 0.05}})
    assert sorted((c.gradient_penalty, c.sam_radius, c.seed) for c in chosen) == sorted(
        [(0.025, 0.0, s) for s in (0, 1, 2)] + [(0.25, 0.0, s) for s in (0, 1, 2)]
        + [(0.0, 0.05, s) for s in (0, 1, 2)])
    # The chosen stage's seed 0 continues the grid's run: the same directory, to the budget instead of the level.
    assert {sweep.default_run_name(c) for c in chosen if c.seed == 0} <= {sweep.default_run_name(c) for c in grid}
    assert all(c.target_train_loss is None and c.epochs == 200 for c in chosen)


# Synthetic runs: the training CE falls as 2 exp(-epoch / 30) (below 0.08 after about 97 epochs), tracked every
# epoch to 200; the families are a setting's factor times a power of the CE (exact under the geometric
# interpolation); the test and validation errors are constants of the setting plus 0.001 per seed.
def _write(data: Path, config, factor: float, test_error: float, validation_error: float, epochs: int = 200):
    name = sweep.default_run_name(config)
    path = data / name
    path.mkdir(parents=True)
    steps_per_epoch = 55000 // config.batch_size
    flags = {**config.flags(), "sigmas": list(SIGMAS), "temperatures": [1.0], "margins": [1.0]}
    (path / "config.json").write_text(json.dumps(flags))
    (path / "status.json").write_text(json.dumps({"state": "finished", "epoch": epochs,
                                                  "step": epochs * steps_per_epoch}))
    seed_offset = 0.001 * config.seed
    with open(path / "metrics.jsonl", "w") as handle:
        for epoch in range(epochs + 1):
            ce = 2.0 * math.exp(-epoch / 30.0)
            record = {"epoch": float(epoch), "step": epoch * steps_per_epoch, "ce": ce, "error": ce / 4,
                      **{f"gcdf@{s:g}": factor * (1 + s) * ce ** 0.5 for s in SIGMAS}, "tce@1": ce,
                      "hinge@1": factor * ce, "feature_norm": 1.0, "top_kernel_norm": 1.0, "top_bias_norm": 0.1}
            handle.write(json.dumps({**record, "split": "train"}) + "\n")
            handle.write(json.dumps({**record, "split": "test", "error": test_error + seed_offset,
                                     "ce": 2 * test_error + seed_offset}) + "\n")
            handle.write(json.dumps({**record, "split": "validation", "error": validation_error + seed_offset})
                         + "\n")


@pytest.fixture
def exported(tmp_path):
    data = tmp_path / "data"
    for seed in explicit.SEEDS:
        _write(data, explicit.SMALL.__class__(**{**explicit.SMALL.flags(), "seed": seed}), 1.0, 0.110, 0.10)
        _write(data, explicit.baseline_configs(200)[3 + seed], 1.6, 0.120, 0.12)
    # The grid: the penalty's profile comes closest at 0.025 (factor 1.1), its validation error is lowest at 0.25.
    factors = {"gcdf": (1.5, 1.2, 0.9), "trh": (1.6, 1.5, 1.4), "gp": (1.3, 1.1, 0.7), "sam": (1.4, 1.3, 1.2)}
    validation = {"gcdf": (0.12, 0.11, 0.115), "trh": (0.12, 0.12, 0.119), "gp": (0.12, 0.115, 0.105),
                  "sam": (0.118, 0.117, 0.116)}
    test_errors = {"gp": (0.118, 0.118, 0.114)}
    for term, (_, values, _) in explicit.TERMS.items():
        for k, value in enumerate(values):
            _write(data, explicit.term_config(term, value, 0), factors[term][k],
                   test_errors.get(term, (0.118,) * 3)[k], validation[term][k])
    for seed in (1, 2):  # the penalty's two chosen values on the other seeds
        _write(data, explicit.term_config("gp", 0.025, seed), 1.1, 0.118, 0.115)
        _write(data, explicit.term_config("gp", 0.25, seed), 0.7, 0.114, 0.105)
    return data


def test_choose_writes_each_terms_values_by_both_criteria(exported, capsys):
    assert explicit.main(["choose", "--data", str(exported)]) == 0
    choices = json.loads((exported / "choices.json").read_text())
    assert choices["gp"]["profile"] == 0.025 and choices["gp"]["validation"] == 0.25
    assert choices["gcdf"]["profile"] == 3.0 and choices["gcdf"]["validation"] == 1.0  # |log 0.9| < |log 1.2|
    assert choices["trh"]["profile"] == 1.0 and choices["sam"]["validation"] == 0.2
    assert choices["gp"]["distances"]["0.025"] == pytest.approx(math.log(1.1))
    assert choices["gp"]["validation_errors"]["0.25"] == pytest.approx(0.105)
    assert "gp: 0.025 by the Gcdf profile, 0.25 by the validation error (they differ)" in capsys.readouterr().out


def test_report_holds_the_profile_ratios_and_the_gap_closed(exported, tmp_path):
    assert explicit.main(["choose", "--data", str(exported)]) == 0
    out = tmp_path / "figures"
    assert explicit.main(["report", "--data", str(exported), "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert (out / "baselines" / "ladder.md").exists()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    # Gcdf ratios to batch 256 at CE 0.08: the factors (the seeds' families do not differ).
    assert [cell.split(" ± ")[0] for cell in rows["batch 16384"].split(" | ")[1:6]] == ["1.6"] * 5
    assert rows["gradient-norm penalty λ = 0.025"].split(" | ")[1].split(" ± ")[0] == "1.1"
    # The gap in test error: batch 256 at 11.0 %, 16384 at 12.0 %, the penalty at 0.25 at 11.4 %: 0.6 closed.
    row = "| gradient-norm penalty λ = 0.25 (seeds [0, 1, 2]) | train CE 0.08 | test error"
    gap = [line for line in summary.splitlines() if line.startswith(row)]
    assert len(gap) == 1 and gap[0].rstrip(" |").endswith("0.60"), gap
    expected = (0.121 - 0.115) / (0.121 - 0.111)  # seed means: 0.120 + 0.001, 0.114 + 0.001 ... and 0.110 + 0.001
    assert expected == pytest.approx(0.6)
    assert "At step" in summary and "not reached" not in summary
    assert np.isfinite(float(gap[0].split(" | ")[-1].rstrip(" |")))
