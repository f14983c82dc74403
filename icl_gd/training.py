"""Training compiled as a whole: `jit(vmap(scan))` over the steps between two evaluations,
independent seeds side by side, fresh batches sampled on device from `fold_in(data_key, step)`
(so a run resumed at step `k` sees the batches an uninterrupted one would).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from icl_gd import tasks
from icl_gd.models import Model
from icl_gd.tasks import TaskKind


def prng_name(cfg) -> str:
    """The generator of a run: `prng`, or when null the task kind's (`TaskKind.prng`)."""
    return cfg.prng.name if cfg.prng is not None else tasks.from_config(cfg.task).prng


def prng(cfg):
    """The context in which every draw of a run uses its generator (`prng_name`, docs/science.md
    section 7): training, the evaluation set, the reference fits and the analyses."""
    return jax.default_prng_impl(prng_name(cfg))


def learning_rate(train_cfg) -> float | optax.Schedule:
    """`train.lr`, constant or with the follow-up's warm-up and cosine decay (docs/science.md section 8)."""
    if train_cfg.schedule.name == "constant":
        return float(train_cfg.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(train_cfg.lr),
        warmup_steps=int(train_cfg.warmup_steps),
        decay_steps=int(train_cfg.steps),
        end_value=float(train_cfg.end_lr),
    )


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW behind global-norm gradient clipping (docs/science.md section 7)."""
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.clip_norm),
        optax.adamw(learning_rate(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay),
    )


def seed_keys(seed: int, n_seeds: int) -> tuple[jax.Array, jax.Array]:
    """Init and data keys for each seed: `fold_in(key(seed), s)`, then one stream each."""
    per_seed = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(seed), s))(jnp.arange(n_seeds))
    return (
        jax.vmap(lambda k: jax.random.fold_in(k, 0))(per_seed),
        jax.vmap(lambda k: jax.random.fold_in(k, 1))(per_seed),
    )


def batch_loss(preds_BxPxO: jax.Array, targets_BxPxO: jax.Array) -> jax.Array:
    """`0.5 ||y_hat - y||^2` summed over output coordinates, averaged over positions and sequences
    (docs/science.md sections 5 and 8; `0.5 mean (y_hat - y_q)^2` for regression)."""
    return 0.5 * jnp.mean(jnp.sum((preds_BxPxO - targets_BxPxO) ** 2, axis=-1))


def make_loss(model: Model, task: TaskKind, batch_size: int):
    """Loss of parameters on a fresh batch drawn from `key` (final readout)."""

    def loss_fn(params, key):
        batch = task.sample(key, batch_size)
        return batch_loss(model.predict(params, batch.tokens)[:, -1], batch.targets)

    return loss_fn


def make_train_chunk(model: Model, optimizer: optax.GradientTransformation, task: TaskKind, batch_size: int):
    """`(params, opt_state, data_keys, start, n_steps) -> (params, opt_state, losses[S, n_steps])`,
    compiled once per chunk length, parameters and optimizer state donated."""
    loss_fn = make_loss(model, task, batch_size)

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


def seed_sharding(n_seeds: int) -> jax.sharding.Sharding:
    """Where arrays with a leading seed axis live: that axis split across as many devices as divide
    `n_seeds` evenly, so that the compiled programs vmapped over seeds run each device's seeds on
    it (GSPMD, no mesh context needed), or the first device alone."""
    n_devices = math.gcd(n_seeds, jax.device_count())
    if n_devices == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((n_devices,), ("seeds",), axis_types=auto, devices=jax.devices()[:n_devices])
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seeds"))


def init_states(model: Model, optimizer: optax.GradientTransformation, init_keys: jax.Array):
    """Parameters and optimizer state for every seed (leading seed axis)."""

    def init(key):
        params = model.init(key)
        return params, optimizer.init(params)

    return jax.jit(jax.vmap(init))(init_keys)
