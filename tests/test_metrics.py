import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import metrics, references, tasks


@pytest.fixture(scope="module")
def small():
    return tasks.sample_linear(jax.random.key(0), 300, dim=4, n_context=6)


def test_gd_sensitivity_is_its_weight_vector(small):
    """One GD step predicts W_1 x_q with W_1 = (eta/N) sum y_i x_i^T, so d y_hat / d x_q = W_1."""
    ev = metrics.evaluate(functools.partial(references.gd_direct, etas_K=jnp.array([2.0])), small)
    w1 = 2.0 / 6 * jnp.einsum("bn,bnd->bd", small.y, small.x)
    np.testing.assert_allclose(ev.sens[:, 0], w1, rtol=1e-5, atol=1e-6)


def test_alignment_of_a_model_with_itself_and_with_its_negation(small):
    ev = metrics.evaluate(functools.partial(references.gd_direct, etas_K=jnp.array([2.0, 1.0])), small)
    same = metrics.alignment(ev, ev)
    np.testing.assert_allclose(same["model_cos"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(same["preds_diff"], 0.0)
    np.testing.assert_allclose(same["model_diff"], 0.0)
    flipped = metrics.alignment(ev, metrics.Evaluation(-ev.preds, -ev.sens))
    np.testing.assert_allclose(flipped["model_cos"], -1.0, rtol=1e-6)
    np.testing.assert_allclose(flipped["preds_diff"], 2 * jnp.abs(ev.preds).mean(0), rtol=1e-5)


def test_loss_is_half_mean_squared_error():
    ev = metrics.Evaluation(jnp.array([[1.0], [3.0]]), jnp.zeros((2, 1, 1)))
    np.testing.assert_allclose(metrics.losses(ev, jnp.array([0.0, 1.0])), [0.5 * (1 + 4) / 2])


def test_mean_ci95():
    stats = metrics.mean_ci95([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0 and stats["per_seed"] == [1.0, 2.0, 3.0]
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert stats["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert metrics.mean_ci95([5.0])["ci95"] == [None, None]
