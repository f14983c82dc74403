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
    many = experiment.train(load_config([*base, "train.seeds=4"]), tmp_path / "many", quiet=True)
    one = experiment.train(load_config([*base, "train.seeds=1"]), tmp_path / "one", quiet=True)
    assert many.summary["final"]["loss"]["per_seed"][0] == pytest.approx(
        one.summary["final"]["loss"]["per_seed"][0], rel=1e-5
    )
    per_seed = many.summary["final"]["loss"]["per_seed"]
    assert len(set(per_seed)) == 4  # different init and data keys
    df = pd.read_csv(many.run_dir / runs.METRICS_FILE)
    assert sorted(df.step.unique()) == [0, 25, 50] and sorted(df.seed.unique()) == [0, 1, 2, 3]


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


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_every_generator_draws_the_task_law_with_independent_streams(impl):
    """What training needs of a generator (`prng`), at 4 standard errors: each step's batch (keys
    `fold_in(data_key, step)`, seeds `fold_in(key(seed), s)`) has the inputs' mean, variance and
    fourth moment, and batches of neighbouring steps and seeds are uncorrelated."""
    cfg = load_config([f"prng={impl}", "task.dim=4", "task.n_context=8"])
    task = tasks.from_config(cfg.task)
    with training.prng(cfg):
        _, data_keys = training.seed_keys(0, 2)
        draw = jax.jit(lambda k: task.draw(k, 4096).x.reshape(-1))
        x = {(s, i): np.asarray(draw(jax.random.fold_in(data_keys[s], i))) for s in range(2) for i in range(3)}
    n = x[0, 0].size
    for values in x.values():  # U(-0.5, 0.5): variance 1/12, fourth moment 1/80
        assert abs(values.mean()) < 4 * np.sqrt(1 / 12 / n)
        assert abs(np.mean(values**2) - 1 / 12) < 4 * np.sqrt((1 / 80 - 1 / 144) / n)
        assert abs(np.mean(values**4) - 1 / 80) < 4 * np.sqrt((1 / 2304 - 1 / 6400) / n)
    for a, b in [((0, 0), (0, 1)), ((0, 1), (0, 2)), ((0, 0), (1, 0)), ((0, 2), (1, 2))]:
        assert abs(np.corrcoef(x[a], x[b])[0, 1]) < 4 / np.sqrt(n)


def test_each_task_kind_draws_with_its_own_generator_unless_told():
    assert training.prng_name(load_config()) == "rbg"
    assert training.prng_name(load_config(["task=lds"])) == "threefry2x32"
    assert training.prng_name(load_config(["task=lds", "prng=unsafe_rbg"])) == "unsafe_rbg"
    with training.prng(load_config(["task=lds"])):
        assert "fry" in str(jax.random.key(0).dtype)
