"""`task=sine`: non-linear 1-d regression `y = a sin(x + phi)`, `a ~ U(0.1, 0.5)`,
`phi ~ U(0, pi)`, `x ~ U(-5, 5)` (docs/science.md section 1), amplitude and phase drawn
independently or coupled as the paper's code draws them (`a = 0.1 + 0.4 phi / pi`, section 9)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from icl_gd.tasks.base import register
from icl_gd.tasks.regression import Regression, Tasks


def sample_sine(
    key: jax.Array, n_tasks: int, *, n_context: int, noise_std: float = 0.0, coupled: bool = False
) -> Tasks:
    """`n_tasks` sine tasks, each with its own amplitude and phase; `coupled`: both from one
    uniform draw `u` (`a = 0.1 + 0.4 u`, `phi = pi u`), as the paper's code draws them from one key."""
    k_a, k_phi, k_x, k_noise = jax.random.split(key, 4)
    if coupled:
        u = jax.random.uniform(k_a, (n_tasks, 1))
        a, phi = 0.1 + 0.4 * u, jnp.pi * u
    else:
        a = jax.random.uniform(k_a, (n_tasks, 1), minval=0.1, maxval=0.5)
        phi = jax.random.uniform(k_phi, (n_tasks, 1), minval=0.0, maxval=jnp.pi)
    x_all = jax.random.uniform(k_x, (n_tasks, n_context + 1, 1), minval=-5.0, maxval=5.0)
    y_all = a * jnp.sin(x_all[..., 0] + phi)
    y_all = y_all + noise_std * jax.random.normal(k_noise, y_all.shape)
    return Tasks(x_all[:, :n_context], y_all[:, :n_context], x_all[:, n_context], y_all[:, n_context])


@register
@dataclass(frozen=True)
class SineRegression(Regression):
    name = "sine"
    noise_std: float = 0.0
    coupled: bool = False  # `task.amplitude_phase=coupled`

    @classmethod
    def from_config(cls, task_cfg) -> SineRegression:
        return cls(
            dim=1,
            n_context=int(task_cfg.n_context),
            tokens=task_cfg.tokens.name,
            noise_std=float(task_cfg.noise_std),
            coupled=task_cfg.amplitude_phase.name == "coupled",
        )

    @property
    def ridge_lambda(self) -> float:
        return self.noise_std**2  # no prior on the function: the noise alone sets the penalty

    def draw(self, key: jax.Array, n: int) -> Tasks:
        return sample_sine(key, n, n_context=self.n_context, noise_std=self.noise_std, coupled=self.coupled)
