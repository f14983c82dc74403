"""`icl-gd compare` on run and sweep directories: what varies, groups of runs at one point, the
statistics across their seeds, and the figures against a parameter (runs written by hand, so that
every number is known)."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from typer.testing import CliRunner

from icl_gd import comparison, config, metrics, runs, sweeps
from icl_gd.cli import app

runner = CliRunner()


def fake_run(path, overrides, loss_per_seed, gd_loss, status="completed"):
    """A run directory as `icl-gd train` writes it, with the given final losses and GD's loss."""
    path.mkdir(parents=True)
    (path / runs.CONFIG_FILE).write_text(config.to_yaml(config.load_config(overrides)))
    seeds = len(loss_per_seed)
    final = {"loss": metrics.mean_ci95(loss_per_seed), "model_cos": metrics.mean_ci95([0.9] * seeds)}
    summary = {"status": status, "experiment": "single_layer", "task": "linear", "seeds": seeds}
    refs = {"gd": {"eta": 0.1, "loss": gd_loss}, "ols": {"loss": 1e-3}, "gd_closed_form": {"eta": 0.1, "loss": 9.0}}
    runs.write_json(path / runs.SUMMARY_FILE, {**summary, "final": final, "references": refs})
    rows = [
        {"step": step, "seed": s, "loss": 2 * loss / (1 + step), "gd_loss": gd_loss, "model_cos": 0.9}
        for step in (0, 10)
        for s, loss in enumerate(loss_per_seed)
    ]
    pd.DataFrame(rows).to_csv(path / runs.METRICS_FILE, index=False)
    return path


def fake_sweep(path, swept, points):
    """A sweep directory: `points` is a list of (overrides, params, loss_per_seed, gd_loss)."""
    index = {"overrides": [], "swept": swept, "points": []}
    for num, (overrides, params, losses, gd_loss) in enumerate(points):
        fake_run(path / str(num), overrides, losses, gd_loss)
        index["points"].append({"num": num, "dir": str(num), "params": params, "overrides": overrides})
    runs.write_json(path / sweeps.SWEEP_FILE, index)
    return path


def test_runs_of_a_point_pool_their_seeds_and_each_point_gets_its_references(tmp_path):
    # A 2 x 2 grid, the point (layers 1, uniform) run twice with different base seeds.
    grid = [
        (1, "uniform", 0, [1.0, 2.0], 0.5),
        (1, "uniform", 1, [3.0, 4.0], 0.5),
        (2, "uniform", 0, [0.5, 0.7], 0.25),
        (1, "gaussian", 0, [1.5, 1.7], 0.6),
        (2, "gaussian", 0, [0.8, 0.6], 0.3),
    ]
    dirs = [
        fake_run(tmp_path / f"r{i}", [f"model.layers={k}", f"task.x_dist={law}", f"train.seed={seed}"], loss, gd)
        for i, (k, law, seed, loss, gd) in enumerate(grid)
    ]
    out = tmp_path / "cmp"
    result = runner.invoke(
        app, ["compare", *map(str, dirs), "--x", "model.layers", "--x", "task.x_dist", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    index = json.loads((out / comparison.COMPARE_FILE).read_text())
    assert index["plotted"] == {"x": ["model.layers", "task.x_dist"], "metrics": ["loss", "model_cos"]}
    assert index["parameters"] == ["model.layers", "task.x_dist"]  # train.seed: replicates of one point
    assert index["values"] == {"model.layers": [1, 2], "task.x_dist": ["uniform", "gaussian"]}
    first = index["groups"][0]
    assert first["point"] == {"model.layers": 1, "task.x_dist": "uniform"} and len(first["runs"]) == 2
    pooled = np.array([1.0, 2.0, 3.0, 4.0])
    half = scipy.stats.t.ppf(0.975, 3) * pooled.std(ddof=1) / 2
    assert first["final"]["loss"]["mean"] == pytest.approx(2.5)
    assert first["final"]["loss"]["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert [g["references"] for g in index["groups"]][:3] == [
        {"gd": 0.5, "ols": 1e-3},
        {"gd": 0.25, "ols": 1e-3},  # a closed-form entry is not a reference line
        {"gd": 0.6, "ols": 1e-3},
    ]
    table = pd.read_csv(out / comparison.GROUPS_TABLE)
    assert list(table["runs"]) == [2, 1, 1, 1] and list(table["seeds"]) == [4, 2, 2, 2]
    assert table["loss_lo"][0] == pytest.approx(2.5 - half) and table["ref_gd_loss"][1] == 0.25
    for x in ("model_layers", "task_x_dist"):  # a numeric and a categorical axis
        assert index["files"]["final_vs_parameter"][x.replace("_", ".", 1)] == [
            f"final_vs_{x}.png",
            f"final_vs_{x}.pdf",
        ]
        assert (out / f"final_vs_{x}.png").is_file() and (out / f"final_vs_{x}.pdf").is_file()
    assert (out / "compare.png").is_file() and "2 completed" in result.output


def test_a_swept_choice_explains_the_fields_it_sets(tmp_path):
    sweep = fake_sweep(
        tmp_path / "sweep",
        {"experiment": ["single_layer", "recurrent"]},
        [
            (["experiment=single_layer"], {"experiment": "single_layer"}, [1.0, 1.1], 0.5),
            (["experiment=recurrent"], {"experiment": "recurrent"}, [0.4, 0.5], 0.2),
        ],
    )
    assert comparison.parameters(comparison.load([sweep]).runs) == ["experiment"]
    alone = comparison.parameters(comparison.load([sweep / "0", sweep / "1"]).runs)  # by diffing the configs
    assert "name" in alone and "model.recurrent" in alone and "experiment" not in alone


def test_compare_refuses_what_it_cannot_use_before_writing(tmp_path):
    run = fake_run(tmp_path / "run", [], [1.0, 2.0], 0.5)
    out = tmp_path / "cmp"
    cases = [
        ([str(run), "--metric", "nope"], "error: --metric: got 'nope'; allowed: loss, model_cos"),
        ([str(run), "--x", "model.layers"], "error: --x: got 'model.layers'; allowed: none"),
        ([str(tmp_path / "nothing")], "is not a run directory"),
    ]
    pending = tmp_path / "pending"
    pending.mkdir()
    runs.write_json(pending / sweeps.SWEEP_FILE, {"swept": {}, "points": [{"dir": "0", "params": {}}]})
    cases.append(([str(pending)], "error: PATHS: nothing to compare yet: 1 point(s), none started"))
    for args, message in cases:
        result = runner.invoke(app, ["compare", *args, "--out", str(out)])
        assert result.exit_code == 2 and message in result.output and not out.exists(), result.output
