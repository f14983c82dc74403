"""`task=linear`: in-context linear regression `y = w . x (+ noise)`, one `w ~ N(0, s_w^2 I)` per
task, with input laws, label noise and distractor labels (docs/science.md section 1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from icl_gd.tasks.base import register
from icl_gd.tasks.regression import Regression, Tasks


class InputLaw(NamedTuple):
    """Moments of a zero-mean input coordinate: variance and fourth moment (docs/science.md section 6)."""

    var: float
    m4: float


# Each law at scale s: (sampler (key, shape, s) -> array, moments (s) -> InputLaw).
INPUT_LAWS = {
    "uniform": (
        lambda key, shape, s: jax.random.uniform(key, shape, minval=-s, maxval=s),  # U(-s, s)
        lambda s: InputLaw(s**2 / 3, s**4 / 5),
    ),
    "gaussian": (lambda key, shape, s: s * jax.random.normal(key, shape), lambda s: InputLaw(s**2, 3 * s**4)),
    "laplace": (lambda key, shape, s: s * jax.random.laplace(key, shape), lambda s: InputLaw(2 * s**2, 24 * s**4)),
    "exponential": (
        lambda key, shape, s: s * (jax.random.exponential(key, shape) - 1.0),  # centred
        lambda s: InputLaw(s**2, 9 * s**4),
    ),
}


def input_law(x_dist: str, x_scale: float) -> InputLaw:
    """Variance and fourth moment of one input coordinate for each supported law."""
    return INPUT_LAWS[x_dist][1](float(x_scale))


def sample_inputs(key: jax.Array, shape: tuple[int, ...], x_dist: str, x_scale: float) -> jax.Array:
    return INPUT_LAWS[x_dist][0](key, shape, x_scale)


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


@register
@dataclass(frozen=True)
class LinearRegression(Regression):
    name = "linear"
    x_dist: str = "uniform"
    x_scale: float = 0.5
    w_std: float = 1.0
    noise_std: float = 0.0
    distractors: int = 0

    @classmethod
    def from_config(cls, task_cfg) -> LinearRegression:
        return cls(
            dim=int(task_cfg.dim),
            n_context=int(task_cfg.n_context),
            tokens=task_cfg.tokens.name,
            x_dist=task_cfg.x_dist.name,
            x_scale=float(task_cfg.x_scale),
            w_std=float(task_cfg.w_std),
            noise_std=float(task_cfg.noise_std),
            distractors=int(task_cfg.distractors),
        )

    def shifted(self, **changes) -> LinearRegression:
        """The same task with some fields of its law changed (out-of-distribution sets)."""
        return dataclasses.replace(self, **changes)

    @property
    def ridge_lambda(self) -> float:
        return self.noise_std**2 / self.w_std**2

    def draw(self, key: jax.Array, n: int) -> Tasks:
        return sample_linear(
            key,
            n,
            dim=self.dim,
            n_context=self.n_context,
            x_dist=self.x_dist,
            x_scale=self.x_scale,
            w_std=self.w_std,
            noise_std=self.noise_std,
            distractors=self.distractors,
        )
