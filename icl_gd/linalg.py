"""Small dense linear algebra in plain `jnp`, for programs that must hold no LAPACK call.

On CPU, jaxlib's batched LAPACK kernels fan out into XLA's intra-op thread pool and block until
it is done, so two of them running side by side in one compiled program can hold every pool
thread of a 2-core machine and wait for each other forever (README, Tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def spd_solve(a_PxP: jax.Array, b_P: jax.Array) -> jax.Array:
    """`a^-1 b` for a symmetric positive definite `a`, by Gauss-Jordan elimination without
    pivoting (stable for SPD matrices)."""
    n = a_PxP.shape[0]

    def eliminate(k, m):
        row = m[k] / m[k, k]
        return (m - m[:, k, None].at[k].set(0.0) * row).at[k].set(row)

    return jax.lax.fori_loop(0, n, eliminate, jnp.concatenate([a_PxP, b_P[:, None]], 1))[:, n]
