"""`task=lds`: autoregressive prediction of linear dynamical systems (docs/science.md section 8).

One sequence: `s_1 ~ U(-1, 1)^D`, `s_{t+1} = clip(W* s_t + sigma eps, -c, c)` with a transition
`W*` of its own. At position `t` the model sees `s_1..s_t` through causal attention and predicts
`s_{t+1}`; every position is scored. Constructed tokens `e_t = (0, s_t, s_t, s_{t-1})` (`s_0 = 0`):
the prediction is read from the first slot, the third slot is the query `s_t` and the pair
`(s_{t-1}, s_t)` of the fourth and second slots is the regression example the token adds. Raw
tokens (`task.tokens=raw`) are the states `s_t` themselves, for models with an input projection.
The batch's `context` is the states `[B, T+1, D]`: the references fit the pairs `(s_i, s_{i+1})`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from icl_gd.tasks.base import Batch, Layout, Mask, register


def haar_orthogonal(key: jax.Array, n: int, dim: int) -> jax.Array:
    """`n` Haar-random orthogonal `dim x dim` matrices: Q of a Gaussian matrix's QR, with the
    signs of R's diagonal moved into Q (Mezzadri 2007)."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, dim, dim)))
    return q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]


def contracting(key: jax.Array, n: int, dim: int, top: float) -> jax.Array:
    """Symmetric transitions `Q diag(lam) Q^T` with eigenvalues `lam ~ U[0.3, top]`, one equal to `top`."""
    k_q, k_lam = jax.random.split(key)
    q = haar_orthogonal(k_q, n, dim)
    lam = jax.random.uniform(k_lam, (n, dim), minval=0.3, maxval=top).at[:, 0].set(top)
    return jnp.einsum("nij,nj,nkj->nik", q, lam, q)


def rollout(w_BxHxH: jax.Array, h1_BxH: jax.Array, noise_BxTxH: jax.Array, clip: float) -> jax.Array:
    """States `h_1..h_{T+1}` of `h_{t+1} = clip(W h_t + noise_t)`: `[B, T+1, H]`."""

    def step(h, noise):
        h_next = jnp.clip(jnp.einsum("bij,bj->bi", w_BxHxH, h) + noise, -clip, clip)
        return h_next, h_next

    _, rest = jax.lax.scan(step, h1_BxH, jnp.swapaxes(noise_BxTxH, 0, 1))
    return jnp.concatenate([h1_BxH[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)


def constructed_tokens(states_Tp1xD: jax.Array) -> jax.Array:
    """`e_t = (0, s_t, s_t, s_{t-1})` for `t = 1..T`: `[T, 4D]` (the last state is only a target)."""
    s = states_Tp1xD[:-1]
    previous = jnp.concatenate([jnp.zeros_like(s[:1]), s[:-1]])
    return jnp.concatenate([jnp.zeros_like(s), s, s, previous], axis=-1)


@register
@dataclass(frozen=True)
class LinearDynamics:
    """Sequences of `length` states of size `state_dim` from the configured `variant`."""

    name: ClassVar[str] = "lds"
    references: ClassVar[tuple[str, ...]] = ("gd", "ridge_online", "richardson", "newton_schulz", "chebyshev")
    sensitivities: ClassVar[bool] = False  # P x D Jacobian blocks per sequence: see docs/science.md section 5
    sequence_sensitivities: ClassVar[bool] = True
    prng: ClassVar[str] = "threefry2x32"  # Gaussian draws: cheaper with threefry than with Philox bits

    state_dim: int = 10
    length: int = 50
    noise_std: float = 0.01
    clip: float = 10.0
    variant: str = "full"
    hidden_dim: int = 15
    obs_noise_std: float = 0.01
    contracting_max: float = 0.9
    transition_seed: int = 0
    ridge_lambda: float = 1e-3
    tokens: str = "constructed"

    @classmethod
    def from_config(cls, task_cfg) -> LinearDynamics:
        return cls(
            state_dim=int(task_cfg.state_dim),
            length=int(task_cfg.length),
            noise_std=float(task_cfg.noise_std),
            clip=float(task_cfg.clip),
            variant=task_cfg.variant.name,
            hidden_dim=int(task_cfg.hidden_dim),
            obs_noise_std=float(task_cfg.obs_noise_std),
            contracting_max=float(task_cfg.contracting_max),
            transition_seed=int(task_cfg.transition_seed),
            ridge_lambda=float(task_cfg.ridge_lambda),
            tokens=task_cfg.tokens.name,
        )

    @property
    def layout(self) -> Layout:
        d, raw = self.state_dim, self.tokens == "raw"
        return Layout(
            length=self.length,
            width=d if raw else 4 * d,
            input_dim=d,
            query_slot=0 if raw else 2 * d,
            readout=0,
            output_dim=d,
            readout_sign=1.0,
            scored=tuple(range(self.length)),
            mask=Mask(causal=True),
        )

    def transitions(self, key: jax.Array, n: int) -> jax.Array:
        """The transitions of `n` sequences, `[n, H, H]` (H = `hidden_dim` for `partial`, else `state_dim`)."""
        if self.variant == "fixed":
            one = haar_orthogonal(jax.random.key(self.transition_seed), 1, self.state_dim)
            return jnp.broadcast_to(one, (n, self.state_dim, self.state_dim))
        if self.variant == "contracting":
            return contracting(key, n, self.state_dim, self.contracting_max)
        return haar_orthogonal(key, n, self.hidden_dim if self.variant == "partial" else self.state_dim)

    def states(self, key: jax.Array, n: int) -> jax.Array:
        """`n` sequences of states (observations, for `partial`) `s_1..s_{T+1}`: `[n, T+1, D]`."""
        k_w, k_s1, k_noise, k_obs, k_obs_noise = jax.random.split(key, 5)
        w = self.transitions(k_w, n)
        hidden = w.shape[-1]
        h1 = jax.random.uniform(k_s1, (n, hidden), minval=-1.0, maxval=1.0)
        h = rollout(w, h1, self.noise_std * jax.random.normal(k_noise, (n, self.length, hidden)), self.clip)
        if self.variant != "partial":
            return h
        observe = 0.5 * jax.random.normal(k_obs, (n, self.state_dim, hidden))
        noise = self.obs_noise_std * jax.random.normal(k_obs_noise, (n, self.length + 1, self.state_dim))
        return jnp.einsum("boh,bth->bto", observe, h) + noise

    def batch(self, states_BxTp1xD: jax.Array) -> Batch:
        """The model's tokens for state sequences `[B, T+1, D]`, queries `s_t` and targets `s_{t+1}`."""
        raw = self.tokens == "raw"
        tokens = states_BxTp1xD[:, :-1] if raw else jax.vmap(constructed_tokens)(states_BxTp1xD)
        return Batch(tokens, states_BxTp1xD[:, :-1], states_BxTp1xD[:, 1:], states_BxTp1xD)

    def sample(self, key: jax.Array, n: int) -> Batch:
        return self.batch(self.states(key, n))

    def zero_loss(self) -> float | None:
        """Loss of the zero predictor at `t = 1` for `full` and `fixed` (`s_2 = W* s_1`, `|s_1|^2 = D/3`): `D/6`."""
        return self.state_dim / 6 if self.variant in ("full", "fixed") else None
