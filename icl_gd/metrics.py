"""Metrics of docs/science.md section 5: loss, sensitivities `d y_hat / d query`, and the alignment
of two models (preds diff, model cos, model diff), for every readout and scored position.

Predictions are `[B, K, P, O]` (tasks, readouts after each layer / step, scored positions,
output coordinates); sensitivities `[B, K, P, O, d]` (with respect to the `d` coordinates of the
query input at the same position). Every metric is `[K, P]`: averaged over tasks; the reported
values average over positions too (`by_position=False`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from icl_gd.tasks import Tasks

Predictor = Callable[..., jax.Array]  # (queries_Pxd, *per_task) -> y_hat_KxPxO


class Evaluation(NamedTuple):
    """A model's predictions `[B, K, P, O]` and, when computed, sensitivities `[B, K, P, O, d]`."""

    preds: jax.Array
    sens: jax.Array | None = None


def evaluate(predict: Predictor, queries_BxPxd: jax.Array, *per_task, sensitivities: bool = True) -> Evaluation:
    """Predictions and their Jacobians with respect to the query input at the same position,
    sequence by sequence (`per_task`: more arrays or pytrees with a leading task axis, passed to
    `predict` after the queries).

    Forward mode: the sensitivity of readout k then depends on the first k layers only, even
    when a later layer overflows (reverse mode would turn `0 * inf` into NaN everywhere).
    """

    def one(q_Pxd, *extra):
        preds = predict(q_Pxd, *extra)
        if not sensitivities:
            return preds, None
        jac_KxPxOxPxd = jax.jacfwd(predict)(q_Pxd, *extra)
        return preds, jnp.moveaxis(jnp.diagonal(jac_KxPxOxPxd, axis1=1, axis2=3), -1, 1)

    preds, sens = jax.vmap(one)(queries_BxPxd, *per_task)
    return Evaluation(preds, sens)


def last_input_sensitivities(
    predict: Callable[[jax.Array], jax.Array], states_BxTp1xD: jax.Array, chunk: int = 16
) -> Evaluation:
    """Sequence tasks (docs/science.md sections 5 and 8): the predictions `[B, K, P, O]` of
    `predict(states_Tp1xD) -> [K, P, O]` (position `p` predicts `s_{p+1}` from `s_1..s_p`) and the
    Jacobian of each with respect to the last state it saw, `s_p`, in every place it enters
    (`[B, K, P, O, D]`). One reverse-mode pass per position and output coordinate (the mesa-layer's
    recursion has a custom reverse rule only), so this is for a subset of sequences, `chunk` at a time."""

    def one(states_Tp1xD):
        preds_KxPxO = predict(states_Tp1xD)

        def at(p):
            return jax.jacrev(lambda s: predict(states_Tp1xD.at[p].set(s))[:, p])(states_Tp1xD[p])

        sens_PxKxOxD = jax.lax.map(at, jnp.arange(preds_KxPxO.shape[1]))
        return preds_KxPxO, jnp.moveaxis(sens_PxKxOxD, 0, 1)

    preds, sens = jax.lax.map(one, states_BxTp1xD, batch_size=chunk)
    return Evaluation(preds, sens)


def regression(predict_xyq: Callable[..., jax.Array]) -> Predictor:
    """A regression predictor `(x_Nxd, y_N, xq_d, *extra) -> y_hat_K` as a `Predictor` over the
    query `[1, d]` and the task (`evaluate(regression(f), t.xq[:, None], t, *extra)`)."""

    def predict(q_1xd, t, *extra):
        return predict_xyq(t.x, t.y, q_1xd[0], *extra)[:, None, None]

    return predict


def evaluate_tasks(predict_xyq: Callable[..., jax.Array], t: Tasks, *per_task) -> Evaluation:
    """`evaluate` for a regression predictor `(x, y, xq, *extra) -> y_hat_K` on tasks `t`."""
    return evaluate(regression(predict_xyq), t.xq[:, None], t, *per_task)


def _by(values_KxP: jax.Array, by_position: bool) -> jax.Array:
    return values_KxP if by_position else values_KxP.mean(-1)


def losses(ev: Evaluation, targets_BxPxO: jax.Array, by_position: bool = False) -> jax.Array:
    """`0.5 mean_tasks sum_coordinates (y_hat - y)^2` for each readout: `[K]` (or `[K, P]`)."""
    per_KxP = 0.5 * jnp.mean(jnp.sum((ev.preds - targets_BxPxO[:, None]) ** 2, axis=-1), axis=0)
    return _by(per_KxP, by_position)


def alignment(a: Evaluation, b: Evaluation, by_position: bool = False) -> dict[str, jax.Array]:
    """Preds diff (mean Euclidean distance of the predictions), and, with sensitivities, model cos
    (cosine of the flattened Jacobians) and model diff (their Frobenius distance), for each readout:
    `[K]` each (or `[K, P]`). `b` may have a single readout, compared with every readout of `a`."""
    out = {"preds_diff": jnp.mean(jnp.linalg.norm(a.preds - b.preds, axis=-1), axis=0)}
    if a.sens is not None and b.sens is not None:
        sa, sb = (s.reshape(*s.shape[:3], -1) for s in (a.sens, b.sens))
        dot = jnp.sum(sa * sb, -1)
        norms = jnp.linalg.norm(sa, axis=-1) * jnp.linalg.norm(sb, axis=-1)
        out["model_cos"] = jnp.mean(dot / jnp.maximum(norms, 1e-12), axis=0)
        out["model_diff"] = jnp.mean(jnp.linalg.norm(sa - sb, axis=-1), axis=0)
    return {
        name: _by(jnp.broadcast_to(v, (max(a.preds.shape[1], b.preds.shape[1]), v.shape[-1])), by_position)
        for name, v in out.items()
    }


def sign_agreement(a: Evaluation, b: Evaluation, by_position: bool = False) -> jax.Array:
    """The paper's partial cos on 1-d inputs (docs/science.md section 9): the share of tasks (and of
    sensitivity coordinates) where `a`'s and `b`'s sensitivities have the same sign, for each
    readout: `[K]` (or `[K, P]`). `b` may have a single readout, compared with every readout of `a`."""
    assert a.sens is not None and b.sens is not None
    same_KxP = jnp.mean(jnp.sign(a.sens) == jnp.sign(b.sens), axis=(0, 3, 4))
    return _by(same_KxP, by_position)


def mean_ci95(values) -> dict:
    """Mean, Student-t 95% interval across seeds and the per-seed values (JSON-ready). With a
    trailing axis (e.g. positions), each entry is a list over it."""
    v = np.asarray(values, dtype=np.float64)
    mean = v.mean(0)
    if v.shape[0] < 2:
        lo = hi = None if v.ndim == 1 else [None] * v.shape[1]
    else:
        half = scipy.stats.t.ppf(0.975, v.shape[0] - 1) * v.std(0, ddof=1) / np.sqrt(v.shape[0])
        lo, hi = (mean - half).tolist(), (mean + half).tolist()
    return {"mean": mean.tolist(), "ci95": [lo, hi], "per_seed": v.tolist()}
