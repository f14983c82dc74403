"""The mesa-layer's causal ridge regression, one head and one sequence (docs/science.md section 3).

For every position `t`, `o_t = S_t R_t q_t` with `S_t = sum_{i<=t} v_i k_i^T` and
`R_t = (sum_{i<=t} k_i k_i^T + I / lam)^-1`: the prediction at `q_t` of the ridge regression of the
values on the keys seen so far. Two interchangeable implementations (`IMPLEMENTATIONS`, picked by
`model.mesa_impl`), both pure `jnp` (no LAPACK call, see `icl_gd.linalg`):

- `mesa_scan`: the Sherman-Morrison recursion under `lax.scan`, `O(T K (K + V))` time. Its custom
  backward pass runs the recursion in reverse, so its memory is linear in `T` (no stored inverses).
- `mesa_solve`: prefix Gram matrices and one SPD solve per position, all positions at once.

The caller vmaps over heads and sequences and applies the projections; `lam > 0` is its business.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from icl_gd.linalg import spd_solve

MesaFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | float], jax.Array]

# On GPUs the default float32 matmul precision may round operands to TF32, far too coarse for a
# recursion that subtracts nearly equal matrices: every product here asks for full precision.
_HIGHEST = jax.lax.Precision.HIGHEST


def _mv(a: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.matmul(a, x, precision=_HIGHEST)


def _recursion(
    keys_TxK: jax.Array, values_TxV: jax.Array, queries_TxK: jax.Array, lam: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The forward recursion: outputs `[T, V]`, and `(R_T, S_T, w_TxK)` for the backward pass.

    Sherman-Morrison (docs/science.md section 3): with `u = R_{t-1} k_t` and `d = 1 + k_t^T u`,
    `R_t = R_{t-1} - u u^T / d = R_{t-1} - w_t w_t^T` where `w_t = u / sqrt(d)`. The rank-one
    factor `w_t` is kept (`T x K` numbers, like the keys) so that the backward pass can undo the
    step exactly, `R_{t-1} = R_t + w_t w_t^T`, instead of recomputing it from `R_t` and `k_t`
    (`R_t k_t k_t^T R_t / (1 - k_t^T R_t k_t)`), whose denominator `1 / d` cancels
    catastrophically in float32 once `lam |k|^2` is large.
    """
    n_k, n_v = keys_TxK.shape[1], values_TxV.shape[1]
    r0 = lam * jnp.eye(n_k, dtype=keys_TxK.dtype)
    s0 = jnp.zeros((n_v, n_k), keys_TxK.dtype)

    def step(carry, kvq):
        r_KxK, s_VxK = carry
        k, v, q = kvq
        u = _mv(r_KxK, k)
        w = u * jax.lax.rsqrt(1 + jnp.dot(k, u, precision=_HIGHEST))
        r_KxK = r_KxK - jnp.outer(w, w)
        s_VxK = s_VxK + jnp.outer(v, k)
        return (r_KxK, s_VxK), (_mv(s_VxK, _mv(r_KxK, q)), w)

    (r_KxK, s_VxK), (out_TxV, w_TxK) = jax.lax.scan(step, (r0, s0), (keys_TxK, values_TxV, queries_TxK))
    return out_TxV, (r_KxK, s_VxK, w_TxK)


def mesa_scan_autodiff(
    keys_TxK: jax.Array, values_TxV: jax.Array, queries_TxK: jax.Array, lam: jax.Array | float
) -> jax.Array:
    """The Sherman-Morrison recursion differentiated by plain autodiff: the reference for
    `mesa_scan`'s gradient. Its backward pass stores every `R_t`, `O(T K^2)` memory."""
    keys_TxK, values_TxV, queries_TxK, lam = _promote(keys_TxK, values_TxV, queries_TxK, lam)
    return _recursion(keys_TxK, values_TxV, queries_TxK, lam)[0]


@jax.custom_vjp
def _scan(keys_TxK: jax.Array, values_TxV: jax.Array, queries_TxK: jax.Array, lam: jax.Array) -> jax.Array:
    return _recursion(keys_TxK, values_TxV, queries_TxK, lam)[0]


def _scan_fwd(keys_TxK: jax.Array, values_TxV: jax.Array, queries_TxK: jax.Array, lam: jax.Array):
    out_TxV, (r_KxK, s_VxK, w_TxK) = _recursion(keys_TxK, values_TxV, queries_TxK, lam)
    return out_TxV, (keys_TxK, values_TxV, queries_TxK, lam, r_KxK, s_VxK, w_TxK)


def _scan_bwd(residuals, g_TxV: jax.Array):
    """The recursion run backwards from `(R_T, S_T)`, accumulating adjoints.

    Write `A_t = R_t^-1 = A_{t-1} + k_t k_t^T`, `A_0 = I / lam`, and `Abar_t`, `Sbar_t` for the
    gradients of the loss with respect to `A_t`, `S_t` (through `o_t` and every later step). With
    `g_t` the output's cotangent and `z_t = R_t q_t`:
    - `o_t = S_t z_t` gives `Sbar_t = Sbar_{t+1} + g_t z_t^T` and `qbar_t = R_t S_t^T g_t`;
      through `R_t = A_t^-1` (`dR = -R dA R`) it gives `Abar_t = Abar_{t+1} - qbar_t z_t^T`;
    - `S_t = S_{t-1} + v_t k_t^T` gives `vbar_t = Sbar_t k_t` and `Sbar_t^T v_t` to `kbar_t`;
    - `A_t = A_{t-1} + k_t k_t^T` gives `(Abar_t + Abar_t^T) k_t` to `kbar_t`;
    - `A_0 = I / lam` gives `lambar = -tr(Abar_0) / lam^2`.
    Each step costs `O(K (K + V))` and holds only `K x K` and `V x K` matrices.
    """
    keys_TxK, values_TxV, queries_TxK, lam, r_KxK, s_VxK, w_TxK = residuals

    def step(carry, xs):
        r_KxK, s_VxK, abar_KxK, sbar_VxK = carry
        k, v, q, w, g = xs
        z = _mv(r_KxK, q)
        q_bar = _mv(r_KxK, _mv(g, s_VxK))
        sbar_VxK = sbar_VxK + jnp.outer(g, z)
        abar_KxK = abar_KxK - jnp.outer(q_bar, z)
        k_bar = _mv(abar_KxK + abar_KxK.T, k) + _mv(v, sbar_VxK)
        v_bar = _mv(sbar_VxK, k)
        # Undo the forward step: R_{t-1}, S_{t-1}.
        r_KxK = r_KxK + jnp.outer(w, w)
        s_VxK = s_VxK - jnp.outer(v, k)
        return (r_KxK, s_VxK, abar_KxK, sbar_VxK), (k_bar, v_bar, q_bar)

    init = (r_KxK, s_VxK, jnp.zeros_like(r_KxK), jnp.zeros_like(s_VxK))
    xs = (keys_TxK, values_TxV, queries_TxK, w_TxK, g_TxV)
    (_, _, abar_KxK, _), (k_bar, v_bar, q_bar) = jax.lax.scan(step, init, xs, reverse=True)
    lam_bar = -jnp.trace(abar_KxK) / lam**2
    return k_bar, v_bar, q_bar, lam_bar.astype(lam.dtype)


_scan.defvjp(_scan_fwd, _scan_bwd)


def _promote(*arrays: jax.Array | float) -> tuple[jax.Array, ...]:
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


def mesa_scan(keys_TxK: jax.Array, values_TxV: jax.Array, queries_TxK: jax.Array, lam: jax.Array | float) -> jax.Array:
    """`[T, V]`: `o_t = (sum_{i<=t} v_i k_i^T)(sum_{i<=t} k_i k_i^T + I / lam)^-1 q_t` by the causal
    Sherman-Morrison recursion from `R_0 = lam I` (docs/science.md section 3), `O(T K (K + V))`.

    Differentiable in all four arguments by a custom VJP that runs the recursion backwards
    (`_scan_bwd`): memory linear in `T`, where autodiff of the scan would store `T` inverses."""
    return _scan(*_promote(keys_TxK, values_TxV, queries_TxK, lam))


def mesa_solve(keys_TxK: jax.Array, values_TxV: jax.Array, queries_TxK: jax.Array, lam: jax.Array | float) -> jax.Array:
    """`[T, V]`, the same as `mesa_scan`, with all positions at once: prefix Gram matrices
    `A_t = sum_{i<=t} k_i k_i^T + I / lam` by a cumulative sum, `z_t = A_t^-1 q_t` by one SPD solve
    per position (`icl_gd.linalg.spd_solve`, vmapped) and `o_t = S_t z_t` with `S_t` the prefix sum
    of `v_i k_i^T`. `O(T K^3)` work in parallel over `T`, `O(T K (K + V))` memory.

    The solve is wrapped in `lax.custom_linear_solve`, so the backward pass is one more solve with
    the same (symmetric) matrix instead of autodiff through the elimination's `K` steps."""
    keys_TxK, values_TxV, queries_TxK, lam = _promote(keys_TxK, values_TxV, queries_TxK, lam)
    n_k = keys_TxK.shape[1]
    eye = jnp.eye(n_k, dtype=keys_TxK.dtype)
    gram_TxKxK = jnp.cumsum(jnp.einsum("ti,tj->tij", keys_TxK, keys_TxK), axis=0) + eye / lam
    s_TxVxK = jnp.cumsum(jnp.einsum("tv,tk->tvk", values_TxV, keys_TxK), axis=0)

    def solve(a_KxK: jax.Array, q: jax.Array) -> jax.Array:
        return jax.lax.custom_linear_solve(lambda x: _mv(a_KxK, x), q, lambda _, b: spd_solve(a_KxK, b), symmetric=True)

    z_TxK = jax.vmap(solve)(gram_TxKxK, queries_TxK)
    return jnp.einsum("tvk,tk->tv", s_TxVxK, z_TxK, precision=_HIGHEST)


IMPLEMENTATIONS: dict[str, MesaFn] = {"scan": mesa_scan, "solve": mesa_solve}
