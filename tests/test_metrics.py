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
    ev = metrics.evaluate_tasks(functools.partial(references.gd_direct, etas_K=jnp.array([2.0])), small)
    w1 = 2.0 / 6 * jnp.einsum("bn,bnd->bd", small.y, small.x)
    np.testing.assert_allclose(ev.sens[:, 0, 0, 0], w1, rtol=1e-5, atol=1e-6)


def test_sensitivities_are_the_diagonal_blocks_per_position():
    """A predictor whose output at position p is A_p q_p + sum_{r<p} q_r: its sensitivity at p is A_p
    (the Jacobian block of the query at the same position), not the cross terms."""
    a_PxOxd = jax.random.normal(jax.random.key(0), (3, 2, 4))

    def predict(q_Pxd):
        own = jnp.einsum("pod,pd->po", a_PxOxd, q_Pxd)
        earlier = jnp.cumsum(q_Pxd.sum(-1), 0) - q_Pxd.sum(-1)
        return (own + earlier[:, None])[None]  # [K=1, P, O]

    ev = metrics.evaluate(predict, jax.random.normal(jax.random.key(1), (5, 3, 4)))
    assert ev.preds.shape == (5, 1, 3, 2) and ev.sens.shape == (5, 1, 3, 2, 4)
    np.testing.assert_allclose(ev.sens[:, 0], jnp.broadcast_to(a_PxOxd, (5, 3, 2, 4)), rtol=1e-6)
    assert metrics.evaluate(predict, jnp.ones((5, 3, 4)), sensitivities=False).sens is None


def test_losses_and_preds_diff_by_position_for_vector_outputs():
    preds = jnp.zeros((2, 1, 3, 2))
    targets = jnp.array([[[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]] * 2)
    ev = metrics.Evaluation(preds)
    np.testing.assert_allclose(metrics.losses(ev, targets, by_position=True), [[12.5, 0.5, 0.0]])
    np.testing.assert_allclose(metrics.losses(ev, targets), [13.0 / 3])
    other = metrics.Evaluation(targets[:, None])
    np.testing.assert_allclose(metrics.alignment(ev, other, by_position=True)["preds_diff"], [[5.0, 1.0, 0.0]])
    assert set(metrics.alignment(ev, other)) == {"preds_diff"}  # no sensitivities, no model cos


def test_alignment_of_a_model_with_itself_and_with_its_negation(small):
    ev = metrics.evaluate_tasks(functools.partial(references.gd_direct, etas_K=jnp.array([2.0, 1.0])), small)
    same = metrics.alignment(ev, ev)
    np.testing.assert_allclose(same["model_cos"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(same["preds_diff"], 0.0)
    np.testing.assert_allclose(same["model_diff"], 0.0)
    flipped = metrics.alignment(ev, metrics.Evaluation(-ev.preds, -ev.sens))
    np.testing.assert_allclose(flipped["model_cos"], -1.0, rtol=1e-6)
    np.testing.assert_allclose(flipped["preds_diff"], 2 * jnp.abs(ev.preds[:, :, 0, 0]).mean(0), rtol=1e-5)


def test_loss_is_half_mean_squared_error():
    ev = metrics.Evaluation(jnp.array([[1.0], [3.0]])[:, :, None, None], jnp.zeros((2, 1, 1, 1, 1)))
    np.testing.assert_allclose(metrics.losses(ev, jnp.array([0.0, 1.0])[:, None, None]), [0.5 * (1 + 4) / 2])


def test_mean_ci95():
    stats = metrics.mean_ci95([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0 and stats["per_seed"] == [1.0, 2.0, 3.0]
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert stats["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert metrics.mean_ci95([5.0])["ci95"] == [None, None]
