"""The transformer: the products form equals the layer of docs/science.md section 3 written with
factors; one forward pass over token sequences, with masks, under a scan over layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from icl_gd import attention, models, tasks
from icl_gd.config import load_config

TASK = tasks.linear.LinearRegression(dim=3, n_context=5, tokens="constructed")


def spec_layer(e, n_context, w_q, w_k, w_v, w_p):
    """docs/science.md section 3, literally: e_j <- e_j + W_P sum_{i<=N} (W_V e_i)(W_K e_i)^T (W_Q e_j), every j."""
    out = np.array(e, dtype=np.float64)
    for j in range(e.shape[0]):
        acc = np.zeros(e.shape[1])
        for i in range(n_context):
            acc += (w_v @ e[i]) * ((w_k @ e[i]) @ (w_q @ e[j]))
        out[j] = e[j] + w_p @ acc
    return out


def make(overrides, task=TASK, scale=0.5, seed=0) -> models.Transformer:
    model = models.build(load_config(overrides).model, task.layout, scale)
    return model.module(model.init(jax.random.key(seed)))


def readout(model, x, y, xq):
    return model(TASK.tokenize(x, y, xq))[:, 0, 0]


@pytest.mark.parametrize("layers,recurrent", [(1, False), (3, False), (3, True)])
def test_forward_equals_spec_layers(layers, recurrent):
    model = make([f"model.layers={layers}", f"model.recurrent={str(recurrent).lower()}"])
    rng = np.random.default_rng(0)
    x, y, xq = rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=3)
    e = np.asarray(TASK.tokenize(jnp.array(x), jnp.array(y), jnp.array(xq)))
    expected = []
    for layer in range(layers):
        i = 0 if recurrent else layer
        factors = [np.asarray(getattr(model, name)[...][i, 0], np.float64) for name in ("w_q", "w_k", "w_v", "w_p")]
        e = spec_layer(e, 5, *factors)
        expected.append(-e[-1, -1])
    got = readout(model, jnp.array(x, jnp.float32), jnp.array(y, jnp.float32), jnp.array(xq, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_recurrent_model_keeps_one_weight_set():
    model = make(["model.layers=4", "model.recurrent=true"])
    assert model.w_q[...].shape == (1, 1, 4, 4)
    assert make(["model.layers=4"]).w_q[...].shape == (4, 1, 4, 4)


def test_heads_add_up():
    model = make(["model.heads=2"])
    w = model.weights()
    rng = np.random.default_rng(1)
    x, y, xq = (jnp.array(a, jnp.float32) for a in (rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=3)))
    tokens = TASK.tokenize(x, y, xq)
    arch = models.Architecture(TASK.layout)
    head = lambda h: models.lsa(w.layers.attn.w_kq[:, h : h + 1], w.layers.attn.w_pv[:, h : h + 1])
    single = [models.forward(arch, head(h), tokens) for h in range(2)]
    # The residual query label starts at 0, so the two heads' readouts add up.
    np.testing.assert_allclose(models.forward(arch, w, tokens), single[0] + single[1], rtol=1e-5)


def test_softmax_attention_weights_are_a_distribution():
    ctx = jnp.array(np.random.default_rng(2).normal(size=(7, 4)), jnp.float32)
    w_pv, zeros = jnp.eye(4)[None], jnp.zeros((1, 4, 4))
    keys, visible = attention.keys_and_visibility(ctx, (0,), tasks.Mask(causal=False, n_keys=7))
    update = attention.softmax(keys, keys, ctx[:1], attention.Products(zeros, w_pv), visible)
    np.testing.assert_allclose(update[0], ctx.mean(0), rtol=1e-5)  # zero scores: uniform attention
    keys, visible = attention.keys_and_visibility(ctx, (0, 3), tasks.Mask(causal=True))
    causal = attention.softmax(keys, keys, attention.take(ctx, (0, 3)), attention.Products(zeros, w_pv), visible)
    np.testing.assert_allclose(causal, jnp.stack([ctx[0], ctx[:4].mean(0)]), rtol=1e-5)  # the visible prefix only


@pytest.mark.parametrize(
    "option",
    [
        "model.layernorm=true",
        "model.mlp=true",
        "model.input_mlp=true",
        "model.attention=softmax",
        "model.clip_activations=0.5",
        "model.positional=true",
    ],
)
def test_options_give_finite_differentiable_models(option):
    model = make(["model.layers=2", option])
    rng = np.random.default_rng(3)
    x, y, xq = (jnp.array(a, jnp.float32) for a in (rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=3)))
    preds = readout(model, x, y, xq)
    assert preds.shape == (2,) and bool(jnp.all(jnp.isfinite(preds)))
    grads = jax.grad(lambda xq: readout(model, x, y, xq)[-1])(xq)
    assert bool(jnp.all(jnp.isfinite(grads)))


@pytest.mark.parametrize(
    "overrides",
    [["model.layernorm=true", "model.mlp=true"], ["model.input_mlp=true"], ["model.mlp=true", "model.recurrent=true"]],
)
def test_every_parameter_reaches_the_prediction(overrides):
    """`Transformer.weights` is explicit: no parameter is left out of the forward pass."""
    model_def = models.build(load_config(["model.layers=2", *overrides]).model, TASK.layout, 0.5)
    params = model_def.init(jax.random.key(4))
    batch = TASK.sample(jax.random.key(5), 16)
    grads = jax.grad(lambda p: jnp.sum(model_def.predict(p, batch.tokens) ** 2))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
    names = {str(path[0].key) for path, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}
    assert names >= {"w_q", "w_k", "w_v", "w_p"}


def test_init_scale_sets_the_weight_std():
    task = tasks.linear.LinearRegression(dim=10, n_context=10, tokens="constructed")
    model = make(["model.layers=4", "model.heads=4"], task=task, scale=0.002)  # 1936 weights per factor
    fan_in = 11  # token size: each head's W_Q, W_K, W_V reads one token
    for name in ("w_q", "w_k", "w_v"):
        assert float(jnp.std(getattr(model, name)[...])) == pytest.approx(np.sqrt(0.002 / fan_in), rel=0.06)
    # W_P reads the values of all heads.
    assert float(jnp.std(model.w_p[...])) == pytest.approx(np.sqrt(0.002 / (4 * fan_in)), rel=0.06)


def test_depth_is_a_scan_iterating_fifty_layers_traces_one():
    """The program of a 50-layer tied model has as many operations as a 3-layer one."""
    model = make(["model.layers=3", "model.recurrent=true"])
    weights, tokens = model.weights(), TASK.sample(jax.random.key(0), 1).tokens[0]
    size = lambda k: len(jax.make_jaxpr(models.forward, static_argnums=0)(model.arch.deeper(k), weights, tokens).eqns)
    assert size(50) == size(3)
    deep = models.forward(model.arch.deeper(50), weights, tokens)
    assert deep.shape == (50, 1, 1)
    np.testing.assert_allclose(deep[:3], models.forward(model.arch, weights, tokens), rtol=1e-5)


def test_causal_mask_hides_the_future():
    """Sequence tasks: changing s_{t+2} leaves the predictions up to position t unchanged and moves
    the later ones (two layers, random weights, softmax and linear attention)."""
    task = tasks.from_config(load_config(["task=lds", "task.length=12", "task.state_dim=3"]).task)
    states = task.states(jax.random.key(0), 1)[0]
    t = 5  # 1-based position: its prediction may read s_1..s_t only
    changed = states.at[t + 1].add(1.0)  # s_{t+2} (0-based index t + 1)
    for attention_kind in ("linear", "softmax"):
        model = models.build(
            load_config(["task=lds", f"model.attention={attention_kind}", "model.layers=2"]).model, task.layout, 1.0
        )
        params = model.init(jax.random.key(1))
        before, after = (model.predict(params, task.batch(s[None]).tokens)[0] for s in (states, changed))
        np.testing.assert_array_equal(before[:, :t], after[:, :t])
        assert float(jnp.abs(before[:, t:] - after[:, t:]).max()) > 1e-4


def test_scored_positions_and_readout_of_sequence_tasks():
    task = tasks.from_config(load_config(["task=lds", "task.length=7", "task.state_dim=2"]).task)
    model = models.build(load_config(["task=lds", "model.layers=3"]).model, task.layout)
    preds = model.predict(model.init(jax.random.key(0)), task.sample(jax.random.key(1), 4).tokens)
    assert preds.shape == (4, 3, 7, 2)  # [B, K readouts, P positions, O = state size]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.layers=3", "model.layernorm=true", "model.mlp=true"],
        ["model.layers=2", "model.input_mlp=true", "model.positional=true"],
        ["task=lds", "model.layers=2"],
    ],
)
def test_queries_given_apart_equal_queries_in_the_tokens(overrides):
    """`forward(tokens, queries)` (the context carried apart for regression) is `forward` on the
    tokens with the queries written in, and its sensitivities match a finite difference."""
    cfg = load_config(overrides)
    task = tasks.from_config(cfg.task)
    model_def = models.build(cfg.model, task.layout, 0.5)
    weights = model_def.weights(model_def.init(jax.random.key(6)))
    batch = task.sample(jax.random.key(7), 1)
    tokens, queries = batch.tokens[0], batch.queries[0] + 0.3
    apart = models.forward(model_def.arch, weights, tokens, queries)
    written = models.forward(model_def.arch, weights, task.layout.place_queries(tokens, queries))
    np.testing.assert_allclose(apart, written, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda q: models.forward(model_def.arch, weights, tokens, q)[-1, -1, 0])(queries)
    step = jnp.zeros_like(queries).at[-1, 0].set(1e-2)
    f = lambda q: float(models.forward(model_def.arch, weights, task.layout.place_queries(tokens, q))[-1, -1, 0])
    assert float(grad[-1, 0]) == pytest.approx((f(queries + step) - f(queries - step)) / 2e-2, rel=2e-2, abs=1e-4)
