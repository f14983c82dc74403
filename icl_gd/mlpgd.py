"""The paper's comparator "MLP + GD" for sine regression (docs/science.md section 9).

A network of its own: the model's input embedding (its configured form and initial law), then one
GD step of a fixed `eta` from `W_0 = 0` on the features, `y_hat = eta (1/N) sum_i y_i phi(x_i)^T
phi(x_q)` (section 4). Only the embedding is trained, meta-learned by Adam on the task loss over
fresh tasks, so that the features are the best ones for one GD step; `eta` itself is not learned
(the features' scale absorbs it). The trained transformer is then compared with it on the raw
input, the only space the two networks share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from icl_gd import models, references
from icl_gd.tasks import Tasks


class Comparator(NamedTuple):
    """The comparator's trained part, the input embedding as `models.input_features` reads it."""

    embed: models.MLP
    embed_in: jax.Array | None


def init(model: models.Model, key: jax.Array) -> Comparator:
    """A fresh input embedding of `model`'s form and initial law (a fresh model, all but its embedding dropped)."""
    weights = model.weights(model.init(key))
    assert weights.embed is not None, "the comparator needs a model with an input embedding"
    return Comparator(weights.embed, weights.embed_in)


def predict(c: Comparator, eta: float | jax.Array, x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> jax.Array:
    """The comparator's prediction for one task, `[1]` (one readout, as the predictors of `icl_gd.metrics`)."""
    features = models.input_features(c.embed, c.embed_in, jnp.concatenate([x_Nxd, xq_d[None]]))
    return references.gd_direct(features[:-1], y_N, features[-1], jnp.reshape(eta, (1,)))


def loss(c: Comparator, eta: float | jax.Array, t: Tasks) -> jax.Array:
    """`0.5 mean (y_hat - y_q)^2` on tasks `t`."""
    preds = jax.vmap(predict, in_axes=(None, None, 0, 0, 0))(c, eta, t.x, t.y, t.xq)
    return references.loss(preds[:, 0], t.yq)


def train(
    c: Comparator,
    draw: Callable[[jax.Array, int], Tasks],
    key: jax.Array,
    *,
    steps: int,
    batch: int,
    lr: float,
    eta: float,
) -> tuple[Comparator, jax.Array]:
    """Adam on the embedding: step `i` lowers the loss on `batch` fresh tasks `draw(fold_in(key, i), batch)`.
    One compiled scan; returns the trained comparator and the loss of every step, `[steps]`."""
    optimizer = optax.adam(lr)

    def step(carry, i):
        c, opt_state = carry
        value, grads = jax.value_and_grad(loss)(c, eta, draw(jax.random.fold_in(key, i), batch))
        updates, opt_state = optimizer.update(grads, opt_state, c)
        return (cast(Comparator, optax.apply_updates(c, updates)), opt_state), value

    @jax.jit
    def run(c: Comparator) -> tuple[Comparator, jax.Array]:
        state = optimizer.init(cast(optax.Params, c))  # a pytree; `embed_in` may be None, an empty subtree
        (c, _), values = jax.lax.scan(step, (c, state), jnp.arange(steps))
        return c, values

    return run(c)
