"""Truncated iterative solvers of normal equations `W A = B` (docs/science.md sections 4 and 8),
shared by the references of sequence tasks and the hypothesis families of `icl_gd.explain`.

Every solver starts from `W = 0` and returns its readout `W_k q` after each of its `K` steps,
`[K, O]`, for one system: `A` `[d, d]` symmetric (a Gram matrix, with any ridge shift already
added), `B` `[O, d]` and a query `q` `[d]`. Regression is the case `O = 1`
(`A = X^T X / N`, `B = (X^T y / N)^T`); a sequence task vmaps over positions, each with its own
prefix sums (`A_t = sum_{i<t} s_i s_i^T`, `B_t = sum_{i<t} s_{i+1} s_i^T`).

Richardson and Chebyshev iterates are `W_k = B P_k(A)` for a polynomial `P_k`; as `A` is
symmetric, `W_k q = B (P_k(A) q)`, so they iterate on the vector `P_k(A) q` (`O(d^2)` per step,
not `O(d^3)`). Newton-Schulz squares its polynomial's degree at every step and keeps the matrix.

Also here, as the fitting tool of those solvers' scalars: `levenberg_marquardt`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from icl_gd.linalg import spd_solve


def richardson(a_dxd: jax.Array, b_Oxd: jax.Array, q_d: jax.Array, alphas_K: jax.Array) -> jax.Array:
    """`W <- W - alpha_k (W A - B)` with step `alpha_k` at step `k`: GD on
    `1/2 sum_i ||W x_i - y_i||^2` when `A = sum x x^T`, `B = sum y x^T`; with `A + lam I` in place
    of `A`, Richardson on the ridge normal equations (the truncated Neumann series). Readouts `[K, O]`."""

    def step(p_q, alpha):
        p_q = p_q + alpha * (q_d - a_dxd @ p_q)  # P_{k+1}(A) = P_k(A) (I - alpha A) + alpha I
        return p_q, b_Oxd @ p_q

    return jax.lax.scan(step, jnp.zeros_like(q_d), jnp.atleast_1d(alphas_K))[1]


def chebyshev(a_dxd: jax.Array, b_Oxd: jax.Array, q_d: jax.Array, center, half_width, steps: int) -> jax.Array:
    """Chebyshev iteration assuming `A`'s spectrum in `center -+ half_width` (Saad, Iterative
    Methods, Algorithm 12.1, written without dividing by the half width), on the vector `P_k(A) q`
    with the residual `(I - P_k(A) A) q` and direction alongside. Its first step is GD with
    `eta = 1 / center`; `half_width = 0` is GD with that `eta` at every step. Readouts `[K, O]`."""
    rho0 = half_width / center

    def step(state, _):
        p_q, r_q, d_q, rho = state
        p_q, r_q = p_q + d_q, r_q - a_dxd @ d_q
        denom = 2 * center - half_width * rho
        rho_next = half_width / denom
        d_q = rho_next * rho * d_q + 2 * r_q / denom
        return (p_q, r_q, d_q, rho_next), b_Oxd @ p_q

    init = (jnp.zeros_like(q_d), q_d, q_d / center, rho0)
    return jax.lax.scan(step, init, None, length=steps)[1]


def newton_schulz(a_dxd: jax.Array, b_Oxd: jax.Array, q_d: jax.Array, alpha, steps: int) -> jax.Array:
    """Newton-Schulz iteration `M <- M (2I - A M)` for `A^-1` from `M_0 = alpha I`; readout `B M_k q`.
    `M_k` is the Neumann series with `2^k` terms, i.e. `2^k` GD steps with `eta = alpha` (Fu et al.
    2023's "iterative Newton"). Readouts `[K, O]`."""
    eye = jnp.eye(a_dxd.shape[0], dtype=a_dxd.dtype)

    def step(m, _):
        m = m @ (2 * eye - a_dxd @ m)
        return m, b_Oxd @ (m @ q_d)

    return jax.lax.scan(step, alpha * eye, None, length=steps)[1]


def levenberg_marquardt(
    residual: Callable[[jax.Array], jax.Array], theta0_P: jax.Array, n_residuals: int, iters: int
) -> jax.Array:
    """Minimise `sum(residual(theta)^2)` (`residual: [P] -> [n_residuals]`) by damped Gauss-Newton,
    compiled as one loop of at most `iters` steps: a step is kept only if it lowers the cost (the
    damping then shrinks), else the damping grows (Marquardt's scaling by `diag(J^T J)`). It stops
    once a kept step gains less than 1e-7 of the cost (under `vmap`, once every fit has; a stopped
    fit no longer changes); families linear in their parameters converge in one step. The residual
    and its Jacobian are computed once per step, at the candidate; the loop starts from a zero
    Jacobian and infinite cost, so that its first candidate is `theta0` itself (the result never
    costs more than `theta0`)."""
    n_params = theta0_P.shape[0]
    eye = jnp.eye(n_params, dtype=theta0_P.dtype)

    def step(carry):
        i, theta, r, jac_RxP, value, damping, done = carry
        jtj = jac_RxP.T @ jac_RxP
        diag = jnp.diag(jtj) + 1e-9 * jnp.max(jnp.diag(jtj)) + 1e-30
        candidate = theta - spd_solve(jtj + damping * jnp.diag(diag), jac_RxP.T @ r)
        r_new, jvp = jax.linearize(residual, candidate)
        new_value = jnp.where(jnp.all(jnp.isfinite(r_new)), r_new @ r_new, jnp.inf)
        better = (new_value < value) & ~done
        keep = lambda new, old: jnp.where(better, new, old)
        converged = better & jnp.isfinite(value) & (value - new_value <= 1e-7 * value)
        damping = jnp.where(done, damping, jnp.where(better | ~jnp.isfinite(value), damping * 0.3, damping * 4.0))
        return (
            i + 1,
            keep(candidate, theta),
            keep(r_new, r),
            keep(jax.vmap(jvp, out_axes=1)(eye), jac_RxP),
            keep(new_value, value),
            damping,
            done | converged | (damping >= 1e10),
        )

    init = (
        jnp.asarray(0),
        theta0_P,
        jnp.zeros((n_residuals,), theta0_P.dtype),
        jnp.zeros((n_residuals, n_params), theta0_P.dtype),
        jnp.asarray(jnp.inf, theta0_P.dtype),
        jnp.asarray(1e-3 / 0.3, theta0_P.dtype),
        jnp.asarray(False),
    )
    running = lambda carry: (carry[0] <= iters) & ~carry[-1]
    return jax.lax.while_loop(running, step, init)[1]
