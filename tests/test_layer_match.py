"""Per-layer algorithm matching (`icl_gd.layer_match`): models built from an algorithm's steps
match that algorithm at `j` = their layer, the task-optimal fits are what they claim, and the
analysis runs on a trained deep run and refuses the runs it does not apply to."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from icl_gd import analyses, config, experiment, explain, layer_match, models, references, tasks
from icl_gd.config import ConfigError

DIM, N, FIT_TASKS = 4, 8, 1024  # the tiny run's shapes below, so that the compiled GD++ fits are shared
TASK = tasks.linear.LinearRegression(dim=DIM, n_context=N, tokens="constructed")
SCORED = TASK.draw(jax.random.key(0), 512)
EXACT = 1 - 1e-5


def _lsa(layers: int):
    arch = models.Architecture(TASK.layout, layers=layers)
    return lambda weights, x, y, xq: models.regression_readout(arch, weights, TASK, x, y, xq)


def _one_seed(tree):
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def _diagonal(raw: dict, name: str, metric: str, js) -> np.ndarray:
    """`metric` of layer k against `js[k]` steps, per seed: `[S, K]`."""
    values = raw[name][metric]
    return np.stack([values[:, k, j - 1] for k, j in enumerate(js)], 1)


def test_gd_construction_matches_gd_at_its_own_depth():
    """K GD steps as LSA layers (`gd_weights`): layer k is GD after k steps, with the same eta."""
    eta, layers = 3.0, 3
    weights = _one_seed(references.gd_weights(jnp.full((layers,), eta), DIM, N))
    thetas = {"gd": jnp.full((5, 1), eta), "newton_schulz": jnp.full((3, 1), eta)}
    raw = layer_match.match(_lsa(layers), weights, SCORED, thetas)
    assert (layer_match.best_steps(raw["gd"]["r2"]) == [[1, 2, 3]]).all()
    assert (_diagonal(raw, "gd", "r2", [1, 2, 3]) > EXACT).all()
    assert (_diagonal(raw, "gd", "model_cos", [1, 2, 3]) > EXACT).all()
    # Newton-Schulz step 1 is two GD steps with eta = alpha: layer 2, and only layer 2, matches it.
    assert _diagonal(raw, "newton_schulz", "r2", [1, 1, 1])[0, 1] > EXACT
    assert _diagonal(raw, "newton_schulz", "r2", [1, 1, 1])[0, [0, 2]].max() < 0.99


def test_gdpp_construction_matches_gdpp_at_its_own_depth_and_gd_does_not():
    etas, gammas = jnp.array([2.0, 6.0, 12.0]), jnp.array([1.5, 3.0, 0.0])
    weights = _one_seed(references.gdpp_weights(etas, gammas, DIM, N))
    # Row j - 1: the construction's first j steps, zero after (a step with eta = gamma = 0 does nothing).
    rows = jnp.stack(
        [
            jnp.concatenate([jnp.where(jnp.arange(3) < j, etas, 0), gammas.at[j - 1].set(0.0) * (jnp.arange(3) < j)])
            for j in (1, 2, 3)
        ]
    )
    thetas = {"gdpp": rows, "gd": jnp.array([[2.0], [4.0], [6.0]])}
    raw = layer_match.match(_lsa(3), weights, SCORED, thetas)
    assert (layer_match.best_steps(raw["gdpp"]["r2"]) == [[1, 2, 3]]).all()
    assert (_diagonal(raw, "gdpp", "r2", [1, 2, 3]) > EXACT).all()
    assert (_diagonal(raw, "gdpp", "model_cos", [1, 2, 3]) > EXACT).all()
    assert raw["gd"]["r2"][0, 2].max() < 0.99  # the inputs' update (gamma) is beyond plain GD


def test_newton_schulz_readouts_match_newton_schulz_at_j_and_gd_at_two_to_the_j():
    """A model whose layer k is Newton-Schulz step k (a fake model_fn): matched by Newton-Schulz at
    j = k and by GD at j = 2^k with eta = alpha (docs/science.md "Per-layer algorithm matching")."""
    alpha = 2.5
    model_fn = lambda a, x, y, xq: explain.newton_schulz(x, y, xq, a, 3)
    thetas = {"newton_schulz": jnp.full((3, 1), alpha), "gd": jnp.full((8, 1), alpha)}
    raw = layer_match.match(model_fn, jnp.array([alpha]), SCORED, thetas)
    assert (layer_match.best_steps(raw["newton_schulz"]["r2"]) == [[1, 2, 3]]).all()
    assert (_diagonal(raw, "newton_schulz", "r2", [1, 2, 3]) > EXACT).all()
    assert (layer_match.best_steps(raw["gd"]["r2"]) == [[2, 4, 8]]).all()
    assert (_diagonal(raw, "gd", "r2", [2, 4, 8]) > EXACT).all()


@pytest.fixture(scope="module")
def fitted():
    fit_tasks = TASK.draw(jax.random.key(1), FIT_TASKS)
    return fit_tasks, layer_match.fit(fit_tasks, 4, shared=False)


def test_fits_are_task_optimal(fitted):
    fit_tasks, thetas = fitted
    shapes = {name: theta.shape for name, theta in thetas.items()}
    assert shapes == {"gd": (4, 1), "gdpp": (4, 8), "newton_schulz": (3, 1)}
    hi = float(layer_match.eta_range(fit_tasks))
    searched = references.line_search_eta(fit_tasks, 4, hi)  # one program per j: the last one
    np.testing.assert_allclose(thetas["gd"][3, 0], searched.eta, rtol=1e-4)
    # Each algorithm's loss after j steps on the fit set (`match` scores any model against them).
    weights = _one_seed(references.gd_weights(thetas["gd"][:1, 0], DIM, N))
    raw = layer_match.match(_lsa(1), weights, fit_tasks, thetas)
    gd, gdpp, ns = (raw[name]["loss"] for name in ("gd", "gdpp", "newton_schulz"))
    np.testing.assert_allclose(gd[3], searched.loss, rtol=1e-4)
    assert (np.diff(gd) < 0).all()  # each more step, with its own eta, lowers the loss
    # One GD++ step is one GD step; more never end above GD (GD is one of the fit's starts), and the
    # fitted gammas make GD++ clearly better.
    np.testing.assert_allclose(thetas["gdpp"][0], jnp.zeros(8).at[0].set(thetas["gd"][0, 0]))
    assert (gdpp <= gd * (1 + 1e-5)).all() and gdpp[3] < 0.5 * gd[3]
    # Newton-Schulz step j is 2^j GD steps with eta = alpha: both fitted for the task loss, they coincide.
    np.testing.assert_allclose(ns[:2], gd[[1, 3]], rtol=1e-4)
    np.testing.assert_allclose(thetas["newton_schulz"][:2, 0], thetas["gd"][[1, 3], 0], rtol=1e-3)


def test_the_analysis_writes_its_files_on_a_trained_deep_run(tmp_path, monkeypatch):
    monkeypatch.setattr(layer_match, "MIN_STEPS", 4)  # the fits of `fitted`: J = 4 for two layers
    cfg = config.load_config(
        [
            "model.layers=2",
            f"task.dim={DIM}",
            f"task.n_context={N}",
            "train.steps=4",
            "train.eval_every=2",
            "train.batch_size=64",
            "train.seeds=2",
            "train.progress=false",
            "eval.n_tasks=400",
            f"eval.line_search_tasks={FIT_TASKS}",
            "eval.gdpp_steps=0",
        ]
    )
    trained = experiment.train(cfg, tmp_path / "run", quiet=True)
    result = analyses.run("layer_match", trained)
    for file in analyses.REGISTRY["layer_match"].files:
        assert (trained.run_dir / file).stat().st_size > 0, file
    report = json.loads((trained.run_dir / "analyses" / "layer_match" / "layer_match.json").read_text())
    assert report["tasks"] == 400 and report["fit_tasks"] == FIT_TASKS and report["seeds"] == 2
    assert [a["steps"] for a in report["algorithms"].values()] == [4, 4, 3]
    assert [m["layer"] for m in result["layers"]] == [1, 2] and result["finding"].startswith("layer 1: ")
    df = pd.read_csv(trained.run_dir / "analyses" / "layer_match" / "layer_match.csv")
    assert len(df) == 2 * 2 * (4 + 4 + 3)  # seeds x layers x (j of each algorithm)
    # The last layer's readout is the model: its loss is the run's final loss.
    np.testing.assert_allclose(
        report["layers"][-1]["model_loss"]["per_seed"], trained.summary["final"]["loss"]["per_seed"], rtol=1e-4
    )
    best = report["algorithms"]["gd"]["best"][0]
    assert 1 <= best["j"]["mean"] <= 4 and -1.0 <= best["model_cos"]["mean"] <= 1.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [([], "model.layers: got 1"), (["task=lds", "model.layers=2"], "allowed: layer_match only with task=linear")],
)
def test_the_analysis_refuses_single_layer_and_sequence_runs(overrides, field):
    with pytest.raises(ConfigError, match=field):
        analyses.check(config.load_config(overrides), ["layer_match"])
