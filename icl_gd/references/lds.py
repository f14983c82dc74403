"""References for linear dynamical systems (docs/science.md section 8), per position `t` on the
pairs `(s_i, s_{i+1})`, `i < t`, that the model has seen, applied to the query `s_t`:

- `ridge_online`: ridge least squares refitted at every position,
  `W_t = (sum_{i<t} s_{i+1} s_i^T)(sum_{i<t} s_i s_i^T + lambda I)^{-1}`;
- `gd`: one GD step from `W = 0` on `1/2 sum_{i<t} ||W s_i - s_{i+1}||^2`, i.e.
  `W_t = eta sum_{i<t} s_{i+1} s_i^T`, one `eta` for every position, line-searched for the mean
  loss over positions on sequences of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from icl_gd.linalg import spd_solve
from icl_gd.references.registry import Reference, register

LINE_SEARCH_CHUNK = 1024  # sequences per chunk of the line search (bounds its memory)


def pair_products(states_Tp1xD: jax.Array, queries_TxD: jax.Array) -> jax.Array:
    """`g_t = sum_{i<t} s_{i+1} (s_i^T q_t)` for every position: one GD step's update direction, `[T, D]`.
    The causal sum is a masked `[T, T]` score matrix (strictly earlier pairs only)."""
    inputs, targets = states_Tp1xD[:-2], states_Tp1xD[1:-1]  # pairs (s_i, s_{i+1}), i = 1..T-1
    scores_IxT = inputs @ queries_TxD.T
    # pair j = (s_{j+1}, s_{j+2}) before position p
    earlier = jnp.arange(inputs.shape[0])[:, None] < jnp.arange(queries_TxD.shape[0])[None, :]
    return jnp.einsum("it,id->td", jnp.where(earlier, scores_IxT, 0.0), targets)


def gd_predict(task, eta: jax.Array, queries_TxD: jax.Array, states_Tp1xD: jax.Array) -> jax.Array:
    """One GD step per position: `eta g_t`, `[1, T, D]`."""
    return (eta * pair_products(states_Tp1xD, queries_TxD))[None]


def ridge_online_predict(task, lam: jax.Array, queries_TxD: jax.Array, states_Tp1xD: jax.Array) -> jax.Array:
    """Ridge least squares on the pairs seen so far, at every position: `[1, T, D]`. The Gram
    matrices are causal prefix sums; each position solves its own SPD system (no LAPACK call)."""
    inputs, targets = states_Tp1xD[:-2], states_Tp1xD[1:-1]
    zero = jnp.zeros((1, inputs.shape[1], inputs.shape[1]), inputs.dtype)
    gram = jnp.concatenate([zero, jnp.cumsum(jnp.einsum("id,ie->ide", inputs, inputs), 0)])  # [T, D, D], i < t
    cross = jnp.concatenate([zero, jnp.cumsum(jnp.einsum("id,ie->ide", targets, inputs), 0)])
    eye = jnp.eye(inputs.shape[1], dtype=inputs.dtype)
    solved = jax.vmap(spd_solve)(gram + lam * eye, queries_TxD)
    return jnp.einsum("tde,te->td", cross, solved)[None]


def line_search_gd(states_BxTp1xD: jax.Array) -> jax.Array:
    """The `eta` minimising `sum_t ||eta g_t - s_{t+1}||^2` over the sequences: the loss is
    quadratic in `eta`, so the line search is exact, `eta = sum <g, s'> / sum |g|^2`."""

    def sums(states):
        g = pair_products(states, states[:-1])
        return jnp.stack([jnp.sum(g * states[1:]), jnp.sum(g * g)])

    total = jax.lax.map(sums, states_BxTp1xD, batch_size=LINE_SEARCH_CHUNK).sum(0)
    return total[0] / total[1]


def _fit_gd(ctx) -> jax.Array:
    states = ctx.task.states(jax.random.fold_in(ctx.key, 1), int(ctx.cfg.eval.line_search_tasks))
    return jax.jit(line_search_gd)(states)


register(
    Reference("gd", "GD, 1 step", _fit_gd, gd_predict, describe=lambda eta: {"eta": float(eta), "steps": 1}), ("lds",)
)
register(
    Reference(
        "ridge_online",
        "online ridge",
        lambda ctx: jnp.asarray(ctx.task.ridge_lambda, jnp.float32),
        ridge_online_predict,
        describe=lambda lam: {"lambda": float(lam)},
    ),
    ("lds",),
)
