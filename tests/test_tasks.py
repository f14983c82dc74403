import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import config, tasks


def test_linear_tasks_shapes_and_labels():
    t = tasks.sample_linear(jax.random.key(0), 64, dim=5, n_context=7)
    assert t.x.shape == (64, 7, 5) and t.y.shape == (64, 7) and t.xq.shape == (64, 5) and t.yq.shape == (64,)
    # Noiseless labels are linear in the inputs: one least-squares fit per task explains them exactly,
    # and every task has its own weight vector.
    x_all = jnp.concatenate([t.x, t.xq[:, None]], 1)
    y_all = jnp.concatenate([t.y, t.yq[:, None]], 1)
    w = jax.vmap(lambda x, y: jnp.linalg.lstsq(x, y)[0])(x_all, y_all)
    np.testing.assert_allclose(jnp.einsum("bnd,bd->bn", x_all, w), y_all, atol=1e-4)
    assert np.unique(np.round(np.asarray(w), 4), axis=0).shape[0] == 64


def test_uniform_inputs_default_range():
    t = tasks.sample_linear(jax.random.key(1), 1000, dim=10, n_context=10)
    assert float(t.x.min()) >= -0.5 and float(t.x.max()) <= 0.5
    assert float(t.x.min()) < -0.49 and float(t.x.max()) > 0.49


@pytest.mark.parametrize("law", ["uniform", "gaussian", "laplace", "exponential"])
def test_input_law_moments_match_samples(law):
    x = tasks.sample_inputs(jax.random.key(2), (400_000,), law, 0.7)
    var, m4 = tasks.input_law(law, 0.7)
    assert abs(float(x.mean())) < 0.01
    assert float(jnp.mean(x**2)) == pytest.approx(var, rel=0.01)
    assert float(jnp.mean(x**4)) == pytest.approx(m4, rel=0.05)


def test_distractors_replace_exactly_k_labels():
    clean = tasks.sample_linear(jax.random.key(3), 32, dim=3, n_context=9)
    noisy = tasks.sample_linear(jax.random.key(3), 32, dim=3, n_context=9, distractors=2)
    changed = np.asarray(clean.y != noisy.y).sum(axis=1)
    np.testing.assert_array_equal(changed, 2)
    np.testing.assert_array_equal(clean.yq, noisy.yq)


def test_label_noise_has_requested_std():
    clean = tasks.sample_linear(jax.random.key(4), 20_000, dim=3, n_context=5)
    noisy = tasks.sample_linear(jax.random.key(4), 20_000, dim=3, n_context=5, noise_std=0.3)
    assert float(jnp.std(noisy.y - clean.y)) == pytest.approx(0.3, rel=0.02)


def test_sine_tasks():
    t = tasks.sample_sine(jax.random.key(5), 100, n_context=10)
    assert t.x.shape == (100, 10, 1)
    assert float(jnp.abs(t.y).max()) <= 0.5 and float(jnp.abs(t.x).max()) <= 5.0


def test_registry_builds_each_kind_from_its_config():
    assert set(tasks.REGISTRY) == {"linear", "sine", "lds"}
    for overrides, kind in (
        ([], tasks.linear.LinearRegression),
        (["experiment=sine"], tasks.sine.SineRegression),
        (["task=lds"], tasks.lds.LinearDynamics),
    ):
        task = tasks.from_config(config.load_config(overrides).task)
        assert isinstance(task, kind)
        hash(task)  # a static argument of jax.jit


@pytest.mark.parametrize("overrides", [[], ["task.tokens=classic"], ["experiment=sine"], ["task=lds"]])
def test_every_kind_produces_one_batch_structure(overrides):
    """Tokens [B, T, D], queries [B, P, d] written in the tokens at the query slot of the scored
    positions, targets [B, P, O]."""
    task = tasks.from_config(config.load_config(overrides).task)
    layout, batch = task.layout, task.sample(jax.random.key(0), 6)
    p = len(layout.scored)
    assert batch.tokens.shape == (6, layout.length, layout.width)
    assert batch.queries.shape == (6, p, layout.input_dim) and batch.targets.shape == (6, p, layout.output_dim)
    slot = slice(layout.query_slot, layout.query_slot + layout.input_dim)
    np.testing.assert_array_equal(batch.tokens[:, np.asarray(layout.scored), slot], batch.queries)
    moved = jax.vmap(layout.place_queries)(batch.tokens, batch.queries + 1.0)
    np.testing.assert_array_equal(moved[:, np.asarray(layout.scored), slot], batch.queries + 1.0)


def test_regression_tokens_and_layout():
    task = tasks.from_config(config.load_config(["task.dim=3", "task.n_context=4"]).task)
    t = task.draw(jax.random.key(1), 2)
    batch = task.batch(t)
    np.testing.assert_array_equal(batch.tokens[:, :4, :3], t.x)
    np.testing.assert_array_equal(batch.tokens[:, :4, 3], t.y)
    np.testing.assert_array_equal(batch.tokens[:, 4], jnp.concatenate([t.xq, jnp.zeros((2, 1))], -1))
    np.testing.assert_array_equal(batch.targets[:, 0, 0], t.yq)
    layout = task.layout
    assert layout.scored == (4,) and layout.readout == 3 and layout.readout_sign == -1.0
    assert layout.mask == tasks.Mask(causal=False, n_keys=4)
    np.testing.assert_array_equal(layout.mask.visible(5, (4,))[:, 0], [True] * 4 + [False])
