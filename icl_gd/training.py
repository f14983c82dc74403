"""Training compiled as a whole: `jit(vmap(scan))` over the steps between two evaluations,
independent seeds side by side, fresh tasks sampled on device from `fold_in(data_key, step)`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from icl_gd import models, references, tokens


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW behind global-norm gradient clipping (SPEC section 7)."""
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.clip_norm),
        optax.adamw(train_cfg.lr, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay),
    )


def seed_keys(seed: int, n_seeds: int) -> tuple[jax.Array, jax.Array]:
    """Init and data keys for each seed: `fold_in(key(seed), s)`, then one stream each."""
    per_seed = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(seed), s))(jnp.arange(n_seeds))
    return (jax.vmap(lambda k: jax.random.fold_in(k, 0))(per_seed),
            jax.vmap(lambda k: jax.random.fold_in(k, 1))(per_seed))


def make_loss(graphdef: nnx.GraphDef, sample: Callable, batch_size: int):
    """Loss of parameters on a fresh batch drawn from `key` (final readout only)."""

    def loss_fn(params, key):
        t = sample(key, batch_size)
        model = nnx.merge(graphdef, params)
        preds = models.predict_batch(model.arch, model.weights(), t.x, t.y, t.xq)
        return references.loss(preds[:, -1], t.yq)

    return loss_fn


def make_train_chunk(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, sample: Callable, batch_size: int):
    """`(params, opt_state, data_keys, start, n_steps) -> (params, opt_state, losses[S, n_steps])`,
    compiled once per chunk length, parameters and optimizer state donated."""
    loss_fn = make_loss(graphdef, sample, batch_size)

    def chunk(params, opt_state, data_key, start, n_steps):
        def step(carry, i):
            params, opt_state = carry
            value, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(data_key, i))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, opt_state), values = jax.lax.scan(step, (params, opt_state), start + jnp.arange(n_steps))
        return params, opt_state, values

    vmapped = jax.vmap(chunk, in_axes=(0, 0, 0, None, None))
    return jax.jit(vmapped, static_argnums=4, donate_argnums=(0, 1))


def init_states(model_cfg, input_dim: int, init_scale: float, optimizer, init_keys: jax.Array,
                layout: tokens.Layout = tokens.Layout()):
    """Parameters and optimizer state for every seed (leading seed axis)."""

    def init(key):
        params = models.init_params(model_cfg, input_dim, init_scale, key, layout)
        return params, optimizer.init(params)

    return jax.jit(jax.vmap(init))(init_keys)
