"""The LSA transformer: the products form equals the layer of SPEC section 3 written with factors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from icl_gd import models, tokens
from icl_gd.config import load_config


def spec_layer(e, n_context, w_q, w_k, w_v, w_p):
    """SPEC section 3, literally: e_j <- e_j + W_P sum_{i<=N} (W_V e_i)(W_K e_i)^T (W_Q e_j), every j."""
    out = np.array(e, dtype=np.float64)
    for j in range(e.shape[0]):
        acc = np.zeros(e.shape[1])
        for i in range(n_context):
            acc += (w_v @ e[i]) * ((w_k @ e[i]) @ (w_q @ e[j]))
        out[j] = e[j] + w_p @ acc
    return out


def make(overrides, dim=3, scale=0.5, seed=0):
    cfg = load_config(overrides)
    return nnx.merge(models.graphdef(cfg.model, dim, scale), models.init_params(cfg.model, dim, scale, jax.random.key(seed)))


@pytest.mark.parametrize("layers,recurrent", [(1, False), (3, False), (3, True)])
def test_forward_equals_spec_layers(layers, recurrent):
    model = make([f"model.layers={layers}", f"model.recurrent={str(recurrent).lower()}"])
    rng = np.random.default_rng(0)
    x, y, xq = rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=3)
    ctx, query = tokens.constructed(jnp.array(x), jnp.array(y), jnp.array(xq))
    e = np.concatenate([np.asarray(ctx), np.asarray(query)[None]])
    expected = []
    for layer in range(layers):
        i = 0 if recurrent else layer
        factors = [np.asarray(getattr(model, name)[...][i, 0], np.float64) for name in ("w_q", "w_k", "w_v", "w_p")]
        e = spec_layer(e, 5, *factors)
        expected.append(-e[-1, -1])
    got = model(jnp.array(x, jnp.float32), jnp.array(y, jnp.float32), jnp.array(xq, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_recurrent_model_keeps_one_weight_set():
    model = make(["model.layers=4", "model.recurrent=true"])
    assert model.w_q[...].shape == (1, 1, 4, 4)
    assert make(["model.layers=4"]).w_q[...].shape == (4, 1, 4, 4)


def test_heads_add_up():
    model = make(["model.heads=2"])
    w = model.weights()
    rng = np.random.default_rng(1)
    x, y, xq = (jnp.array(a, jnp.float32) for a in (rng.normal(size=(6, 3)), rng.normal(size=6), rng.normal(size=3)))
    arch = models.Architecture()
    head = lambda h: {k: v[:, h:h + 1] for k, v in w.items()}  # noqa: E731
    single = [models.forward(arch, head(h), x, y, xq) for h in range(2)]
    # The residual query label starts at 0, so the two heads' readouts add up.
    np.testing.assert_allclose(models.forward(arch, w, x, y, xq), single[0] + single[1], rtol=1e-5)


def test_softmax_attention_weights_are_a_distribution():
    ctx = jnp.array(np.random.default_rng(2).normal(size=(7, 4)), jnp.float32)
    w_pv = jnp.eye(4)[None]
    update = models.attend(ctx[:1], ctx, jnp.zeros((1, 4, 4)), w_pv, "softmax")
    np.testing.assert_allclose(update[0], ctx.mean(0), rtol=1e-5)  # zero scores: uniform attention


@pytest.mark.parametrize("option", ["model.layernorm=true", "model.mlp=true", "model.input_mlp=true",
                                    "model.attention=softmax", "model.clip_activations=0.5"])
def test_options_give_finite_differentiable_models(option):
    model = make(["model.layers=2", option])
    rng = np.random.default_rng(3)
    x, y, xq = (jnp.array(a, jnp.float32) for a in (rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=3)))
    preds = model(x, y, xq)
    assert preds.shape == (2,) and bool(jnp.all(jnp.isfinite(preds)))
    grads = jax.grad(lambda xq: model(x, y, xq)[-1])(xq)
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_init_scale_sets_the_weight_std():
    model = make(["model.layers=4", "model.heads=4"], dim=10, scale=0.002)  # 1936 weights per factor
    fan_in = 11  # token size: each head's W_Q, W_K, W_V reads one token
    for name in ("w_q", "w_k", "w_v"):
        assert float(jnp.std(getattr(model, name)[...])) == pytest.approx(np.sqrt(0.002 / fan_in), rel=0.06)
    # W_P reads the values of all heads.
    assert float(jnp.std(model.w_p[...])) == pytest.approx(np.sqrt(0.002 / (4 * fan_in)), rel=0.06)
