"""The solver references of linear dynamical systems (docs/science.md section 8): K GD steps,
Richardson, Newton-Schulz and Chebyshev on the per-position normal equations, and their fits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import config, experiment, references, tasks
from icl_gd.references import lds

SMALL = ["task=lds", "task.length=12", "task.state_dim=3", "eval.n_tasks=2000", "eval.line_search_tasks=2000"]
SOLVERS = ("richardson", "newton_schulz", "chebyshev")


def make(*overrides: str) -> tasks.lds.LinearDynamics:
    return tasks.from_config(config.load_config(["task=lds", *overrides]).task)


def predict(task, name: str, theta, steps: int, states_Tp1xD: jax.Array) -> jax.Array:
    """Reference `name` with scalars `theta` on one sequence: `[K, T, D]`."""
    params = lds.SolverParams(jnp.asarray(theta, jnp.float32), steps)
    return references.REGISTRY["lds"][name].predict(task, params, states_Tp1xD[:-1], states_Tp1xD)


@pytest.fixture(scope="module")
def tiny():
    """One short sequence of a 3-d system."""
    task = make("task.length=6", "task.state_dim=3")
    return task, task.states(jax.random.key(0), 1)[0]


def test_k_gd_steps_equal_a_hand_loop(tiny):
    task, states = tiny
    eta, steps = 0.3, 4
    s = np.asarray(states, np.float64)
    expected = np.zeros((steps, 6, 3))
    for t in range(6):  # 0-based position t: pairs (s_i, s_{i+1}) with i < t
        a = sum((np.outer(s[i], s[i]) for i in range(t)), np.zeros((3, 3)))
        b = sum((np.outer(s[i + 1], s[i]) for i in range(t)), np.zeros((3, 3)))
        w = np.zeros((3, 3))
        for k in range(steps):
            w = w - eta * (w @ a - b)
            expected[k, t] = w @ s[t]
    np.testing.assert_allclose(predict(task, "gd", [eta], steps, states), expected, rtol=1e-5, atol=1e-6)


def test_richardson_without_ridge_is_gd(tiny):
    task, states = tiny
    np.testing.assert_array_equal(
        predict(task, "richardson", [0.3, 0.0], 4, states), predict(task, "gd", [0.3], 4, states)
    )


def test_chebyshev_first_step_is_gd_with_eta_one_over_center(tiny):
    task, states = tiny
    chebyshev = predict(task, "chebyshev", [4.0, 3.0], 3, states)
    np.testing.assert_allclose(chebyshev[0], predict(task, "gd", [0.25], 1, states)[0], rtol=1e-6)
    assert not np.allclose(chebyshev[1:], predict(task, "gd", [0.25], 3, states)[1:], rtol=1e-2)
    # With no width, every step is a GD step with eta = 1 / center on the ridge normal equations.
    np.testing.assert_allclose(
        predict(task, "chebyshev", [4.0, 0.0], 3, states),
        predict(task, "richardson", [0.25, task.ridge_lambda], 3, states),
        rtol=1e-5,
    )


def test_solvers_converge_to_online_ridge():
    """With many steps and scalars from a bound on the spectrum, each solver reaches ridge on the
    task's lambda at every position."""
    lam = 0.5
    task = make("task.length=8", "task.state_dim=3", f"task.ridge_lambda={lam}")
    states = task.states(jax.random.key(1), 1)[0]
    ridge = lds.ridge_online_predict(task, lam, states[:-1], states)[0]
    top = float(jnp.max(jnp.trace(lds.normal_equations(states)[0], axis1=1, axis2=2))) + lam  # >= every eigenvalue
    for name, theta, steps in (
        ("richardson", [1 / top, lam], 600),
        ("newton_schulz", [1 / top], 12),
        ("chebyshev", [(top + lam) / 2, (top - lam) / 2], 60),
    ):
        np.testing.assert_allclose(predict(task, name, theta, steps, states)[-1], ridge, rtol=1e-4, atol=1e-5)


def test_spectral_readouts_equal_the_solvers():
    """The fits score a solver through `A_t`'s eigendecomposition; it gives the solver's readouts."""
    task = make("task.length=10", "task.state_dim=3")
    states = task.states(jax.random.key(2), 4)
    spec = lds.spectra(states)
    for name, theta in (
        ("gd", [0.1]),
        ("richardson", [0.1, 0.5]),
        ("newton_schulz", [0.05]),
        ("chebyshev", [6.0, 4.0]),
    ):
        solve = lds.SOLVERS[name].solve(jnp.array(theta), 3, task.ridge_lambda)
        direct = jax.vmap(lambda s: lds.per_position(solve, *lds.normal_equations(s), s[:-1]))(states)
        np.testing.assert_allclose(lds.spectral_readouts(solve, spec), direct, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def fitted_refs():
    """Every reference of a small task, fitted for 3 steps and evaluated on held-out sequences."""
    return experiment.compute_references(config.load_config([*SMALL, "model.layers=3"]))


def test_fitted_solvers_lose_no_more_than_gd_on_held_out_sequences(fitted_refs):
    """Richardson and Chebyshev contain GD (their fits start from it); Newton-Schulz runs 2^K GD steps."""
    final = {ref.name: float(fitted_refs.losses(ref.name)[-1].mean()) for ref in fitted_refs.fitted}
    for name in SOLVERS:
        assert final[name] < final["gd"], (name, final)
    assert final["ridge_online"] < min(final[name] for name in SOLVERS)


def test_gd_eta_is_the_best_for_its_steps(fitted_refs):
    """The fitted eta of 3 GD steps minimises the final loss on the (weighted) sequences it was fitted on."""
    cfg = config.load_config([*SMALL, "model.layers=3"])
    task = fitted_refs.task
    states = task.states(jax.random.fold_in(jax.random.key(int(cfg.eval.seed)), 1), int(cfg.eval.line_search_tasks))
    subsample, weights = lds.stratified_subsample(states, lds.FIT_SEQUENCES)
    eta = float(fitted_refs.params["gd"].theta[0])

    def loss(e):
        preds = jax.vmap(lambda s: predict(task, "gd", [e], 3, s)[-1])(subsample)
        return float(0.5 * jnp.sum(weights * jnp.mean(jnp.sum((preds - subsample[:, 1:]) ** 2, -1), -1)))

    assert loss(eta) < min(loss(0.97 * eta), loss(1.03 * eta))


def test_stratified_subsample_enumerates_the_tail():
    """Half the subsample is the sequences with the largest eigenvalue of A_T (by a bound within a
    factor D^(1/16) above it), at their share 1/N; the weights sum to 1."""
    task = make("task.length=12", "task.state_dim=3")
    states = task.states(jax.random.key(4), 300)
    subsample, weights = lds.stratified_subsample(states, 100)
    bound = np.asarray(jax.vmap(lds.largest_eigenvalue_bound)(states), np.float64)
    exact = np.linalg.eigvalsh(np.asarray(jax.vmap(lambda s: lds.normal_equations(s)[0][-1])(states), np.float64))
    assert np.all(bound >= exact[:, -1] * (1 - 1e-5)) and np.all(bound <= exact[:, -1] * 3 ** (1 / 16))
    chosen = [int(np.flatnonzero((np.asarray(states) == np.asarray(s)).all((1, 2)))[0]) for s in subsample]
    assert sorted(chosen[:50]) == sorted(np.argsort(-bound)[:50].tolist()) and len(set(chosen)) == 100
    np.testing.assert_allclose(weights[:50], 1 / 300, rtol=1e-6)
    np.testing.assert_allclose(weights[50:], 250 / (300 * 50), rtol=1e-6)
    assert float(weights.sum()) == pytest.approx(1.0, rel=1e-6)
    all_states, equal = lds.stratified_subsample(states[:80], 100)
    assert all_states.shape == (80, 13, 3) and np.allclose(equal, 1 / 80)


def test_describe_is_json_ready(fitted_refs):
    described = fitted_refs.as_dict()
    assert json.loads(json.dumps(described)) == described
    assert described["gd"]["steps"] == 3 and set(described["gd"]) == {"eta", "steps", "loss", "loss_by_position"}
    assert {"alpha", "lambda"} <= set(described["richardson"]) and "alpha" in described["newton_schulz"]
    assert {"center", "half_width"} <= set(described["chebyshev"])
    for name in ("gd", *SOLVERS):
        assert references.REGISTRY["lds"][name].stepwise
        assert fitted_refs.losses(name).shape == (3, 12)


def test_fit_recovers_the_scalars_of_a_solver():
    """On the shapes of `fitted_refs`' fits, so that their compiled programs serve."""
    task = make("task.length=12", "task.state_dim=3")
    states = task.states(jax.random.key(3), lds.FIT_SEQUENCES)
    spec = lds.spectra(states)
    for name, theta in (("gd", [0.08]), ("richardson", [0.09, 1.5]), ("chebyshev", [9.0, 6.0])):
        targets = lds.spectral_readouts(lds.SOLVERS[name].solve(jnp.array(theta), 3, task.ridge_lambda), spec)[:, -1]
        starts = lds.SOLVERS[name].starts(jnp.float32(0.1))
        weights = jnp.full((lds.FIT_SEQUENCES,), 1.0 / lds.FIT_SEQUENCES)
        fitted = lds.fit_solver(spec, targets, weights, starts, name=name, steps=3, lam=task.ridge_lambda, iters=30)
        np.testing.assert_allclose(fitted, theta, rtol=1e-3)
