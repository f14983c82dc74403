"""Non-isotropic inputs and preconditioned GD (docs/science.md section 10): the sampled law, the
closed forms against Monte-Carlo, the `precond_gd` reference as LSA layers, bad `task.x_cov`
values, and `icl-gd baselines` on such a task."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from typer.testing import CliRunner

from icl_gd import config, models, references, tasks
from icl_gd.cli import app
from icl_gd.references.regression import PrecondStep, precond_gd_closed_form, precond_gd_direct, precond_step
from tests.conftest import SMALL_EVAL

COV = (0.2, 1.0, 3.0)
MC_TASKS = 200_000
# The SPEC's case (Gaussian, w ~ N(0, I), noiseless) and the generalisation: a heavy-tailed law
# (kurtosis 6), another prior scale, label noise and a distractor.
LAWS = {
    "gaussian": {"x_dist": "gaussian"},
    "laplace_noisy": {"x_dist": "laplace", "w_std": 1.5, "noise_std": 0.5, "distractors": 1},
}


def linear_task(dim: int = 3, n_context: int = 5, **law) -> tasks.LinearRegression:
    return tasks.LinearRegression(dim=dim, n_context=n_context, tokens="constructed", **law)


@pytest.fixture(scope="module", params=list(LAWS))
def mc(request):
    """The step moments of a task with a non-diagonal covariance, and `MC_TASKS` of its tasks in
    float64: `(moments, xq, b, yq)` with `b = (1/N) sum_i x_i y_i`."""
    task = linear_task(x_cov=COV, x_rotation=3, **LAWS[request.param])
    t = task.draw(jax.random.key(11), MC_TASKS)
    x, y, xq, yq = (np.asarray(a, np.float64) for a in t)
    return precond_step(task), xq, np.einsum("bnd,bn->bd", x, y) / task.n_context, yq


def mc_loss(gamma, xq, b, yq) -> tuple[float, float]:
    """Monte-Carlo loss of `y_hat = x_q^T Gamma b` and its standard error."""
    half_sq = 0.5 * (np.einsum("bd,de,be->b", xq, gamma, b) - yq) ** 2
    return float(half_sq.mean()), float(half_sq.std() / np.sqrt(len(half_sq)))


def test_sampled_inputs_have_the_rotated_covariance():
    task = linear_task(x_cov=COV, x_rotation=3, x_dist="laplace")
    sigma = task.covariance
    np.testing.assert_allclose(np.linalg.eigvalsh(sigma), COV, rtol=1e-5)
    assert np.abs(sigma - np.diag(np.diag(sigma))).max() > 0.1  # a rotated basis: not diagonal
    x = np.asarray(task.draw(jax.random.key(2), 100_000).x, np.float64).reshape(-1, 3)
    # Entry (j, k) of the sample covariance has standard error sqrt(Var(x_j x_k) / n).
    se = np.sqrt(np.var(x[:, :, None] * x[:, None, :], axis=0) / len(x))
    assert np.all(np.abs(x.T @ x / len(x) - sigma) < 4 * se)
    assert np.allclose(linear_task(x_cov=COV, x_rotation=3).covariance, sigma)  # the seed fixes R
    assert not np.allclose(linear_task(x_cov=COV, x_rotation=4).covariance, sigma)
    np.testing.assert_allclose(linear_task(x_cov=COV).covariance, np.diag(COV), rtol=1e-6)


def test_scaled_multiplies_the_inputs_std():
    rotated = linear_task(x_cov=COV, x_rotation=3)
    np.testing.assert_allclose(rotated.scaled(2.0).covariance, 4 * rotated.covariance, rtol=1e-6)
    isotropic = linear_task(x_dist="uniform", x_scale=0.5)
    np.testing.assert_allclose(isotropic.scaled(0.5).covariance, isotropic.covariance / 4, rtol=1e-12)


def test_closed_form_losses_match_monte_carlo(mc):
    """`Gamma*`, an arbitrary (non-symmetric) `Gamma` and the best scalar `eta* I`, each within
    four standard errors of its Monte-Carlo loss."""
    moments, xq, b, yq = mc
    best, scalar = moments.best(), moments.best_scalar()
    other = best.gamma + 0.3 * np.random.default_rng(0).standard_normal((3, 3))
    for gamma, expected in [
        (best.gamma, best.loss),
        (other, moments.loss(other)),
        (scalar.eta * np.eye(3), scalar.loss),
    ]:
        value, se = mc_loss(gamma, xq, b, yq)
        assert abs(value - expected) < 4 * se, (value, expected, se)
    assert moments.loss(best.gamma) == pytest.approx(best.loss, rel=1e-12)
    assert best.loss < scalar.loss  # a preconditioner beats every learning rate on this Sigma


def test_best_scalar_eta_matches_monte_carlo(mc):
    """`eta* = E[g y_q] / E[g^2]` with `g = x_q^T b`; the sample ratio's standard error by the delta
    method."""
    moments, xq, b, yq = mc
    eta = moments.best_scalar().eta
    g = np.einsum("bd,bd->b", xq, b)
    eta_mc = float(g @ yq / (g @ g))
    se = float(np.std(g * (yq - eta * g)) / np.sqrt(len(g)) / np.mean(g**2))
    assert abs(eta_mc - eta) < 4 * se, (eta_mc, eta, se)


def test_least_squares_preconditioner_recovers_gamma_star(mc):
    """The one-step prediction is linear in `Gamma` (features `f = vec(x_q b^T)`), so `Gamma` can be
    fitted by least squares on tasks. The fit's error `delta` from `Gamma*` has the sandwich
    covariance `Q^-1 V Q^-1 / n` (`Q = E[f f^T]`, `V = E[f f^T e^2]`, `e` the residual of `Gamma*`):
    its Mahalanobis norm is chi-square with 9 degrees of freedom, below 33.7 with probability 0.9999."""
    moments, xq, b, yq = mc
    features = np.einsum("bd,be->bde", xq, b).reshape(len(yq), -1)
    fitted = np.linalg.lstsq(features, yq, rcond=None)[0]
    gamma = moments.best().gamma.reshape(-1)
    residual = features @ gamma - yq
    q = features.T @ features / len(yq)
    v = (features * residual[:, None] ** 2).T @ features / len(yq)
    q_inv = np.linalg.inv(q)
    delta = fitted - gamma
    assert delta @ np.linalg.solve(q_inv @ v @ q_inv / len(yq), delta) < scipy.stats.chi2.ppf(0.9999, 9)
    assert moments.loss(fitted.reshape(3, 3)) >= moments.best().loss


def test_gamma_star_beats_its_perturbations():
    moments = precond_step(linear_task(x_cov=COV, x_rotation=3, x_dist="gaussian"))
    best = moments.best()
    rng = np.random.default_rng(1)
    for scale in (1e-3, 1e-1):
        for _ in range(20):
            assert moments.loss(best.gamma + scale * rng.standard_normal((3, 3))) > best.loss


@pytest.mark.parametrize("x_dist", ["uniform", "gaussian", "laplace", "exponential"])
def test_isotropic_covariance_gives_the_section_6_closed_form(x_dist):
    """`Sigma = sigma^2 I` with the law's kurtosis reproduces `closed_form_gd` (noise, prior scale and
    distractors included); for Gaussian inputs `Gamma* = N / ((N + d + 1) sigma^2) I`."""
    law = {"x_dist": x_dist, "x_scale": 0.7, "w_std": 1.3, "noise_std": 0.3, "distractors": 2}
    task = linear_task(dim=4, n_context=6, **law)
    scalar = precond_step(task).best_scalar()
    expected = references.closed_form_gd(4, 6, x_dist, 0.7, 1.3, 0.3, 2)
    assert scalar.eta == pytest.approx(expected.eta, rel=1e-12)
    assert scalar.loss == pytest.approx(expected.loss, rel=1e-12)
    if x_dist == "gaussian":
        best = precond_gd_closed_form(0.49 * np.eye(4), 6)  # noiseless, s_w = 1
        np.testing.assert_allclose(best.gamma, 6 / (6 + 4 + 1) / 0.49 * np.eye(4), rtol=1e-12)
        assert best.loss == pytest.approx(references.closed_form_gd(4, 6, "gaussian", 0.7).loss, rel=1e-12)


def test_closed_form_is_the_spec_formula():
    sigma = linear_task(x_cov=COV, x_rotation=3).covariance
    n, tr = 5, float(np.trace(sigma))
    best = precond_gd_closed_form(sigma, n)
    np.testing.assert_allclose(best.gamma, np.linalg.inv((1 + 1 / n) * sigma + tr / n * np.eye(3)), rtol=1e-10)
    assert best.loss == pytest.approx(0.5 * (tr - np.trace(sigma @ best.gamma @ sigma)), rel=1e-12)
    m = (1 + 1 / n) * sigma @ sigma + tr / n * sigma
    scalar = PrecondStep.of(sigma, n).best_scalar()
    assert scalar.eta == pytest.approx(np.trace(sigma @ sigma) / np.trace(sigma @ m), rel=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
def test_precond_gd_is_lsa_layers(steps):
    """`K` layers with `W_KQ`'s x-block `Gamma^T` and `W_PV`'s label entry `-1/N` run `K` steps of
    preconditioned GD (`precond_gd_direct`): one LSA layer can compute the reference."""
    task = linear_task(dim=3, n_context=5, x_cov=COV, x_rotation=3, x_dist="gaussian")
    gamma = jnp.asarray(precond_step(task).best().gamma, jnp.float32)
    t = task.draw(jax.random.key(4), 64)
    w_kq = jnp.zeros((4, 4)).at[:3, :3].set(gamma.T)
    w_pv = jnp.zeros((4, 4)).at[3, 3].set(-1 / 5)
    weights = models.lsa(jnp.broadcast_to(w_kq, (steps, 1, 4, 4)), jnp.broadcast_to(w_pv, (steps, 1, 4, 4)))
    stack = models.predict_batch(models.Architecture(task.layout, layers=steps), weights, task.batch(t).tokens)
    gammas = jnp.broadcast_to(gamma, (steps, 3, 3))
    direct = jax.vmap(precond_gd_direct, in_axes=(0, 0, 0, None))(t.x, t.y, t.xq, gammas)
    np.testing.assert_allclose(stack[:, :, 0, 0], direct, rtol=1e-4, atol=1e-5)


def test_precond_gd_is_declared_for_non_isotropic_inputs_only():
    assert "precond_gd" not in linear_task().references
    names = [r.name for r in references.for_task(linear_task(x_cov=COV))]
    assert names[0] == "gd" and "precond_gd" in names


@pytest.mark.parametrize(
    "override",
    ["task.x_cov=[1.0,2.0]", "task.x_cov=[1.0,0.0,2.0]", "task.x_cov=[1.0,-1.0,2.0]", "task.x_rotation=0"],
)
def test_bad_x_cov_fails_in_one_line(override):
    field = override.split("=")[0]
    with pytest.raises(config.ConfigError) as err:
        config.load_config(["task.dim=3", override])
    message = str(err.value)
    assert message.startswith(f"{field}: got") and "allowed:" in message and "\n" not in message


def test_baselines_report_the_preconditioned_closed_form(tmp_path):
    path = tmp_path / "refs.json"
    cov = "task.x_cov=[" + ",".join(map(str, COV)) + "]"
    overrides = [cov, "task.x_rotation=3", "task.x_dist=gaussian", "task.dim=3", "task.n_context=5", *SMALL_EVAL]
    result = CliRunner().invoke(app, ["baselines", *overrides, "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "3x3 matrix" in result.output
    data = json.loads(path.read_text())["references"]
    closed, gd_closed = data["precond_gd_closed_form"], data["gd_closed_form"]
    assert np.asarray(closed["gamma"]).shape == (3, 3)
    assert closed["loss"] < gd_closed["loss"]
    np.testing.assert_allclose(data["precond_gd"]["gamma"], closed["gamma"], rtol=1e-6)
    assert data["precond_gd"]["loss"] < data["gd"]["loss"]
