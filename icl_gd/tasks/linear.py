"""`task=linear`: in-context linear regression `y = w . x (+ noise)`, one `w ~ N(0, s_w^2 I)` per
task, with input laws, label noise, distractor labels (docs/science.md section 1) and non-isotropic
inputs of a given covariance (docs/science.md section 10)."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd.tasks.base import register
from icl_gd.tasks.lds import haar_orthogonal
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


def unit_scale(x_dist: str) -> float:
    """The scale at which law `x_dist` has unit variance."""
    return 1.0 / math.sqrt(input_law(x_dist, 1.0).var)


@functools.cache
def input_map(x_cov: tuple[float, ...], x_rotation: int | None) -> np.ndarray:
    """`B = R diag(sqrt(x_cov))` `[d, d]`, so that `x = B z` (`z` of unit variance per coordinate)
    has covariance `Sigma = B B^T = R diag(x_cov) R^T` (docs/science.md section 10). `R` is the
    identity for `x_rotation = None`, else Haar-random from a threefry `key(x_rotation)` (whatever
    the run's `prng`): a constant of the task, computed once, outside any trace."""
    dim = len(x_cov)
    with jax.ensure_compile_time_eval():
        rotation = (
            np.eye(dim)
            if x_rotation is None
            else np.asarray(haar_orthogonal(jax.random.key(x_rotation, impl="threefry2x32"), 1, dim)[0])
        )
    return (rotation * np.sqrt(np.asarray(x_cov))[None, :]).astype(np.float32)


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
    x_map: np.ndarray | None = None,
) -> Tasks:
    """Linear regression tasks `y = w . x (+ noise)`, `w ~ N(0, w_std^2 I)`, one `w` per task.

    Inputs are i.i.d. coordinates of law `x_dist` at scale `x_scale`, or, with `x_map` (`B`,
    `[d, d]`), `x = B z` with `z`'s coordinates of law `x_dist` at unit variance (`x_scale` unused).
    `distractors` context labels per task, at random positions, are replaced by Gaussian noise
    with the clean labels' standard deviation.
    """
    k_w, k_x, k_noise, k_pos, k_fake = jax.random.split(key, 5)
    w = w_std * jax.random.normal(k_w, (n_tasks, dim))
    shape = (n_tasks, n_context + 1, dim)
    if x_map is None:
        x_all = sample_inputs(k_x, shape, x_dist, x_scale)
        trace_cov = dim * input_law(x_dist, x_scale).var
    else:
        z_all = sample_inputs(k_x, shape, x_dist, unit_scale(x_dist))
        # Full float32 precision: GPUs may round matmul operands to TF32, which would blur the covariance.
        x_all = jnp.einsum("bnk,dk->bnd", z_all, x_map, precision=jax.lax.Precision.HIGHEST)
        trace_cov = float(np.sum(np.square(x_map, dtype=np.float64)))
    y_all = jnp.einsum("bnd,bd->bn", x_all, w)
    if noise_std:
        y_all = y_all + noise_std * jax.random.normal(k_noise, y_all.shape)
    x, xq = x_all[:, :n_context], x_all[:, n_context]
    y, yq = y_all[:, :n_context], y_all[:, n_context]
    if distractors:
        label_std = w_std * jnp.sqrt(trace_cov + (noise_std / w_std) ** 2)
        _, fake_NxK = jax.lax.top_k(jax.random.uniform(k_pos, (n_tasks, n_context)), distractors)  # a random k-subset
        is_fake = jnp.any(jnp.arange(n_context) == fake_NxK[..., None], axis=-2)
        y = jnp.where(is_fake, label_std * jax.random.normal(k_fake, y.shape), y)
    return Tasks(x, y, xq, yq)


@register
@dataclass(frozen=True)
class LinearRegression(Regression):
    """`x_cov` (the eigenvalues of the input covariance) and `x_rotation` (the seed of its
    eigenbasis) make the inputs non-isotropic (docs/science.md section 10); the task then also
    declares the reference `precond_gd`."""

    name = "linear"
    x_dist: str = "uniform"
    x_scale: float = 0.5
    w_std: float = 1.0
    noise_std: float = 0.0
    distractors: int = 0
    x_cov: tuple[float, ...] | None = None
    x_rotation: int | None = None

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
            x_cov=None if task_cfg.x_cov is None else tuple(float(c) for c in task_cfg.x_cov),
            x_rotation=None if task_cfg.x_rotation is None else int(task_cfg.x_rotation),
        )

    # Per task, not per kind: `precond_gd` only where the inputs are non-isotropic.
    @property
    def references(self) -> tuple[str, ...]:  # pyright: ignore[reportIncompatibleVariableOverride]
        """GD (primary), then preconditioned GD where the inputs are non-isotropic, GD++, OLS, ridge."""
        precond = () if self.x_cov is None else ("precond_gd",)
        return ("gd", *precond, "gdpp", "ols", "ridge")

    def shifted(self, **changes) -> LinearRegression:
        """The same task with some fields of its law changed (out-of-distribution sets)."""
        return dataclasses.replace(self, **changes)

    def scaled(self, factor: float) -> LinearRegression:
        """The same task with the inputs' standard deviation multiplied by `factor`."""
        if self.x_cov is None:
            return self.shifted(x_scale=self.x_scale * factor)
        return self.shifted(x_cov=tuple(c * factor**2 for c in self.x_cov))

    @property
    def x_map(self) -> np.ndarray | None:
        """`B` with `x = B z` when the inputs are non-isotropic (`input_map`), else None."""
        return None if self.x_cov is None else input_map(self.x_cov, self.x_rotation)

    @property
    def covariance(self) -> np.ndarray:
        """The inputs' covariance `Sigma` `[d, d]` (float64): `B B^T`, or the law's variance times `I`."""
        b = self.x_map
        if b is None:
            return input_law(self.x_dist, self.x_scale).var * np.eye(self.dim)
        b = b.astype(np.float64)
        return b @ b.T

    @property
    def kurtosis(self) -> float:
        """The fourth moment of an input coordinate's law at unit variance (3 for Gaussian inputs)."""
        var, m4 = input_law(self.x_dist, 1.0)
        return m4 / var**2

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
            x_map=self.x_map,
        )
