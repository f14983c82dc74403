"""Token construction (SPEC section 2): each task becomes context tokens and one query token.

Constructed tokens put `(x_i, y_i)` in one token and the query as `(x_q, 0)`. Context and
query are kept apart because keys and values come from the context tokens only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def constructed(x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One task's context tokens `[N, d+1]` and query token `[d+1]`."""
    ctx = jnp.concatenate([x_Nxd, y_N[:, None]], axis=-1)
    query = jnp.concatenate([xq_d, jnp.zeros((1,), xq_d.dtype)])
    return ctx, query


def token_dim(input_dim: int) -> int:
    return input_dim + 1
