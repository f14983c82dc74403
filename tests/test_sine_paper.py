"""Sine regression as the paper ran it (docs/science.md section 9): coupled amplitude and phase, the
residual input embedding, the meta-learned "MLP + GD" comparator and the sign-agreement partial cos."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from icl_gd import analyses, config, experiment, metrics, mlpgd, models, references, runs, tasks
from icl_gd.tasks.sine import SineRegression
from tests.test_experiments import tiny_overrides

SMALL = ["model.input_mlp_width=16", "model.input_mlp_features=8"]
_sample = jax.jit(tasks.sample_sine, static_argnames=("n_tasks", "n_context", "noise_std", "coupled"))


def draw(key: jax.Array, coupled: bool = True) -> tasks.Tasks:
    """300 sine tasks of `N = 10` (one compiled sampler for every test)."""
    return _sample(key, n_tasks=300, n_context=10, coupled=coupled)


@functools.cache
def _small() -> tuple[SineRegression, models.Model]:
    """The paper's setup, narrow: 16 hidden units, 8 features."""
    cfg = config.load_config(["experiment=sine_paper", *SMALL])
    task = SineRegression.from_config(cfg.task)
    return task, models.build(cfg.model, task.layout)


def _amplitude_phase(t: tasks.Tasks) -> tuple[np.ndarray, np.ndarray]:
    """Each task's `(a, phi)` recovered from its points: `y = a cos(phi) sin(x) + a sin(phi) cos(x)` is
    linear in `(sin x, cos x)`, so least squares on the context and query gives `a` and `phi` exactly."""
    x = np.concatenate([np.asarray(t.x[..., 0]), np.asarray(t.xq)], 1)
    y = np.concatenate([np.asarray(t.y), np.asarray(t.yq)[:, None]], 1)
    design = np.stack([np.sin(x), np.cos(x)], -1)
    coef = np.stack([np.linalg.lstsq(d, v, rcond=None)[0] for d, v in zip(design, y, strict=True)])
    return np.hypot(coef[:, 0], coef[:, 1]), np.arctan2(coef[:, 1], coef[:, 0])


def test_coupled_amplitude_and_phase_follow_the_papers_law():
    key = jax.random.key(7)
    coupled = draw(key)
    a, phi = _amplitude_phase(coupled)
    np.testing.assert_allclose(a, 0.1 + 0.4 * phi / np.pi, atol=1e-4)
    assert phi.min() < 0.1 and phi.max() > np.pi - 0.1  # the whole range of phases
    independent = draw(key, coupled=False)
    a, phi = _amplitude_phase(independent)
    assert np.abs(a - (0.1 + 0.4 * phi / np.pi)).mean() > 0.05  # a law of two parameters
    assert a.min() >= 0.1 - 1e-4 and a.max() <= 0.5 + 1e-4 and phi.min() >= -1e-4 and phi.max() <= np.pi + 1e-4
    np.testing.assert_array_equal(coupled.x, independent.x)  # only the amplitude and phase change
    assert _small()[0].coupled  # experiment=sine_paper draws the paper's law, experiment=sine the independent one
    assert not SineRegression.from_config(config.load_config(["experiment=sine"]).task).coupled


def test_residual_embedding_is_e_plus_mlp_of_a_bias_free_linear_map():
    task, model = _small()
    weights = model.weights(jax.jit(model.init)(jax.random.key(0)))
    embed, embed_in = weights.embed, weights.embed_in
    assert embed is not None and embed_in is not None
    assert embed_in.shape == (1, 8) and embed.w1.shape == (8, 16) and embed.w2.shape == (16, 8)
    t = draw(jax.random.key(1))
    tokens = jax.jit(models.embed, static_argnums=0)(model.arch, weights, task.tokenize(t.x[0], t.y[0], t.xq[0]))
    e = jnp.concatenate([t.x[0], t.xq[0][None]]) @ embed_in
    by_hand = e + jax.nn.gelu(e @ embed.w1 + embed.b1) @ embed.w2 + embed.b2
    np.testing.assert_allclose(tokens[:, :8], by_hand, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tokens[:-1, 8], t.y[0])  # the labels stay in the last slot, read out there
    assert model.arch.readout(weights) == 8
    # Without its MLP the embedding is linear without bias: phi(0) = 0 and phi(2 x) = 2 phi(x).
    no_mlp = embed._replace(w2=jnp.zeros_like(embed.w2), b2=jnp.zeros_like(embed.b2))
    phi = models.input_features(no_mlp, embed_in, jnp.array([[0.0], [1.3], [2.6]]))
    np.testing.assert_allclose(phi[0], 0.0)
    np.testing.assert_allclose(phi[2], 2 * phi[1], rtol=1e-6)
    # The default form has no linear map (and draws the parameters it drew before).
    sine = config.load_config(["experiment=sine"])
    plain = models.build(sine.model, task.layout)
    assert plain.weights(jax.jit(plain.init)(jax.random.key(0))).embed_in is None


def _comparator() -> mlpgd.Comparator:
    return jax.jit(mlpgd.init, static_argnums=0)(_small()[1], jax.random.key(2))


def test_sign_agreement_is_one_for_identical_models_and_zero_for_opposite_ones():
    c = _comparator()
    t = draw(jax.random.key(3))
    evaluate = jax.jit(metrics.evaluate_tasks, static_argnums=0)
    one = evaluate(functools.partial(mlpgd.predict, c, 0.1), t)
    flipped = evaluate(lambda x, y, xq: -mlpgd.predict(c, 0.1, x, y, xq), t)
    other = evaluate(lambda x, y, xq: jnp.sin(3 * xq), t)
    assert float(metrics.sign_agreement(one, one)[0]) == 1.0
    assert float(metrics.sign_agreement(one, flipped)[0]) == 0.0
    share = float(metrics.sign_agreement(one, other)[0])
    assert 0.0 < share < 1.0
    # In 1-d the cosine of the sensitivities is their sign product: 2 * agreement - 1.
    assert float(metrics.alignment(one, other)["model_cos"][0]) == pytest.approx(2 * share - 1, abs=1e-5)


def test_comparator_is_one_gd_step_on_its_features_and_learns():
    task, c = _small()[0], _comparator()
    t = draw(jax.random.key(4))
    # One GD step from W = 0: y_hat = eta (1/N) sum_i y_i phi(x_i)^T phi(x_q) (docs/science.md section 4).
    phi = models.input_features(c.embed, c.embed_in, t.x[0])
    phi_q = models.input_features(c.embed, c.embed_in, t.xq[0][None])[0]
    closed = 0.1 * jnp.mean(t.y[0] * (phi @ phi_q))
    assert float(mlpgd.predict(c, 0.1, t.x[0], t.y[0], t.xq[0])[0]) == pytest.approx(float(closed), rel=1e-5)
    trained, values = mlpgd.train(c, task.draw, jax.random.key(5), steps=300, batch=64, lr=1e-2, eta=0.1)
    assert values.shape == (300,)
    zero = 0.5 * float(jnp.mean(t.yq**2))
    assert float(jax.jit(mlpgd.loss)(trained, 0.1, t)) < 0.9 * zero
    assert float(values[-50:].mean()) < float(values[:50].mean())


def test_the_gd_construction_behind_the_comparators_embedding_matches_it():
    """A model that is the comparator (its embedding, then the GD construction with its eta) has the
    comparator's loss, no preds diff, and cosine and sign agreement 1 against it."""
    task, c = _small()[0], _comparator()
    c = jax.tree_util.tree_map(lambda w: 10 * w, c)  # sensitivities well above rounding (the init is tiny)
    t = draw(jax.random.key(6))
    arch = models.Architecture(task.layout, input_mlp=True)
    weights = references.gd_weights(jnp.array([0.1]), 8, task.n_context)._replace(embed=c.embed, embed_in=c.embed_in)
    out = jax.jit(analyses.paper_mlp_gd, static_argnums=(0, 1))(arch, task, weights, c, 0.1, t)
    assert float(out["mlpgd_preds_diff"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["mlpgd_model_cos"]) == pytest.approx(1.0, abs=1e-6)
    assert float(out["mlpgd_sign_agreement"]) == 1.0
    assert float(out["mlpgd_loss"]) == pytest.approx(float(jax.jit(mlpgd.loss)(c, 0.1, t)), rel=1e-5)


@pytest.fixture(scope="module")
def sine_paper_run(tmp_path_factory):
    """The named experiment at the sizes tests/test_experiments.py runs it (compiled programs shared)."""
    cfg = config.load_config(["experiment=sine_paper", *tiny_overrides("sine_paper")])
    trained = experiment.train(cfg, tmp_path_factory.mktemp("sine_paper") / "run", quiet=True)
    analyses.run_all(trained)
    return trained


def test_sine_analysis_reports_both_comparators_and_both_metrics(sine_paper_run):
    summary = runs.load_summary(sine_paper_run.run_dir)
    result = summary["analyses"]["sine"]
    for name in ("partial_cos", "mlpgd_model_cos"):
        assert all(-1.0 <= c <= 1.0 for c in result[name]["per_seed"])
    for name in ("sign_agreement", "mlpgd_sign_agreement"):
        assert all(0.0 <= c <= 1.0 for c in result[name]["per_seed"])
    for name in ("mlp_gd_loss", "mlpgd_loss", "mlpgd_preds_diff"):
        assert np.all(np.isfinite(result[name]["per_seed"]))
    assert result["mlpgd"]["steps"] == 5 and result["mlpgd"]["eta"] == 0.1
    np.testing.assert_allclose(result["loss"]["per_seed"], summary["final"]["loss"]["per_seed"], rtol=1e-5)
    rows = pd.read_csv(sine_paper_run.run_dir / "analyses" / "sine" / "sine.csv")
    assert {"partial_cos", "sign_agreement", "mlpgd_model_cos", "mlpgd_sign_agreement"} <= set(rows.columns)
    for suffix in ("csv", "json", "png", "pdf"):
        assert (sine_paper_run.run_dir / "analyses" / "sine" / f"sine.{suffix}").stat().st_size > 0
