"""Linear probes of the residual stream (docs/science.md section 8, "Probes"): what a trained model
holds at each layer and position, read by least squares fitted across sequences and scored on
held-out ones.

A probe maps the residual vector of one (layer, position) to a target with a bias; it is fitted on
standardised features with a small ridge, by the normal equations and `linalg.spd_solve`, so a
program vmapped over layers and positions holds no LAPACK call (see `icl_gd.linalg`). Scores are
pooled over the target's coordinates: `R^2 = 1 - SSE / SST` on the held-out sequences (NaN where
the target does not vary, e.g. `s_0 = 0`), MSE per coordinate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd import linalg

# Relative to the unit diagonal of the standardised features' Gram matrix: far above float32's
# rounding (so eliminating duplicated features, as in constructed tokens, stays stable) and far
# below the features' spread (a probe's R^2 moves by about its square).
RIDGE = 1e-5


class Scores(NamedTuple):
    """Held-out `r2` and `mse` of one target's probes, `[..., L, T]` (layers, positions); on the
    host after `jax.device_get`."""

    r2: jax.Array | np.ndarray
    mse: jax.Array | np.ndarray


def probe_columns(
    fit_x_NxF: jax.Array, fit_y_NxO: jax.Array, test_x_MxF: jax.Array, test_y_MxO: jax.Array, ridge: float = RIDGE
) -> tuple[jax.Array, jax.Array]:
    """Fit `y = x C + b` by ridge least squares on the fit set and score it on the test set: per
    output column, the mean squared error and the target's variance on the test set, `[O]` each."""
    mu_x = fit_x_NxF.mean(0)
    sd = fit_x_NxF.std(0)
    sd = jnp.where(sd > 1e-6 * sd.max(), sd, 1.0)  # constant features (an empty slot) stay at 0
    standard = lambda x: (x - mu_x) / sd
    xs, mu_y = standard(fit_x_NxF), fit_y_NxO.mean(0)
    gram = xs.T @ xs / xs.shape[0] + ridge * jnp.eye(xs.shape[1])
    coef_FxO = jax.vmap(linalg.spd_solve, in_axes=(None, 1), out_axes=1)(gram, xs.T @ (fit_y_NxO - mu_y) / xs.shape[0])
    pred = standard(test_x_MxF) @ coef_FxO + mu_y
    return jnp.mean((pred - test_y_MxO) ** 2, 0), jnp.var(test_y_MxO, 0)


def probe_grid(
    fit_res_NxLxTxW: jax.Array,
    fit_targets: Mapping[str, jax.Array],
    test_res_MxLxTxW: jax.Array,
    test_targets: Mapping[str, jax.Array],
    ridge: float = RIDGE,
) -> dict[str, Scores]:
    """Probes at every layer and position of residual streams `[N, L, T, W]` for targets `[N, T, D]`
    (by name): one solve per (layer, position) for all targets at once. Returns `Scores` `[L, T]`."""
    names = list(fit_targets)
    ends = np.cumsum([fit_targets[n].shape[-1] for n in names])
    fit_y, test_y = (jnp.concatenate([t[n] for n in names], -1) for t in (fit_targets, test_targets))
    columns = lambda fx, fy, tx, ty: probe_columns(fx, fy, tx, ty, ridge)
    per_position = jax.vmap(columns, in_axes=(1, 1, 1, 1))
    per_layer = jax.vmap(per_position, in_axes=(1, None, 1, None))
    mse_LxTxO, var_LxTxO = per_layer(fit_res_NxLxTxW, fit_y, test_res_MxLxTxW, test_y)
    out = {}
    for name, part_mse, part_var in zip(
        names, jnp.split(mse_LxTxO, ends[:-1], -1), jnp.split(var_LxTxO, ends[:-1], -1), strict=True
    ):
        sse, sst = part_mse.sum(-1), part_var.sum(-1)
        out[name] = Scores(jnp.where(sst > 0, 1.0 - sse / jnp.where(sst > 0, sst, 1.0), jnp.nan), part_mse.mean(-1))
    return out


def preconditioned_inputs(states_NxTp1xD: np.ndarray, lam: float) -> np.ndarray:
    """`(sum_{i<t} s_i s_i^T + lam I)^{-1} s_t` at each position `t = 1..T`, `[N, T, D]`: the input
    a mesa-optimiser preconditions, over the pairs `i < t` the references use (docs/science.md
    section 8). In float64 numpy: with `lam = 1e-3` the matrix is ill-conditioned at early positions."""
    s = np.asarray(states_NxTp1xD, np.float64)[:, :-1]
    outer = np.einsum("nti,ntj->ntij", s, s)
    seen = np.cumsum(outer, 1) - outer  # i < t
    a = seen + lam * np.eye(s.shape[-1])
    return np.linalg.solve(a, s[..., None])[..., 0].astype(np.float32)


def lagged(states_NxTp1xD: jax.Array, lag: int) -> jax.Array:
    """`s_{t-lag}` at each position `t = 1..T` (`s_t = 0` for `t < 1`, as the tokens' `s_0`): `[N, T, D]`."""
    s = states_NxTp1xD[:, :-1]
    return jnp.pad(s, ((0, 0), (lag, 0), (0, 0)))[:, : s.shape[1]]


TARGET_LABELS = {  # the targets of `lds_targets`, for figures
    "s_t": "s_t",
    "s_t-1": "s_{t-1}",
    "s_t+1": "s_{t+1} (what the model predicts)",
    "preconditioned": "(sum_{i<t} s_i s_i^T + lambda I)^{-1} s_t",
    "control": "control: s_t of an independent sequence",
}


def lds_targets(states_NxTp1xD: jax.Array, control_NxTp1xD: jax.Array, lam: float) -> dict[str, jax.Array]:
    """The probes' targets (docs/science.md section 8) at each position `t`: `s_t`, `s_{t-1}`,
    `s_{t+1}`, the preconditioned input, and the control `s'_t`: the state at the same position
    of another, independent sequence (`control`). The control has the law of `s_t` at every
    position but no relation to the tokens, so its held-out R^2 (about `-W / N`) is what a probe
    of this size finds by chance."""
    return {
        "s_t": lagged(states_NxTp1xD, 0),
        "s_t-1": lagged(states_NxTp1xD, 1),
        "s_t+1": states_NxTp1xD[:, 1:],
        "preconditioned": jnp.asarray(preconditioned_inputs(np.asarray(states_NxTp1xD), lam)),
        "control": lagged(control_NxTp1xD, 0),
    }


READABLE_R2 = 0.9  # a lag is "in the tokens" when a linear probe reads it with at least this held-out R^2


def readable(r2_by_lag: np.ndarray, threshold: float = READABLE_R2) -> list[int]:
    """The lags whose R^2 (`[lags]`, lag 0 first) reaches `threshold`."""
    return [k for k, r2 in enumerate(np.asarray(r2_by_lag)) if r2 >= threshold]


def first_layer_finding(r2_before: np.ndarray, r2_after: np.ndarray, threshold: float = READABLE_R2) -> str:
    """One line from the R^2 of `s_{t-k}` by lag `k` before and after the first layer: is the pair
    `(s_t, s_{t-1})` in the tokens from the start, does the first layer build it, and which further
    lags does it add (the follow-up's finding for softmax models on raw states, docs/science.md
    section 8)?"""
    before, after = readable(r2_before, threshold), readable(r2_after, threshold)
    pair = lambda lags: 0 in lags and 1 in lags
    further = [k for k in after if k > 1 and k not in before]
    added = f"the first layer adds lag(s) {further}" if further else "the first layer adds no lag > 1"
    where = f"(R^2 >= {threshold}: lags {before} before the first layer, {after} after it)"
    if pair(before):
        return f"the pair (s_t, s_{{t-1}}) is in the tokens from the start; {added} {where}"
    if pair(after):
        return f"the first layer builds the pair (s_t, s_{{t-1}}), absent before it; {added} {where}"
    return f"no pair (s_t, s_{{t-1}}) after the first layer {where}"
