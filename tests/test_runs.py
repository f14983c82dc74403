"""Run directories: contents, summary schema, checkpoint round trip, no overwriting."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from icl_gd import models, runs
from icl_gd.config import load_config

SUMMARY_METRICS = {
    "loss",
    "gd_loss",
    "preds_diff",
    "model_cos",
    "model_diff",
    "interpolated_loss",
    "gdpp_loss",
    "preds_diff_gdpp",
    "model_cos_gdpp",
    "model_diff_gdpp",
    "ols_loss",
    "preds_diff_ols",
    "model_cos_ols",
    "model_diff_ols",
    "ridge_loss",
    "preds_diff_ridge",
    "model_cos_ridge",
    "model_diff_ridge",
}


def test_run_directory_contents(tiny_run):
    path = tiny_run.run_dir
    for name in ("config.yaml", "metrics.csv", "summary.json", "plots/curves.png", "plots/curves.pdf"):
        assert (path / name).is_file(), name
    assert (path / "checkpoint").is_dir()
    summary = runs.load_summary(path)
    assert summary["status"] == "completed" and summary["experiment"] == "single_layer" and summary["seeds"] == 2
    assert set(summary["final"]) == SUMMARY_METRICS
    for stats in summary["final"].values():
        assert set(stats) == {"mean", "ci95", "per_seed"} and len(stats["per_seed"]) == 2
        assert stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1]
    assert set(summary["references"]) >= {"gd", "gd_closed_form", "gdpp", "ols", "ridge"}
    assert len(summary["per_layer"]) == 1
    assert {"eta", "loss"} <= set(summary["references"]["gd"]) and "lambda" in summary["references"]["ridge"]
    assert summary["wall_time_s"] > 0 and summary["device"] and summary["versions"]["jax"]
    assert runs.load_config(path).task.dim == 4


def test_checkpoint_reloads_the_trained_model(tiny_run):
    loaded = runs.load(tiny_run.run_dir)
    assert jax.tree_util.tree_leaves(loaded.params)[0].shape[0] == 2
    model = loaded.model.module(loaded.seed(1))
    fresh = loaded.model.module(loaded.model.init(jax.random.key(0)))
    tokens = loaded.task.tokenize(jnp.ones((8, 4)), jnp.arange(8.0), jnp.ones(4))
    assert not np.allclose(model(tokens), fresh(tokens))
    # In memory and reloaded, the parameters are the same.
    chex.assert_trees_all_close(nnx.to_pure_dict(loaded.params), nnx.to_pure_dict(tiny_run.params))
    # The reloaded model reproduces the final loss recorded in the summary.
    from icl_gd import experiment

    batch = experiment.evaluation_batch(
        loaded.task, load_config(["task.dim=4", "task.n_context=8", "eval.n_tasks=2000"])
    )
    preds = models.predict_batch(model.arch, model.weights(), batch.tokens)[:, -1]
    loss = float(0.5 * jnp.mean((preds - batch.targets) ** 2))
    assert loss == pytest.approx(runs.load_summary(tiny_run.run_dir)["final"]["loss"]["per_seed"][1], rel=1e-4)


def test_existing_directories_are_never_overwritten(tmp_path, tiny_run):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    cfg = load_config()
    with pytest.raises(runs.RunDirExists, match="already exists"):
        runs.RunDir.create(tmp_path / "taken", cfg)
    with pytest.raises(runs.RunDirExists):
        runs.RunDir.create(tmp_path / "taken", cfg, allow_empty=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_default_run_dirs_are_unique(tmp_path):
    first = runs.default_run_dir("x", tmp_path)
    first.mkdir(parents=True)
    assert runs.default_run_dir("x", tmp_path) != first
