"""In-context regression tasks, sampled on device (SPEC section 1).

A batch of tasks is a `Tasks` of arrays with a leading task axis; every task draws its own
weight vector. All samplers are pure functions of a key and static sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Tasks(NamedTuple):
    """`x_BxNxd` context inputs, `y_BxN` context labels, `xq_Bxd` query, `yq_B` its label."""

    x: jax.Array
    y: jax.Array
    xq: jax.Array
    yq: jax.Array


class InputLaw(NamedTuple):
    """Moments of a zero-mean input coordinate: variance and fourth moment (SPEC section 6)."""

    var: float
    m4: float


def input_law(x_dist: str, x_scale: float) -> InputLaw:
    """Variance and fourth moment of one input coordinate for each supported law."""
    s = float(x_scale)
    if x_dist == "uniform":  # U(-s, s)
        return InputLaw(s**2 / 3, s**4 / 5)
    if x_dist == "gaussian":  # N(0, s^2)
        return InputLaw(s**2, 3 * s**4)
    if x_dist == "laplace":  # Laplace(0, b=s)
        return InputLaw(2 * s**2, 24 * s**4)
    if x_dist == "exponential":  # s * (Exp(1) - 1), centred
        return InputLaw(s**2, 9 * s**4)
    raise ValueError(f"task.x_dist: unknown law {x_dist!r}")


def sample_inputs(key: jax.Array, shape: tuple[int, ...], x_dist: str, x_scale: float) -> jax.Array:
    if x_dist == "uniform":
        return jax.random.uniform(key, shape, minval=-x_scale, maxval=x_scale)
    if x_dist == "gaussian":
        return x_scale * jax.random.normal(key, shape)
    if x_dist == "laplace":
        return x_scale * jax.random.laplace(key, shape)
    if x_dist == "exponential":
        return x_scale * (jax.random.exponential(key, shape) - 1.0)
    raise ValueError(f"task.x_dist: unknown law {x_dist!r}")


def sample_linear(
    key: jax.Array,
    n_tasks: int,
    *,
    dim: int,
    n_context: int,
    x_dist: str = "uniform",
    x_scale: float = 0.5,
    w_std: float = 1.0,
    noise_std: float = 0.0,
    distractors: int = 0,
) -> Tasks:
    """Linear regression tasks `y = w . x (+ noise)`, `w ~ N(0, w_std^2 I)`, one `w` per task.

    `distractors` context labels per task, at random positions, are replaced by Gaussian noise
    with the clean labels' standard deviation.
    """
    k_w, k_x, k_noise, k_pos, k_fake = jax.random.split(key, 5)
    w = w_std * jax.random.normal(k_w, (n_tasks, dim))
    x_all = sample_inputs(k_x, (n_tasks, n_context + 1, dim), x_dist, x_scale)
    y_all = jnp.einsum("bnd,bd->bn", x_all, w)
    y_all = y_all + noise_std * jax.random.normal(k_noise, y_all.shape)
    x, xq = x_all[:, :n_context], x_all[:, n_context]
    y, yq = y_all[:, :n_context], y_all[:, n_context]
    if distractors:
        label_std = w_std * jnp.sqrt(dim * input_law(x_dist, x_scale).var + (noise_std / w_std) ** 2)
        _, fake_NxK = jax.lax.top_k(jax.random.uniform(k_pos, (n_tasks, n_context)), distractors)  # a random k-subset
        is_fake = jnp.any(jnp.arange(n_context) == fake_NxK[..., None], axis=-2)
        y = jnp.where(is_fake, label_std * jax.random.normal(k_fake, y.shape), y)
    return Tasks(x, y, xq, yq)


def sample_sine(key: jax.Array, n_tasks: int, *, n_context: int, noise_std: float = 0.0) -> Tasks:
    """Non-linear 1-d tasks `y = a sin(x + phi)`, `a ~ U(0.1, 0.5)`, `phi ~ U(0, pi)`, `x ~ U(-5, 5)`."""
    k_a, k_phi, k_x, k_noise = jax.random.split(key, 4)
    a = jax.random.uniform(k_a, (n_tasks, 1), minval=0.1, maxval=0.5)
    phi = jax.random.uniform(k_phi, (n_tasks, 1), minval=0.0, maxval=jnp.pi)
    x_all = jax.random.uniform(k_x, (n_tasks, n_context + 1, 1), minval=-5.0, maxval=5.0)
    y_all = a * jnp.sin(x_all[..., 0] + phi)
    y_all = y_all + noise_std * jax.random.normal(k_noise, y_all.shape)
    return Tasks(x_all[:, :n_context], y_all[:, :n_context], x_all[:, n_context], y_all[:, n_context])


def sampler(task_cfg, **changes):
    """A function `key, n_tasks -> Tasks` for a task config (fields overridable by `changes`)."""
    params = {**dict(task_cfg), **changes}
    if params["kind"] == "sine":
        return lambda key, n: sample_sine(key, n, n_context=params["n_context"], noise_std=params["noise_std"])
    kwargs = {k: params[k] for k in ("dim", "n_context", "x_dist", "x_scale", "w_std", "noise_std", "distractors")}
    return lambda key, n: sample_linear(key, n, **kwargs)
