"""Training: a single LSA layer reaches the GD loss; seeds are independent; divergence stops."""

import json

import jax
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from icl_gd import experiment, models, runs, tasks, training
from icl_gd.config import load_config
from tests.conftest import SMALL_EVAL


def test_single_layer_reaches_the_gd_loss_and_aligns_with_gd(tmp_path):
    """Figure 2 at the paper's sizes (d = N = 10), shortened: the layer converges by ~500 steps."""
    cfg = load_config(["train.steps=600", "train.eval_every=300", "eval.n_tasks=4000", "eval.line_search_tasks=50000"])
    final = experiment.train(cfg, tmp_path / "run", quiet=True).summary["final"]
    gd_loss = final["gd_loss"]["mean"]
    assert final["loss"]["mean"] == pytest.approx(gd_loss, rel=0.02)
    assert final["model_cos"]["mean"] >= 0.99
    assert final["preds_diff"]["mean"] < 0.05
    assert final["interpolated_loss"]["mean"] == pytest.approx(gd_loss, rel=0.02)


def test_seeds_train_independently_in_one_program(tmp_path):
    """Seed s of a multi-seed run is the run of that seed alone (vmap changes nothing)."""
    base = [
        "task.dim=3",
        "task.n_context=5",
        "train.steps=50",
        "train.eval_every=25",
        "train.batch_size=64",
        *SMALL_EVAL,
    ]
    many = experiment.train(load_config([*base, "train.seeds=3"]), tmp_path / "many", quiet=True)
    one = experiment.train(load_config([*base, "train.seeds=1"]), tmp_path / "one", quiet=True)
    assert many.summary["final"]["loss"]["per_seed"][0] == pytest.approx(
        one.summary["final"]["loss"]["per_seed"][0], rel=1e-5
    )
    per_seed = many.summary["final"]["loss"]["per_seed"]
    assert len(set(per_seed)) == 3  # different init and data keys
    df = pd.read_csv(many.run_dir / runs.METRICS_FILE)
    assert sorted(df.step.unique()) == [0, 25, 50] and sorted(df.seed.unique()) == [0, 1, 2]


def test_divergence_marks_the_run_failed(tmp_path):
    cfg = load_config(
        [
            "task.dim=3",
            "task.n_context=5",
            "train.steps=400",
            "train.eval_every=100",
            "train.lr=1e6",
            "train.clip_norm=1e6",
            "train.batch_size=64",
            *SMALL_EVAL,
        ]
    )
    with pytest.raises(experiment.TrainingDiverged, match="diverged at step"):
        experiment.train(cfg, tmp_path / "bad", quiet=True)
    summary = json.loads((tmp_path / "bad" / runs.SUMMARY_FILE).read_text())
    assert summary["status"] == "failed"
    assert summary["failure"]["reason"].endswith("not finite") and summary["failure"]["step"] >= 1


def test_chunk_losses_decrease_and_keys_fold_in():
    cfg = load_config(["task.dim=3", "task.n_context=5", "train.batch_size=128", "train.lr=1e-2"])
    task = tasks.from_config(cfg.task)
    model = models.build(cfg.model, task.layout, 0.1)
    optimizer = training.make_optimizer(cfg.train)
    init_keys, data_keys = training.seed_keys(0, 2)
    params, opt_state = training.init_states(model, optimizer, init_keys)
    chunk = training.make_train_chunk(model, optimizer, task, 128)
    params, opt_state, losses = chunk(params, opt_state, data_keys, 0, 300)
    assert losses.shape == (2, 300)
    assert float(np.mean(losses[:, -20:])) < 0.8 * float(np.mean(losses[:, :20]))
    assert isinstance(params, nnx.State)
    # Per-step data keys are fold_in(data_key, step): a restart from step k sees the same batches.
    assert not np.array_equal(jax.random.key_data(data_keys[0]), jax.random.key_data(data_keys[1]))
