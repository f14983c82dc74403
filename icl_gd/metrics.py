"""Metrics of SPEC section 5: loss, sensitivities `d y_hat / d x_q`, and the alignment of two
models (preds diff, model cos, model diff), each for every layer's readout.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from icl_gd.tasks import Tasks

Predictor = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x_Nxd, y_N, xq_d) -> y_hat_K


class Evaluation(NamedTuple):
    """A model's predictions `[T, K]` and sensitivities `[T, K, d]` on T tasks (K readouts)."""

    preds: jax.Array
    sens: jax.Array


def evaluate(predict: Predictor, t: Tasks, *per_task) -> Evaluation:
    """Predictions and their gradients with respect to the query input, task by task
    (`per_task`: more arrays with a leading task axis, passed to `predict` after `x_q`).

    Forward mode: the sensitivity of readout k then depends on the first k layers only, even
    when a later layer overflows (reverse mode would turn `0 * inf` into NaN everywhere).
    """

    def one(x, y, xq, *extra):
        return predict(x, y, xq, *extra), jax.jacfwd(predict, argnums=2)(x, y, xq, *extra)

    preds, sens = jax.vmap(one)(t.x, t.y, t.xq, *per_task)
    return Evaluation(preds, sens)


def losses(ev: Evaluation, yq_T: jax.Array) -> jax.Array:
    """`0.5 mean((y_hat - y_q)^2)` for each readout: `[K]`."""
    return 0.5 * jnp.mean((ev.preds - yq_T[:, None]) ** 2, axis=0)


def alignment(a: Evaluation, b: Evaluation) -> dict[str, jax.Array]:
    """Preds diff, model cos and model diff between two models, for each readout: `[K]` each."""
    dot = jnp.sum(a.sens * b.sens, -1)
    norms = jnp.linalg.norm(a.sens, axis=-1) * jnp.linalg.norm(b.sens, axis=-1)
    cos = dot / jnp.maximum(norms, 1e-12)
    return {
        "preds_diff": jnp.mean(jnp.abs(a.preds - b.preds), axis=0),
        "model_cos": jnp.mean(cos, axis=0),
        "model_diff": jnp.mean(jnp.linalg.norm(a.sens - b.sens, axis=-1), axis=0),
    }


def mean_ci95(values) -> dict:
    """Mean, Student-t 95% interval across seeds and the per-seed values (JSON-ready)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if v.size < 2:
        lo = hi = None
    else:
        half = float(scipy.stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
        lo, hi = mean - half, mean + half
    return {"mean": mean, "ci95": [lo, hi], "per_seed": [float(x) for x in v]}
