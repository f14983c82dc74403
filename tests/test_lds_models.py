"""Sequence models of the follow-up paper (docs/science.md sections 3 and 8): constructions on the
constructed tokens that equal the references exactly, the mesa-layer inside a model, the
full-fledged models' parts, and their config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import attention, config, experiment, models, references, tasks
from icl_gd.config import ConfigError

D, T = 3, 9


def lds(*overrides: str) -> tasks.lds.LinearDynamics:
    return tasks.from_config(
        config.load_config(["task=lds", f"task.state_dim={D}", f"task.length={T}", *overrides]).task
    )


def slot(i: int) -> slice:
    """Coordinates of slot `i` of a constructed token `(0, s_t, s_t, s_{t-1})`."""
    return slice(i * D, (i + 1) * D)


def gd_construction(eta: float) -> models.Weights:
    """One linear-attention layer that is one GD step: keys read `s_{i-1}` (slot 3), queries `s_t`
    (slot 2), values `s_i` (slot 1), written into the readout slot 0 scaled by `eta`."""
    w_kq = jnp.zeros((4 * D, 4 * D)).at[slot(3), slot(2)].set(jnp.eye(D))
    w_pv = jnp.zeros((4 * D, 4 * D)).at[slot(0), slot(1)].set(eta * jnp.eye(D))
    return models.lsa(w_kq[None, None], w_pv[None, None])


def ridge_construction(lam: float) -> models.Weights:
    """One mesa-layer that is online ridge: keys `s_{i-1}`, values `s_i`, queries `s_t`, the
    mesa-layer's `lambda` the inverse of the ridge penalty (docs/science.md section 3)."""
    pick = lambda i: jnp.zeros((D, 4 * D)).at[:, slot(i)].set(jnp.eye(D))[None]
    w_p = jnp.zeros((4 * D, D)).at[slot(0)].set(jnp.eye(D))[None]
    proj = attention.Projections(pick(2), pick(3), pick(1), w_p, jnp.array([1.0 / lam]))
    return models.Weights(models.Layers(jax.tree_util.tree_map(lambda a: a[None], proj)))


def test_linear_attention_gd_construction_is_one_gd_step():
    task, eta = lds(), 0.07
    batch = task.sample(jax.random.key(0), 5)
    preds = models.predict_batch(models.Architecture(task.layout), gd_construction(eta), batch.tokens)[:, -1]
    gd = references.REGISTRY["lds"]["gd"]
    expected = jax.vmap(lambda s: gd.predict(task, references.lds.SolverParams(jnp.array([eta]), 1), s[:-1], s))(
        batch.context
    )[:, -1]
    np.testing.assert_allclose(preds, expected, rtol=1e-5, atol=1e-6)
    # By hand on one sequence: eta sum_{i<t} s_{i+1} s_i^T s_t (0-based t; the pair with s_0 = 0 adds nothing).
    s = np.asarray(batch.context[0], np.float64)
    for t in range(T):
        w = eta * sum((np.outer(s[i + 1], s[i]) for i in range(t)), np.zeros((D, D)))
        np.testing.assert_allclose(preds[0, t], w @ s[t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["scan", "solve"])
def test_mesa_layer_construction_is_online_ridge(impl):
    task, lam = lds(), 0.05
    batch = task.sample(jax.random.key(1), 4)
    arch = models.Architecture(task.layout, attention="mesa", mesa_impl=impl)
    preds = models.predict_batch(arch, ridge_construction(lam), batch.tokens)[:, -1]
    expected = jax.vmap(lambda s: references.lds.ridge_online_predict(task, lam, s[:-1], s))(batch.context)[:, -1]
    np.testing.assert_allclose(preds, expected, rtol=2e-4, atol=2e-5)


RAW = ["task=lds", "task.tokens=raw", f"task.state_dim={D}", f"task.length={T}", "model.embed_dim=8", "model.heads=2"]


def test_mesa_implementations_give_the_same_model_and_gradients():
    task = lds("task.tokens=raw")
    hybrid = [*RAW, "model.layers=2", "model.first_layer=softmax", "model.attention=mesa", "model.key_size=4"]
    scan, solve = (
        models.build(config.load_config([*hybrid, f"model.mesa_impl={impl}"]).model, task.layout, scale=0.5)
        for impl in ("scan", "solve")
    )
    params = scan.init(jax.random.key(2))
    tokens = task.sample(jax.random.key(3), 4).tokens
    np.testing.assert_allclose(scan.predict(params, tokens), solve.predict(params, tokens), rtol=1e-4, atol=1e-5)
    grads = [jax.grad(lambda p, m=m: jnp.sum(m.predict(p, tokens) ** 2))(params) for m in (scan, solve)]
    for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)


def test_full_fledged_model_is_causal_and_its_first_layer_sees_positions():
    """Raw states through an input projection, a softmax first layer whose keys and queries see
    sinusoidal positions (the values do not), softmax layers, an output projection: predictions at
    `t` ignore later states, and the scores depend on the keys' positions."""
    task = lds("task.tokens=raw")
    cfg = config.load_config([*RAW, "model.layers=3", "model.first_layer=softmax", "model.attention=softmax"])
    model = models.build(cfg.model, task.layout, scale=1.0)
    params = model.init(jax.random.key(4))
    states = task.states(jax.random.key(5), 1)[0]
    predict = lambda s: model.predict(params, task.batch(s[None]).tokens)[0, -1]
    later = states.at[5:].add(1.0)
    np.testing.assert_allclose(predict(states)[:5], predict(later)[:5], rtol=1e-5, atol=1e-6)
    assert model.predict(params, task.batch(states[None]).tokens).shape == (1, 3, T, D)
    weights = model.weights(params)
    first = weights.first
    assert first is not None and first.attn.w_kq.shape == (2, 16, 16) and first.attn.w_pv.shape == (2, 8, 8)
    blind = weights._replace(first=first._replace(attn=first.attn._replace(w_kq=first.attn.w_kq.at[:, 8:, :].set(0))))
    embedded = models.embed(model.arch, weights, task.batch(states[None]).tokens[0])
    seen, unseen = (models.first_layer(model.arch, w, embedded) for w in (weights, blind))
    assert float(jnp.abs(seen - unseen).max()) > 1e-3  # the keys' positions enter the scores
    pe = models.sinusoidal(T, 8)
    np.testing.assert_allclose(pe[:, 0], np.sin(np.arange(T)), atol=1e-6)
    np.testing.assert_allclose(pe[:, 1], np.cos(np.arange(T)), atol=1e-6)


def test_key_size_sets_the_factor_shapes():
    cfg = config.load_config(["task=lds", f"task.state_dim={D}", f"task.length={T}", "model.key_size=5"])
    params = models.build(cfg.model, lds().layout).init(jax.random.key(6))
    assert params["w_q"].shape == (1, 1, 5, 4 * D) and params["w_p"].shape == (1, 1, 4 * D, 5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.first_layer=softmax", "model.layers=2"],
            "model.first_layer: got softmax; allowed: null for task=linear",
        ),
        (["task=lds", "model.first_layer=softmax", "model.layers=1"], "model.layers: got 1; allowed: an integer >= 2"),
        (["model.attention=mesa_layer"], "model.attention: got 'mesa_layer'; allowed: linear | softmax | mesa"),
        (["model.mesa_impl=lu"], "model.mesa_impl: got 'lu'; allowed: scan | solve"),
        (["model.mesa_lambda=0"], "model.mesa_lambda: got 0"),
        (["task=lds", "task.tokens=classic"], "task.tokens: got 'classic'; allowed: constructed | raw"),
        (
            ["train.schedule=warmup_cosine", "train.warmup_steps=99999"],
            "train.warmup_steps: got 99999; allowed: an integer in [0, train.steps=5000]",
        ),
    ],
)
def test_bad_sequence_model_configs_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        experiment.check(config.load_config(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)
