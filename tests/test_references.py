"""The GD / GD++ constructions, the closed forms and the line search (docs/science.md sections 4
and 6), and the registry of references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import config, models, references, tasks

TASK = tasks.linear.LinearRegression(dim=6, n_context=9, tokens="constructed")


def lsa(weights: models.Weights, t: tasks.Tasks, layers: int) -> jax.Array:
    """The LSA stack's readouts after each layer on regression tasks: `[B, K]`."""
    return models.predict_batch(models.Architecture(TASK.layout, layers=layers), weights, TASK.batch(t).tokens)[
        :, :, 0, 0
    ]


def numpy_gd(x, y, xq, etas):
    """GD on L(W) = 1/(2N) sum (W x_i - y_i)^2 from W = 0, written out in numpy."""
    w = np.zeros(x.shape[1])
    preds = []
    for eta in etas:
        w = w - eta * x.T @ (x @ w - y) / x.shape[0]
        preds.append(w @ xq)
    return np.array(preds)


@pytest.fixture(scope="module")
def small_tasks():
    return tasks.sample_linear(jax.random.key(0), 50, dim=6, n_context=9, x_dist="gaussian", x_scale=0.8)


def test_gd_construction_is_the_spec_weights():
    w = references.gd_weights(jnp.array([2.0]), dim=3, n_context=5)
    w_k = w_q = np.diag([1.0, 1, 1, 0])
    w_v = np.diag([0.0, 0, 0, -1])
    w_p = np.diag([0.0, 0, 0, 2.0 / 5])
    np.testing.assert_allclose(w.layers.attn.w_kq[0, 0], w_k.T @ w_q)
    np.testing.assert_allclose(w.layers.attn.w_pv[0, 0], w_p @ w_v)


@pytest.mark.parametrize("etas", [[1.3], [1.3, 0.7, 2.0]])
def test_gd_layers_equal_gd_steps(small_tasks, etas):
    t = small_tasks
    weights = references.gd_weights(jnp.array(etas), 6, 9)
    stack = lsa(weights, t, len(etas))
    expected = np.stack([numpy_gd(*map(np.asarray, (t.x[i], t.y[i], t.xq[i])), etas) for i in range(50)])
    np.testing.assert_allclose(stack, expected, rtol=1e-5, atol=1e-6)
    direct = jax.vmap(references.gd_direct, in_axes=(0, 0, 0, None))(t.x, t.y, t.xq, jnp.array(etas))
    np.testing.assert_allclose(direct, expected, rtol=1e-5, atol=1e-6)


def test_recurrent_gd_layer_equals_k_steps(small_tasks):
    t = small_tasks
    tied = references.gd_weights(jnp.array([0.9]), 6, 9)  # one weight set, applied 4 times
    stack = lsa(tied, t, 4)
    expected = np.stack([numpy_gd(*map(np.asarray, (t.x[i], t.y[i], t.xq[i])), [0.9] * 4) for i in range(50)])
    np.testing.assert_allclose(stack, expected, rtol=1e-5, atol=1e-6)


def test_gdpp_layers_equal_gdpp_direct(small_tasks):
    t = small_tasks
    etas, gammas = jnp.array([1.1, 0.8, 1.5]), jnp.array([0.3, -0.2, 0.5])
    stack = lsa(references.gdpp_weights(etas, gammas, 6, 9), t, 3)
    direct = jax.vmap(references.gdpp_direct, in_axes=(0, 0, 0, None, None))(t.x, t.y, t.xq, etas, gammas)
    np.testing.assert_allclose(stack, direct, rtol=1e-5, atol=1e-6)
    # GD++'s input transformation changes predictions from the second step on.
    plain = jax.vmap(references.gd_direct, in_axes=(0, 0, 0, None))(t.x, t.y, t.xq, etas)
    np.testing.assert_allclose(stack[:, 0], plain[:, 0], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(stack[:, 2] - plain[:, 2]).mean()) > 1e-2


def test_closed_form_defaults():
    ref = references.closed_form_gd(10, 10, "uniform", 0.5)
    assert ref.eta == pytest.approx(6.0606, abs=1e-4)
    assert ref.loss == pytest.approx(0.2062, abs=1e-4)


@pytest.mark.parametrize(
    "dim,n_context,law,scale,w_std,noise",
    [
        (5, 20, "uniform", 1.0, 1.0, 0.0),
        (3, 4, "gaussian", 0.5, 2.0, 0.0),
        (8, 12, "laplace", 0.3, 1.0, 0.2),
        (4, 6, "exponential", 0.6, 1.0, 0.0),
    ],
)
def test_closed_form_matches_monte_carlo(dim, n_context, law, scale, w_std, noise):
    ref = references.closed_form_gd(dim, n_context, law, scale, w_std, noise)
    t = tasks.sample_linear(
        jax.random.key(7),
        400_000,
        dim=dim,
        n_context=n_context,
        x_dist=law,
        x_scale=scale,
        w_std=w_std,
        noise_std=noise,
    )
    mc_loss = float(references.gd_loss(jnp.array([ref.eta]), t))
    assert mc_loss == pytest.approx(ref.loss, rel=0.02)
    # eta* is the minimiser: the line search on the same tasks finds it.
    assert references.line_search_eta(t, 1, 3 * ref.eta).eta == pytest.approx(ref.eta, rel=0.02)


def test_line_search_and_gd_loss_for_the_paper_defaults():
    sample = tasks.linear.LinearRegression(dim=10, n_context=10, tokens="constructed").draw
    search = references.line_search_eta(sample(jax.random.key(11), 100_000), 1, 20.0)
    assert search.eta == pytest.approx(6.0606, rel=0.02)
    eval_loss = float(references.gd_loss(jnp.array([search.eta]), sample(jax.random.key(12), 10_000)))
    assert eval_loss == pytest.approx(0.2062, rel=0.03)


def test_minimize_scalar_finds_quadratic_minimum():
    x, value = references.minimize_scalar(lambda e: (e - 2.345) ** 2, 0.0, 10.0)
    assert float(x) == pytest.approx(2.345, abs=1e-4)
    assert float(value) == pytest.approx(0.0, abs=1e-8)


def test_ridge_and_ols_match_numpy(small_tasks):
    t = small_tasks
    for i in range(5):
        x, y, xq = map(np.asarray, (t.x[i], t.y[i], t.xq[i]))
        ols = np.linalg.lstsq(x, y, rcond=None)[0] @ xq
        ridge = np.linalg.solve(x.T @ x + 0.5 * np.eye(6), x.T @ y) @ xq
        assert float(references.ridge_predict(t.x[i], t.y[i], t.xq[i])[0]) == pytest.approx(ols, rel=1e-4)
        assert float(references.ridge_predict(t.x[i], t.y[i], t.xq[i], 0.5)[0]) == pytest.approx(ridge, rel=1e-4)


def test_ols_is_minimum_norm_with_fewer_points_than_dimensions():
    t = tasks.sample_linear(jax.random.key(5), 5, dim=8, n_context=3)
    for i in range(5):
        x, y, xq = map(np.asarray, (t.x[i], t.y[i], t.xq[i]))
        assert float(references.ridge_predict(t.x[i], t.y[i], t.xq[i])[0]) == pytest.approx(
            np.linalg.pinv(x) @ y @ xq, rel=1e-4, abs=1e-6
        )


def test_ridge_spectrum_serves_every_lambda(small_tasks):
    """One SVD per task gives ridge at any lambda, and its derivative in lambda."""
    x, y, xq = small_tasks.x[0], small_tasks.y[0], small_tasks.xq[0]
    spec = references.ridge_spectrum(x, y)
    for lam in (0.01, 0.3, 4.0):
        direct = np.linalg.solve(np.asarray(x.T @ x) + lam * np.eye(6), np.asarray(x.T @ y)) @ np.asarray(xq)
        assert float(references.ridge_from_spectrum(spec, xq, lam)) == pytest.approx(direct, rel=1e-4)
    slope = jax.grad(lambda lam: references.ridge_from_spectrum(spec, xq, lam))(0.3)
    finite = (
        references.ridge_from_spectrum(spec, xq, 0.3 + 1e-2) - references.ridge_from_spectrum(spec, xq, 0.3 - 1e-2)
    ) / 2e-2
    assert float(slope) == pytest.approx(float(finite), rel=1e-3)


def test_bayes_ridge_lambda():
    assert references.bayes_ridge_lambda(0.5, 2.0) == pytest.approx(0.0625)


def test_gdpp_in_the_eigenbasis_equals_gdpp_on_the_data(small_tasks):
    """`gdpp_spectral` (per eigenvalue of X^T X / N) is `gdpp_direct` (on the tokens' inputs), and
    with gamma = 0 it is GD written out in numpy."""
    t = small_tasks
    etas, gammas = jnp.array([0.7, 2.0, 5.0]), jnp.array([0.4, 1.5, 0.0])
    direct = jax.vmap(references.gdpp_direct, in_axes=(0, 0, 0, None, None))(t.x, t.y, t.xq, etas, gammas)
    spectral = references.gdpp_spectral(references.spectrum(t), etas, gammas)
    np.testing.assert_allclose(spectral, direct, rtol=1e-4, atol=1e-5)
    gd = references.gdpp_spectral(references.spectrum(t), etas, jnp.zeros(3))
    for i in range(4):
        np.testing.assert_allclose(gd[i], numpy_gd(*map(np.asarray, (t.x[i], t.y[i], t.xq[i])), etas), rtol=1e-4)


def test_fit_gdpp_finds_growing_steps_that_one_start_misses():
    """Three per-step GD++ layers: the best scalars grow from step to step, far below GD; from the
    shared eta alone (the only start of an earlier version) the fit stops 11% higher."""
    sample = lambda k, n: tasks.sample_linear(k, n, dim=4, n_context=8)
    eval_tasks = sample(jax.random.key(1), 4000)
    fit_set = references.spectrum(sample(jax.random.key(2), 20_000))
    eta = jnp.float32(references.line_search_eta(fit_set, 3, 30.0).eta)
    fit = functools.partial(references.fit_gdpp, fit_set, eta, eta, steps=3, shared=False, iters=50)

    def loss(theta):
        preds = references.gdpp_spectral(references.spectrum(eval_tasks), *references.gdpp_scalars(theta, 3, False))
        return float(references.loss(preds[:, -1], eval_tasks.yq))

    best, single = fit(), fit(starts=(jnp.zeros((1, 3)), jnp.zeros((1, 3))))
    etas, gammas = references.gdpp_scalars(best, 3, False)
    assert loss(best) < 0.1 * float(references.gd_loss(jnp.full((3,), eta), eval_tasks))
    assert loss(best) < 0.95 * loss(single)  # 0.00087 against 0.00098
    assert etas[0] < etas[1] < etas[2] and gammas.shape == (3,)


def test_each_task_kind_declares_registered_references():
    for kind, declared in (
        ("linear", ("gd", "gdpp", "ols", "ridge")),
        ("lds", ("gd", "ridge_online", "richardson", "newton_schulz", "chebyshev")),
    ):
        task = tasks.from_config(config.load_config([f"task={kind}"]).task)
        assert tuple(r.name for r in references.for_task(task)) == declared == task.references


def test_spd_solve_matches_numpy():
    m = jax.random.normal(jax.random.key(0), (7, 7))
    a, b = m @ m.T + 0.1 * jnp.eye(7), jax.random.normal(jax.random.key(1), (7,))
    np.testing.assert_allclose(
        references.spd_solve(a, b), np.linalg.solve(np.asarray(a, np.float64), np.asarray(b)), rtol=1e-4, atol=1e-5
    )
