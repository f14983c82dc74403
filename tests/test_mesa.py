"""The mesa-layer's causal ridge regression (icl_gd.mesa, docs/science.md section 3): values, gradients,
vmapping and causality of both implementations against a direct float64 ridge solve per position."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import mesa

T, K, V = 12, 4, 3
LAMS = (1e-2, 1.0, 30.0)
IMPLS = sorted(mesa.IMPLEMENTATIONS)
# Compiled once per implementation and dtype, reused by every test and every `lam` (a traced argument).
JIT = {name: jax.jit(fn) for name, fn in mesa.IMPLEMENTATIONS.items()}


def sample(seed: int, t: int = T) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(t, K)), rng.normal(size=(t, V)), rng.normal(size=(t, K))


def ridge_per_position(keys: np.ndarray, values: np.ndarray, queries: np.ndarray, lam: float) -> np.ndarray:
    """`(sum_{i<=t} v_i k_i^T)(sum_{i<=t} k_i k_i^T + I / lam)^-1 q_t` by a float64 solve per position."""
    out = []
    for t in range(len(keys)):
        k, v = keys[: t + 1], values[: t + 1]
        z = np.linalg.solve(k.T @ k + np.eye(keys.shape[1]) / lam, queries[t])
        out.append(v.T @ (k @ z))
    return np.stack(out)


def float64():
    """The context manager that turns on float64 (`jax.enable_x64` in recent JAX, else the older
    `jax.experimental.enable_x64`)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # pyright: ignore[reportAttributeAccessIssue]

    return enable_x64()


def f32(*arrays: np.ndarray) -> list[jax.Array]:
    return [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_a_direct_ridge_solve_per_position(impl, lam):
    keys, values, queries = sample(0)
    expected = ridge_per_position(keys, values, queries, lam)
    out = JIT[impl](*f32(keys, values, queries), lam)
    assert out.shape == (T, V) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("lam", LAMS)
def test_implementations_agree(lam):
    args = f32(*sample(1))
    np.testing.assert_allclose(JIT["scan"](*args, lam), JIT["solve"](*args, lam), rtol=1e-4, atol=1e-5)


@jax.jit(static_argnums=0)
def loss(fn, keys, values, queries, lam, weights):
    """A generic scalar function of the output (a non-linear one, so the cotangents vary)."""
    return jnp.sum(jnp.tanh(fn(keys, values, queries, lam)) * weights)


grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)


@pytest.mark.parametrize("lam", [0.1, 3.0])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_finite_differences_and_autodiff(impl, lam):
    """In float64: the gradient with respect to keys, values, queries and `lam` against central
    differences along random directions, and against `jax.grad` of the plain recursion."""
    keys, values, queries = sample(2)
    weights = np.random.default_rng(3).normal(size=(T, V))
    with float64():
        args = (*(jnp.asarray(a) for a in (keys, values, queries)), jnp.asarray(lam))
        grads = grad(mesa.IMPLEMENTATIONS[impl], *args, weights)
        reference = grad(mesa.mesa_scan_autodiff, *args, weights)
        rng, eps = np.random.default_rng(4), 1e-6
        for i, (g, g_ref) in enumerate(zip(grads, reference, strict=True)):
            assert g.dtype == jnp.float64 and g.shape == args[i].shape
            np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-11)
            for _ in range(3):
                direction = rng.normal(size=args[i].shape)
                shifted = [list(args), list(args)]
                shifted[0][i] = args[i] + eps * direction
                shifted[1][i] = args[i] - eps * direction
                plus, minus = (loss(mesa.IMPLEMENTATIONS[impl], *a, weights) for a in shifted)
                numeric = (plus - minus) / (2 * eps)
                np.testing.assert_allclose(jnp.sum(g * direction), numeric, rtol=1e-6, atol=1e-9)


def test_custom_vjp_matches_autodiff_in_float32():
    args, weights = f32(*sample(5)), jnp.asarray(np.random.default_rng(6).normal(size=(T, V)), jnp.float32)
    for g, g_ref in zip(
        grad(mesa.mesa_scan, *args, jnp.float32(2.0), weights),
        grad(mesa.mesa_scan_autodiff, *args, jnp.float32(2.0), weights),
        strict=True,
    ):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * float(jnp.abs(g_ref).max()))


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_heads_and_batch(impl):
    """Batch `[B, H, T, *]` with one `lam` per head, as the model calls it, against a loop; and the
    gradient of `lam` per head under vmap."""
    fn = mesa.IMPLEMENTATIONS[impl]
    b, h = 3, 2
    rng = np.random.default_rng(7)
    keys, values, queries = (jnp.asarray(rng.normal(size=(b, h, T, n)), jnp.float32) for n in (K, V, K))
    lam_H = jnp.asarray([0.5, 4.0], jnp.float32)
    batched = jax.jit(jax.vmap(jax.vmap(fn), in_axes=(0, 0, 0, None)))
    out = batched(keys, values, queries, lam_H)
    assert out.shape == (b, h, T, V)
    for i in range(b):
        for j in range(h):
            expected = ridge_per_position(
                *(np.asarray(a[i, j], np.float64) for a in (keys, values, queries)), float(lam_H[j])
            )
            np.testing.assert_allclose(out[i, j], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    lam_grad = jax.grad(lambda lam: jnp.sum(batched(keys, values, queries, lam) ** 2))(lam_H)
    lam_grad_ref = jax.grad(
        lambda lam: jnp.sum(
            jax.vmap(jax.vmap(mesa.mesa_scan_autodiff), in_axes=(0, 0, 0, None))(keys, values, queries, lam) ** 2
        )
    )(lam_H)
    np.testing.assert_allclose(lam_grad, lam_grad_ref, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_output_at_t_ignores_later_tokens(impl):
    fn, t = JIT[impl], 5
    keys, values, queries = sample(8)
    out = fn(*f32(keys, values, queries), jnp.float32(1.0))
    later = np.random.default_rng(9)
    changed = [a.copy() for a in (keys, values, queries)]
    for a in changed:
        a[t + 1 :] += 3 * later.normal(size=a[t + 1 :].shape)
    out_changed = fn(*f32(*changed), jnp.float32(1.0))
    np.testing.assert_allclose(out_changed[: t + 1], out[: t + 1], rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(np.asarray(out_changed[t + 1 :] - out[t + 1 :])).max(axis=1) > 1e-3)
    # The same through the gradient: the loss at position t has no gradient from later tokens.
    grads = jax.grad(lambda *a: jnp.sum(fn(*a, 1.0)[t] ** 2), argnums=(0, 1, 2))(*f32(keys, values, queries))
    for g in grads:
        assert np.all(np.asarray(g[t + 1 :]) == 0) and np.any(np.asarray(g[: t + 1]) != 0)


def test_scan_backward_memory_is_linear_in_length():
    """The custom VJP stores no `T` inverses: its compiled temporary memory stays far below the
    `T K^2` floats that autodiff of the scan keeps, and grows about linearly in `T`."""
    n_k = 16

    def temp_bytes(fn, t: int) -> int | None:
        args = [jax.ShapeDtypeStruct((t, n), jnp.float32) for n in (n_k, n_k, n_k)]
        grad = jax.jit(jax.grad(lambda k, v, q, lam: jnp.sum(fn(k, v, q, lam) ** 2), argnums=(0, 3)))
        analysis = grad.lower(*args, jax.ShapeDtypeStruct((), jnp.float32)).compile().memory_analysis()
        return None if analysis is None else analysis.temp_size_in_bytes

    custom = temp_bytes(mesa.mesa_scan, 512)
    assert custom is not None and custom < 512 * n_k * n_k * 4 / 4  # XLA's CPU and GPU backends report it
    autodiff = temp_bytes(mesa.mesa_scan_autodiff, 512)
    assert autodiff is not None and autodiff > 512 * n_k * n_k * 4
